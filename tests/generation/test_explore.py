"""unCLIP's generation tools (issue 22): per-token slerp, blended and text-diff conditionings, variations through
img2img, best-of-N reranking, the held-apart denoising scorer, and ``python -m sur_lightning.explore``'s files."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from test_generate import tiny_ella, tiny_sur

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.evaluation.rerank import DenoisingScorer
from sur_lightning.explore import explore
from sur_lightning.generation.columns import Column
from sur_lightning.generation.conditioning import ClipConditioning, ConnectorConditioning, frozen_text_features
from sur_lightning.generation.interpolation import BlendConditioning, TextDiffConditioning, lerp, noise_slerp, slerp
from sur_lightning.generation.manifest import read_manifest
from sur_lightning.generation.pipeline import build_pipeline, render
from sur_lightning.generation.tools import BestOfN, Setup, Variations
from sur_lightning.models.connectors import save_connector

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
PROMPT = "two red circles"
FAST = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------ slerp


def test_slerp_hits_both_ends_and_keeps_equal_norms_per_token():
    torch.manual_seed(0)
    a, b = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)  # same length, token by token
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for t in (0.25, 0.5, 0.9):
        torch.testing.assert_close(slerp(a, b, t).norm(dim=-1), a.norm(dim=-1))
    # The straight line shortens the middle: that is what slerp avoids.
    assert (lerp(a, b, 0.5).norm(dim=-1) < a.norm(dim=-1) - 1e-3).all()


def test_slerp_is_per_token_angle_with_linear_length():
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    # 90°: the midpoint direction is 45°, and the length halfway between 1 and 3.
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([[2**0.5, 2**0.5]]))
    torch.testing.assert_close(
        slerp(e0, e1, 1 / 3), 5 / 3 * torch.tensor([[np.cos(np.pi / 6), np.sin(np.pi / 6)]], dtype=torch.float32)
    )
    # Element-wise arc-cosines would move each coordinate on its own; one angle per vector keeps the plane.
    parallel = slerp(e0, 2 * e0, 0.5)
    torch.testing.assert_close(parallel, torch.tensor([[1.5, 0.0]]))  # the near-parallel fallback is finite


def test_slerp_takes_one_weight_per_row():
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out = slerp(a, b, torch.tensor([0.0, 1.0]).reshape(2, 1, 1))
    assert torch.equal(out[0], a[0]) and torch.equal(out[1], b[1])


def test_noise_slerp_runs_from_one_seed_noise_to_the_other():
    a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    path = noise_slerp(a, b, [0.0, 0.5, 1.0])
    assert path.shape == (3, 4, 8, 8) and torch.equal(path[0], a) and torch.equal(path[2], b)


# ------------------------------------------------------------------------------------ conditionings


@pytest.fixture(scope="module")
def pipeline(backbone):
    return build_pipeline(backbone)


@pytest.fixture(scope="module")
def base(backbone):
    return ClipConditioning(frozen_text_features(backbone))


@pytest.fixture(scope="module")
def sur(backbone):
    return ConnectorConditioning(tiny_sur(), frozen_text_features(backbone))


def test_a_blend_strip_starts_at_the_base_image_and_ends_at_the_adapter_image(pipeline, base, sur):
    blend = BlendConditioning(base, sur, [0.0, 0.5, 1.0])
    strip = render(pipeline, blend, [PROMPT] * 3, [0, 0, 0], **FAST)
    ends = render(pipeline, base, [PROMPT], [0], **FAST) + render(pipeline, sur, [PROMPT], [0], **FAST)
    assert np.abs(pixels(strip[0]) - pixels(ends[0])).max() <= 2
    assert np.abs(pixels(strip[2]) - pixels(ends[1])).max() <= 2
    assert np.abs(pixels(strip[1]) - pixels(ends[0])).max() > 2  # the middle is neither end


def test_a_prompt_blend_reads_the_partner_prompt_at_the_far_end(base):
    blend = BlendConditioning(base, base, [0.0, 1.0], {PROMPT: "one blue square"})
    out = blend.output(blend.features([PROMPT, PROMPT]), 10).conditioning
    torch.testing.assert_close(out[0], base([PROMPT], 10)[0])
    torch.testing.assert_close(out[1], base(["one blue square"], 10)[0])
    with pytest.raises(ValueError, match="2 weights renders 2 rows, got 3"):
        blend.features([PROMPT] * 3)


@pytest.fixture(scope="module")
def token_llm(tiny_llm):
    from sur_lightning.models.llm import CausalLMFeatures

    return CausalLMFeatures(tiny_llm, pooling="none")


def test_base_and_ella_cannot_be_blended_token_by_token(backbone, base, token_llm):
    ella = ConnectorConditioning(tiny_ella(), frozen_text_features(backbone, token_llm))
    blend = BlendConditioning(base, ella, [0.0, 1.0])
    with pytest.raises(ValueError, match="77 tokens.*8 tokens"):
        blend.output(blend.features([PROMPT] * 2), 10)


def test_a_text_diff_at_strength_zero_is_the_prompt_and_at_one_swaps_source_for_target(base, pipeline):
    diff = TextDiffConditioning(base, "one red circle", "one blue circle", [0.0, 1.0])
    out = diff.output(diff.features(["one red circle"] * 2), 10).conditioning
    torch.testing.assert_close(out[0], base(["one red circle"], 10)[0])
    torch.testing.assert_close(out[1], base(["one blue circle"], 10)[0], atol=1e-5, rtol=1e-5)
    strip = render(pipeline, diff, ["one red circle"] * 2, [0, 0], **FAST)
    assert np.abs(pixels(strip[0]) - pixels(render(pipeline, base, ["one red circle"], [0], **FAST)[0])).max() <= 2
    unclip = TextDiffConditioning(base, "one red circle", "one blue circle", [0.0, 0.5], method="slerp")
    shifted = unclip.output(unclip.features([PROMPT] * 2), 10).conditioning
    torch.testing.assert_close(shifted[0], base([PROMPT], 10)[0])
    torch.testing.assert_close(shifted[1].norm(dim=-1), shifted[0].norm(dim=-1))  # slerp keeps each token's length


# ------------------------------------------------------------------------------------ tools


def setup_of(pipeline, columns, prompts=(PROMPT,), seeds=(0,), **sampler):
    prompts = [Prompt(f"prompt-{i:03d}", p, "custom") for i, p in enumerate(prompts)]
    return Setup(pipeline, list(columns), prompts, list(seeds), "", FAST | sampler)


def test_variations_at_strength_zero_are_the_vae_round_trip_of_the_input(pipeline, base, tmp_path):
    source = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    source.save(tmp_path / "input.png")
    tool = Variations(strengths=[0.0, 0.5], num_variations=2, image=str(tmp_path / "input.png"))
    picture = tool.run(setup_of(pipeline, [Column("base", base, {"kind": "base"})], num_inference_steps=4))
    trip = Variations.round_trip(pipeline, source)
    zero, half = picture.columns["#1"][0], picture.columns["#1"][1]
    assert np.array_equal(pixels(zero), pixels(trip)) and picture.columns["input"][0] is not None
    assert np.abs(pixels(half) - pixels(trip)).max() > 2  # re-noised and denoised: another image
    assert not np.array_equal(pixels(picture.columns["#1"][1]), pixels(picture.columns["#2"][1]))  # one seed each
    with pytest.raises(ValueError, match="0 denoising steps"):
        Variations(strengths=[0.2]).vary(
            setup_of(pipeline, [], num_inference_steps=2), Variations.img2img(pipeline), base, PROMPT, source, 0.2, [1]
        )


def test_variations_recompute_a_timestep_aware_connector_at_every_step(backbone, pipeline, token_llm):
    from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector

    connector = tiny_ella()
    seen = []
    original = TimestepAwareSemanticConnector.forward

    def spy(self, features, timesteps):
        seen.append(torch.as_tensor(timesteps).reshape(-1)[0].item())
        return original(self, features, timesteps)

    ella = ConnectorConditioning(connector, frozen_text_features(backbone, token_llm))
    source = Image.new("RGB", (32, 32), "red")
    TimestepAwareSemanticConnector.forward = spy
    try:
        Variations().vary(
            setup_of(pipeline, [], num_inference_steps=4), Variations.img2img(pipeline), ella, PROMPT, source, 0.5, [1]
        )
    finally:
        TimestepAwareSemanticConnector.forward = original
    assert len(set(seen)) == 2 and len(seen) == 4  # 2 of 4 steps at strength 0.5, prompt and negative each


class FixedScores:
    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def score(self, images, prompts):
        self.calls.append(list(prompts))
        return torch.tensor(self.scores[: len(images)])


def test_best_of_n_keeps_the_scorer_argmax(pipeline, base):
    scorer = FixedScores([0.1, 0.9, 0.3])
    tool = BestOfN(scorer, n=3)
    picture = tool.run(setup_of(pipeline, [Column("base", base, {"kind": "base"})], seeds=[0, 1]))
    first, best = (
        [r for r in picture.images if r.column == "base"],
        [r for r in picture.images if r.column == "base best-of-3"],
    )
    assert [r.info["score"] for r in picture.images if r.column == "base all-3"] == pytest.approx([0.1, 0.9, 0.3] * 2)
    assert [r.seed for r in first] == [0, 3] and [r.seed for r in best] == [1, 4]  # draws 0 and 1: seeds 0-2, 3-5
    candidates = render(pipeline, base, [PROMPT] * 3, [3, 4, 5], **FAST)
    assert np.abs(pixels(best[1].image) - pixels(candidates[1])).max() <= 2
    assert best[0].info["scores"] == pytest.approx([0.1, 0.9, 0.3]) and best[0].info["chosen"] == 1
    assert scorer.calls == [[PROMPT] * 3] * 2
    with pytest.raises(ValueError, match="no complex form"):
        BestOfN(scorer, n=2, scorer_text="complex").text(Prompt("p", PROMPT, "custom"))


def test_the_denoising_scorer_is_deterministic_and_refuses_sdxl(backbone):
    scorer = DenoisingScorer(backbone, timesteps=[500], noise_draws=1)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    scores = scorer.score(images, [PROMPT] * 2)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scorer.score(images, [PROMPT] * 2), scores)
    assert not torch.equal(scorer.score(images, ["one blue square"] * 2), scores)  # the text matters
    with pytest.raises(ValueError, match="SDXL"):
        DenoisingScorer(SimpleNamespace(pooled_dim=1280))


# ------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    sur_path, _ = save_connector(tiny_sur(), folder / "sur" / "adapter.safetensors")
    ella_path, _ = save_connector(tiny_ella(), folder / "ella" / "adapter.safetensors")
    return sur_path, ella_path


def compose_explore(tmp_path, cache_dir, *overrides):
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path}/run",
        "backbone=tiny",
        "llm=tiny",
        "sampler.num_inference_steps=2",
        "sampler.resolution=32",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="explore", overrides=[*base, *overrides])


@pytest.mark.parametrize(
    "tool, overrides, rows, columns, images",
    [
        ("interpolate", ["tool.steps=3"], 2, 3, 6),  # base → sur for 2 prompts
        ("interpolate", ["tool.between=prompts", "tool.steps=3", "tool.noise_to_seed=5"], 3, 3, 9),  # base, sur, ella
        ("text_diff", ["tool.strengths=[0,1]"], 6, 2, 12),
        (
            "variations",
            ["tool.strengths=[0,0.5]", "tool.num_variations=2", "sampler.num_inference_steps=4"],
            12,
            3,
            6 * 5,
        ),  # input + 2 × 2
        ("best_of_n", ["tool.n=2", "metrics.compute=[shapes]"], 6, 3, 6 * 4),  # first, best, 2 candidates
    ],
)
@pytest.mark.slow
def test_each_tool_writes_its_grid_and_manifest(
    tmp_path, cache_dir, tiny_sd, tiny_llm, adapters, tool, overrides, rows, columns, images
):
    sur_path, ella_path = adapters
    chosen = [sur_path] if tool == "interpolate" and "tool.between=prompts" not in overrides else [sur_path, ella_path]
    cfg = compose_explore(tmp_path, cache_dir, f"tool={tool}", f"adapters=[{','.join(map(str, chosen))}]", *overrides)
    written = explore(cfg, overrides=[])
    run = Path(cfg.paths.output_dir)
    assert Image.open(written["grid"]).size == (160 + columns * 128, 16 + rows * 128)
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["images"]) == images and all((run / row["file"]).is_file() for row in manifest["images"])
    assert manifest["settings"]["tool"]["_target_"].startswith("sur_lightning.generation.tools.")
    if tool == "best_of_n":
        report = json.loads((run / "report.json").read_text())
        assert set(report["columns"]) == {
            f"{c}{k}" for c in ("base", "sur", "ella") for k in ("", " best-of-2", " all-2")
        }
        assert {r.column for r in read_manifest(run)} == set(report["columns"])  # evaluate images_dir=<run> reads it
    if tool == "text_diff":
        assert {row["strength"] for row in manifest["images"]} == {0.0, 1.0}


def test_interpolating_base_into_ella_fails_before_rendering_naming_both(
    tmp_path, cache_dir, tiny_sd, tiny_llm, adapters
):
    cfg = compose_explore(tmp_path, cache_dir, "tool=interpolate", f"adapters=[{adapters[1]}]")
    with pytest.raises(ValueError, match="base gives 77 tokens and ella 8"):
        explore(cfg, overrides=[])
    assert not (Path(cfg.paths.output_dir) / "grid.png").exists()
    with pytest.raises(ValueError, match="metrics.compute scores best-of-N"):
        explore(compose_explore(tmp_path, cache_dir, "tool=text_diff", "metrics.compute=[shapes]"), overrides=[])
