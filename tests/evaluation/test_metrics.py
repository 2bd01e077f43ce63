"""Metrics: exact values on hand-made inputs, tiny random models, and clear errors for missing weights."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sur_lightning.data import prompt_suites
from sur_lightning.data.synthetic import BACKGROUND, COLORS, draw_shapes, simple_prompt
from sur_lightning.evaluation.metrics import captions, diversity, fid, shapes

# ---------------------------------------------------------------- shapes


def test_count_shapes_is_exact_on_generated_images():
    rng = random.Random(0)
    cases = [
        (1, "red", "circle"),
        (3, "blue", "square"),
        (5, "yellow", "circle"),
        (2, "purple", "square"),
        (4, "green", "circle"),
        (5, "orange", "square"),
        (3, "green", "triangle"),
    ]
    images, prompts = [], []
    for count, color, kind in cases:
        image, _ = draw_shapes(count, color, kind, 64, rng)
        assert shapes.count_shapes(image) == {(color, kind): count}
        images.append(image)
        prompts.append(simple_prompt(count, color, kind))
    assert shapes.score(images, prompts) == {
        "count_accuracy": 1.0,
        "color_accuracy": 1.0,
        "shape_accuracy": 1.0,
        "exact": 1.0,
    }
    # Same images judged against partly wrong prompts: each accuracy counts only its own attribute.
    wrong = [
        "two red circles",
        "three red squares",
        "five yellow squares",
        "two purple squares",
        "four green circles",
        "one orange square",
        "three green triangles",
    ]
    assert shapes.score(images, wrong) == {
        "count_accuracy": 5 / 7,
        "color_accuracy": 6 / 7,
        "shape_accuracy": 6 / 7,
        "exact": 3 / 7,
    }


def test_count_shapes_hand_drawn_edge_cases():
    blank = Image.new("RGB", (40, 40), (255, 255, 255))
    assert shapes.count_shapes(blank) == {}
    assert shapes.check(blank, "one red circle") == {
        "count": False,
        "color": False,
        "shape": False,
        "exact": False,
        "valid": False,
    }

    image = blank.copy()
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, 11, 11), fill=COLORS["red"])
    draw.rectangle((20, 2, 29, 11), fill=(200, 40, 35))  # off-palette but nearest red, within tolerance
    draw.ellipse((2, 20, 17, 35), fill=COLORS["blue"])
    draw.point((35, 35), fill=COLORS["green"])  # a one-pixel speck, below min_area
    draw.rectangle((30, 20, 35, 25), fill=(128, 128, 128))  # grey: a shape, but of no palette colour
    assert shapes.count_shapes(image) == {("red", "square"): 2, ("blue", "circle"): 1, (None, "square"): 1}
    assert shapes.check(image, "four red squares") == {
        "count": True,
        "color": False,
        "shape": False,
        "exact": False,
        "valid": False,  # four shapes, one grey
    }
    assert shapes.check(image, target=(4, "red", "square"))["count"]

    # A shape's colour is its median: a dark outline and a few stray pixels do not split or recolour it.
    outlined = blank.copy()
    ImageDraw.Draw(outlined).ellipse((4, 4, 25, 25), fill=COLORS["yellow"], outline=COLORS["orange"])
    assert shapes.count_shapes(outlined) == {("yellow", "circle"): 1}

    # Two touching squares of one colour merge into one (non-square) component: a known limit, stated here.
    merged = blank.copy()
    ImageDraw.Draw(merged).rectangle((2, 2, 21, 11), fill=COLORS["green"])
    assert shapes.count_shapes(merged) == {("green", "square"): 1}

    tensor = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
    assert shapes.count_shapes(tensor) == shapes.count_shapes(image)


def test_world_images_and_their_vae_reconstructions_are_valid():
    from diffusers import AutoencoderKL

    from sur_lightning.toyworld import shipped_base, world

    rng = random.Random(0)
    images = [world.random_complex_example(rng)[0] for _ in range(300)]
    assert np.mean([shapes.valid_image(image) for image in images]) >= 0.98
    assert all(
        shapes.check(image, target=(1, "red", "circle"))["valid"] for image in images[:20]
    )  # wrong target, still valid

    vae = AutoencoderKL.from_pretrained(shipped_base(), subfolder="vae", torch_dtype=torch.float32).eval()
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32)) for image in images[:48]])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean).sample
    assert np.mean([shapes.valid_image((x.clamp(-1, 1) + 1) / 2) for x in decoded]) >= 0.98


def smooth_noise(rng: np.random.Generator, cells: int, channels: int, size: int = 64) -> np.ndarray:
    """float [size, size, channels], values about [0, 1]: a cells x cells grid of random values upsampled bicubically."""
    small = rng.random((cells, cells, channels)).astype(np.float32)
    return np.stack(
        [np.asarray(Image.fromarray(small[..., c]).resize((size, size), Image.BICUBIC)) for c in range(channels)], -1
    )


def test_blotchy_noise_textures_are_invalid():
    from sur_lightning.data.synthetic import BACKGROUND

    background = np.asarray(BACKGROUND, np.float32)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        textures = {
            "colour blotches filling the frame": smooth_noise(rng, 8, 3) * 255,
            "yellow texture filling the frame": np.asarray(COLORS["yellow"]) * (0.5 + 0.8 * smooth_noise(rng, 8, 1)),
            "pale noise around the background": background + (smooth_noise(rng, 16, 3) - 0.5) * 160,
            "blotches on the background": np.where(
                smooth_noise(rng, 8, 1) > 0.6, smooth_noise(rng, 4, 3) * 255, background
            ),
        }
        patch = np.broadcast_to(background, (64, 64, 3)).copy()
        patch[16:40, 20:44] = smooth_noise(rng, 8, 3)[16:40, 20:44] * 255  # a square of noise: not one solid colour
        textures["a square of colour noise"] = patch
        for name, texture in textures.items():
            image = texture.clip(0, 255).astype(np.uint8)
            assert not shapes.valid_image(image), (seed, name)
            assert not shapes.check(image, target=(1, "yellow", "square"))["valid"]


def test_empty_crowded_merged_and_tinted_images_are_invalid():
    from sur_lightning.data.synthetic import BACKGROUND

    rng = random.Random(0)
    assert not shapes.valid_image(Image.new("RGB", (64, 64), BACKGROUND))
    assert not shapes.valid_image(Image.new("RGB", (64, 64), COLORS["yellow"]))  # one colour filling the frame
    for count in (1, 2, 3):
        assert shapes.valid_image(draw_shapes(count, "blue", "triangle", 64, rng, side=14)[0])
    for count in (4, 5):
        assert not shapes.valid_image(draw_shapes(count, "blue", "triangle", 64, rng, side=14)[0])

    # Strokes and outlines fill their boxes like no template.
    for draw_stroke in (
        lambda draw: draw.line((10, 10, 40, 40), fill=COLORS["red"], width=4),
        lambda draw: draw.ellipse((10, 10, 40, 40), outline=COLORS["red"], width=3),
    ):
        stroke = Image.new("RGB", (64, 64), BACKGROUND)
        draw_stroke(ImageDraw.Draw(stroke))
        assert sum(shapes.count_shapes(stroke).values()) == 1 and not shapes.valid_image(stroke)

    # A clean shape on a background tinted by faint noise (below the foreground threshold, above the background's).
    clean, _ = draw_shapes(2, "green", "circle", 64, rng, side=18)
    tint = np.random.default_rng(0).uniform(-50, 50, (64, 64, 3))
    tinted = (np.asarray(clean, np.float32) + tint).clip(0, 255).astype(np.uint8)
    assert shapes.valid_image(clean) and shapes.count_shapes(tinted) == shapes.count_shapes(clean)
    assert not shapes.valid_image(tinted)

    # A grey shape has no palette colour.
    grey = Image.new("RGB", (64, 64), BACKGROUND)
    ImageDraw.Draw(grey).rectangle((10, 10, 27, 27), fill=(128, 128, 128))
    assert not shapes.valid_image(grey)


def test_bfs_components_match_scipy():
    mask = np.random.default_rng(0).random((30, 30)) > 0.6
    labels, count = shapes._components_bfs(mask)
    ref_labels, ref_count = shapes.connected_components(mask)
    assert count == ref_count
    sizes = sorted(np.bincount(labels.ravel())[1:])
    assert sizes == sorted(np.bincount(ref_labels.ravel())[1:])


def test_parse_prompt():
    assert shapes.parse_prompt("three red circles") == (3, "red", "circle")
    assert shapes.parse_prompt("One Blue Square.") == (1, "blue", "square")
    assert shapes.parse_prompt("4 green squares") == (4, "green", "square")
    assert shapes.parse_prompt("two orange triangles") == (2, "orange", "triangle")
    for bad in ["three red hexagons", "many red circles", "a chef tossing pizza dough"]:
        with pytest.raises(ValueError, match="cannot parse"):
            shapes.parse_prompt(bad)


# ---------------------------------------------------------------- prompt suites


def test_builtin_suites():
    for name in ("counting", "color", "action"):
        suite = prompt_suites.load_prompts(name)
        assert len(suite) >= 20 and all(p.category == name for p in suite)
        assert len({p.id for p in suite}) == len(suite) and len({p.prompt for p in suite}) == len(suite)
    with pytest.raises(KeyError, match="built-in suites"):
        prompt_suites.builtin_suite("nope")


def test_prompt_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("five dogs\n\n# a comment\na chef tossing pizza dough\n")
    assert prompt_suites.load_prompts(txt) == [
        prompt_suites.Prompt("mine-0001", "five dogs", "mine"),
        prompt_suites.Prompt("mine-0004", "a chef tossing pizza dough", "mine"),
    ]

    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "two cats", "id": "c2"}) + "\n" + json.dumps({"prompt": "a red apple"}) + "\n"
    )
    assert [(p.id, p.prompt, p.category) for p in prompt_suites.load_prompts(good)] == [
        ("c2", "two cats", "good"),
        ("good-0002", "a red apple", "good"),
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError) as error:
        prompt_suites.load_prompts(bad)
    assert f"{bad}:2: invalid JSON" in str(error.value) and f"{bad}:3:" in str(error.value)

    dpg = tmp_path / "dpg_bench" / "prompts"
    dpg.mkdir(parents=True)
    for stem, text in [("10", "ten"), ("2", "two\n"), ("abc", "letters")]:
        (dpg / f"{stem}.txt").write_text(text)
    loaded = prompt_suites.load_prompts(tmp_path / "dpg_bench")
    assert [(p.id, p.prompt, p.category) for p in loaded] == [
        ("2", "two", "dpg_bench"),
        ("10", "ten", "dpg_bench"),
        ("abc", "letters", "dpg_bench"),
    ]
    (dpg / "7.txt").write_text("  \n")
    with pytest.raises(ValueError, match="7.txt: empty prompt file"):
        prompt_suites.load_prompts(dpg)


# ---------------------------------------------------------------- captions


def test_bleu_and_rouge_match_hand_computed_values():
    caption, reference = "A red apple on a plate", "a red apple on a blue plate"
    result = captions.score_captions([caption], [reference], meteor_metric=False)
    # Candidate 6 tokens, reference 7: brevity penalty exp(1 - 7/6).
    # Clipped n-gram precisions: 6/6, 4/5, 3/4, 2/3.
    brevity = math.exp(1 - 7 / 6)
    assert result["bleu_1"] == pytest.approx(brevity * 1.0, abs=1e-6)
    assert result["bleu_4"] == pytest.approx(brevity * (1.0 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, abs=1e-6)
    # ROUGE-1 and ROUGE-L (LCS = 6): precision 6/6, recall 6/7, F = 12/13.
    assert result["rouge1_f"] == pytest.approx(12 / 13, abs=1e-6)
    assert result["rougeL_f"] == pytest.approx(12 / 13, abs=1e-6)
    # Several references per caption: the best-matching one counts for ROUGE.
    multi = captions.score_captions([caption], [["a dog", reference]], meteor_metric=False)
    assert multi["rouge1_f"] == pytest.approx(12 / 13, abs=1e-6)


def _write_wordnet(folder, synonyms):
    """A minimal WordNet dict folder in the Princeton format: one noun synset holding ``synonyms``."""
    folder.mkdir()
    (folder / "lexnames").write_text("".join(f"{i:02d}\tnoun.x{i}\t1\n" for i in range(6)))
    words = " ".join(f"{w} 0" for w in synonyms)
    (folder / "data.noun").write_text(f"00000000 05 n {len(synonyms):02x} {words} 000 | a test synset  \n")
    (folder / "index.noun").write_text("".join(f"{w} n 1 0 1 0 00000000  \n" for w in sorted(synonyms)))
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text("")
        (folder / f"index.{pos}").write_text("")
    for pos in ("noun", "verb", "adj", "adv"):
        (folder / f"{pos}.exc").write_text("")


def test_meteor_uses_wordnet_synonyms(tmp_path):
    _write_wordnet(tmp_path / "with", ["dog", "hound"])
    _write_wordnet(tmp_path / "without", ["dog", "cat"])
    exact = captions.meteor(["a dog runs"], ["a dog runs"], wordnet=tmp_path / "with")
    synonym = captions.meteor(["a hound runs"], ["a dog runs"], wordnet=tmp_path / "with")
    unrelated = captions.meteor(["a hound runs"], ["a dog runs"], wordnet=tmp_path / "without")
    assert synonym == pytest.approx(exact) and unrelated < synonym
    full = captions.score_captions(["a hound runs"], ["a dog runs"], wordnet=tmp_path / "with")
    assert full["meteor"] == pytest.approx(exact)


def test_meteor_without_wordnet_says_what_is_missing(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(RuntimeError, match="WordNet corpus.*NLTK_DATA.*metrics.captions.wordnet"):
        captions.score_captions(["a dog"], ["a dog"])
    with pytest.raises(RuntimeError, match="missing lexnames.*metrics.captions.wordnet"):
        captions.load_wordnet(tmp_path)


def test_captioner_error_names_the_model(tmp_path):
    with pytest.raises(RuntimeError, match="BLIP captioner.*metrics.captioner.model"):
        captions.Captioner(str(tmp_path))


# ---------------------------------------------------------------- diversity


def _constant_images(values):
    return torch.stack([torch.full((3, 8, 8), v) for v in values])


def test_diversity_math_with_injected_distance():
    def l1(a, b):
        return (a - b).abs().flatten(1).mean(1)

    images = _constant_images([0.0, 0.5, 1.0, 0.2, 0.2])
    prompts = ["a", "a", "a", "b", "b"]
    result = diversity.diversity_by_prompt(images, prompts, distance=l1)
    # Pairs of "a": 0.5, 1.0, 0.5 -> 2/3; "b": identical images -> 0.
    assert result["per_prompt"] == pytest.approx({"a": 2 / 3, "b": 0.0})
    assert result["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=">= 2 images per prompt"):
        diversity.diversity_by_prompt(images[:4], prompts[:4], distance=l1)


def test_lpips_without_backbone_weights_names_the_file(tmp_path):
    with pytest.raises(RuntimeError, match="alexnet-owt-7be5be79.pth.*metrics.lpips.backbone_weights"):
        diversity.lpips_distance("alex", backbone_weights=tmp_path / "missing.pth")
    corrupt = tmp_path / "alexnet.pth"
    corrupt.write_bytes(b"not a checkpoint")
    hub_dir = torch.hub.get_dir()
    with pytest.raises(RuntimeError, match="alexnet-owt-7be5be79.pth.*metrics.lpips.backbone_weights"):
        diversity.lpips_distance("alex", backbone_weights=corrupt)
    assert torch.hub.get_dir() == hub_dir


# ---------------------------------------------------------------- FID / KID


class TinyFeatures(torch.nn.Module):
    """Deterministic stand-in for Inception: 2x2 average colours -> 12 features."""

    num_features = 12

    def forward(self, images):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_fid_and_kid_zero_for_identical_sets_and_larger_for_shifted():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=generator)
    same = fid.fid_kid(real, real.clone(), feature=TinyFeatures(), kid_subsets=10, kid_subset_size=32)
    shifted = fid.fid_kid(real, (real + 0.3).clamp(0, 1), feature=TinyFeatures(), kid_subsets=10, kid_subset_size=32)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-3
    assert shifted["fid"] > 0.1 and shifted["kid_mean"] > 100 * abs(same["kid_mean"]) + 1e-3
    # uint8 input gives the same features as [0, 1] floats; the seed fixes KID's subsets.
    as_uint8 = fid.fid_kid((real * 255).round().byte(), (real * 255).round().byte(), feature=TinyFeatures())
    assert abs(as_uint8["fid"]) < 1e-3
    again = fid.fid_kid(real, (real + 0.3).clamp(0, 1), feature=TinyFeatures(), kid_subsets=10, kid_subset_size=32)
    assert again == shifted


def test_real_fid_inception_loads_offline():
    features = fid.InceptionFeatures()
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).byte()
    out = features(images)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()

    # uint8 and [0, 1] floats reach the network identically: 299 px, uint8 / 128 - 1.
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean((2, 3))

    features.net = Recorder()
    features(images)
    features(images.float() / 255)
    assert seen[0].shape == (2, 3, 299, 299) and torch.allclose(seen[0], seen[1], atol=1e-6)
    assert seen[0].min() >= -1 and seen[0].max() <= 255 / 128 - 1
    flat = torch.full((1, 3, 8, 8), 64, dtype=torch.uint8)
    features(flat)
    assert torch.allclose(seen[-1], torch.full_like(seen[-1], 64 / 128 - 1))


# ---------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("clip_config")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "sur-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return "sur-test-tiny-clip"


def test_clip_score_is_deterministic_bounded_and_counts_truncation(tiny_clip, tmp_path):
    from sur_lightning.evaluation.metrics.clip_score import CLIPScorer

    torch.manual_seed(0)
    scorer = CLIPScorer(tiny_clip, pretrained=None)
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    long_prompt = " ".join(["a very long description of a red apple"] * 15)
    prompts = ["three red circles", "a chef tossing pizza dough", long_prompt]
    scores = scorer.score(images, prompts)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()
    assert torch.equal(scorer.score(images, prompts), scores)
    assert scorer.truncated == 2  # the long prompt, once per call
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    assert torch.allclose(scorer.score(pil, prompts), scores, atol=1e-5)

    # A local checkpoint file goes through open_clip's own loader and reproduces the scores.
    checkpoint = tmp_path / "tiny.pt"
    torch.save(scorer.model.state_dict(), checkpoint)
    reloaded = CLIPScorer(tiny_clip, pretrained=str(checkpoint))
    assert torch.allclose(reloaded.score(images, prompts), scores, atol=1e-5)

    with pytest.raises(RuntimeError, match="metrics.clip.pretrained"):
        CLIPScorer(tiny_clip, pretrained=str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------- caption-back with the checker as captioner


def test_checker_caption_writes_the_reading_in_the_bases_vocabulary():
    from sur_lightning.toyworld import world

    rng = random.Random(0)
    assert captions.checker_caption(world.draw_example(2, "red", "circle", rng)) == "two red circles"
    assert captions.checker_caption(world.draw_example(1, "blue", "square", rng)) == "one blue square"
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert captions.checker_caption(blank) == "nothing"
    mixed = np.asarray(world.draw_example(1, "green", "triangle", rng)).copy()
    mixed[2:10, 2:10] = COLORS["red"]  # a small red square in a corner the world leaves empty
    assert captions.checker_caption(mixed) in (
        "one green triangle and one red square",
        "one red square and one green triangle",
    )


def test_checker_caption_metrics_on_a_hand_made_pair(tmp_path):
    # "two red circles" read back for "three red circles": 2 of 3 unigrams match, no 4-gram exists.
    result = captions.score_captions(["two red circles"], ["three red circles"], meteor_metric=False)
    assert result["bleu_1"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["bleu_4"] == 0.0
    assert result["rouge1_f"] == pytest.approx(2 / 3, abs=1e-6) and result["rougeL_f"] == pytest.approx(2 / 3, abs=1e-6)
    # An exact reading: METEOR is F = 1 less the fragmentation penalty 0.5 (1 chunk / 3 matches)^3.
    _write_wordnet(tmp_path / "wn", ["circle", "disc"])
    exact = captions.score_captions(["two red circles"], ["two red circles"], wordnet=tmp_path / "wn")
    assert exact["meteor"] == pytest.approx(1 - 0.5 / 27, abs=1e-4)
    assert exact["bleu_1"] == pytest.approx(1.0) and exact["rougeL_f"] == pytest.approx(1.0)
