"""unCLIP's own tools on an unCLIP column (issue 34, arXiv 2204.06125 §3): variations decode an image's embedding
with new noise, interpolation and text diffs move in the image-embedding space, and ``explore unclip=<export>``
writes each tool's images. The export is built from tiny random parts in the layout training writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.explore import explore
from sur_lightning.generation.columns import Column, unclip_column
from sur_lightning.generation.pipeline import build_pipeline
from sur_lightning.generation.tools import BestOfN, Interpolation, Setup, TextDiffs, Variations
from sur_lightning.generation.unclip import DECODER_RECORD, PRIOR_RECORD, decode_embeddings
from sur_lightning.models.image_tower import ImageTower
from sur_lightning.models.prior import DiffusionPrior
from sur_lightning.models.unclip_decoder import ImageEmbeddingProjection

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
FAST = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}
PROMPTS = ["two red circles", "one blue square"]


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def nearly_same(a: Image.Image, b: Image.Image) -> bool:
    difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return difference.max() <= 8 and difference.mean() < 0.5


@pytest.fixture(scope="module")
def export(tmp_path_factory, backbone, llm) -> Path:
    """A prior export (``unclip/``), its decoder and its image tower, as ``training/unclip_module.py`` writes them."""
    root = tmp_path_factory.mktemp("unclip_export")
    torch.manual_seed(0)
    tower = ImageTower(channels=(8, 8, 8, 8), embedding_dim=16, groups=4, image_size=32)
    tower.save_pretrained(root / "tower")
    projection = ImageEmbeddingProjection(16, **ImageEmbeddingProjection.widths_of(backbone.unet), num_tokens=2)
    with torch.no_grad():  # a time projection that is not zero yet, as after training
        projection.to_time.weight.normal_()
    projection.save_pretrained(root / "decoder")
    record = {"image_tower": {"path": str(root / "tower")}, "trained_with": {}}
    (root / "decoder" / DECODER_RECORD).write_text(json.dumps(record))
    prior = DiffusionPrior(
        text_dim=llm.hidden_size,
        pooled_dim=backbone.cross_attention_dim,
        embedding_dim=16,
        num_embeddings=128,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
    )
    prior.fit_embedding_stats(torch.nn.functional.normalize(torch.randn(32, 16), dim=-1))
    prior.save_pretrained(root / "unclip" / "prior")
    (root / "unclip" / PRIOR_RECORD).write_text(json.dumps({**record, "decoder": str(root / "decoder")}))
    return root / "unclip"


@pytest.fixture(scope="module")
def column(backbone, tiny_llm, export) -> Column:
    from sur_lightning.models.llm import CausalLMFeatures

    return unclip_column(backbone, export, llm=CausalLMFeatures(tiny_llm, pooling="none"), num_inference_steps=3)


@pytest.fixture(scope="module")
def setup(backbone, column) -> Setup:
    prompts = [Prompt(f"prompt-{i:03d}", p, "custom") for i, p in enumerate(PROMPTS)]
    return Setup(build_pipeline(backbone), [column], prompts, [0], sampler=dict(FAST))


def plain(setup: Setup, column: Column, embeds: torch.Tensor, seeds) -> list[Image.Image]:
    return decode_embeddings(setup.pipeline, column.render.projection, embeds, seeds, **FAST)


def test_variations_decode_the_image_embedding_with_new_noise(setup, column, tmp_path):
    picture = Variations(num_variations=3).run(setup)
    assert len(picture.images) == len(PROMPTS) * (1 + 3) and len(picture.rows) == len(PROMPTS)
    assert list(picture.columns) == ["input", "#1", "#2", "#3"]
    source, varied = picture.images[0].image, picture.images[1:4]
    # At the variation's own seed it is exactly the decode of the input's image-tower embedding (no other noise).
    embedding = column.render.encode([source])
    for row in varied:
        # Close, not equal: the tool encodes and decodes in batches, this check one image at a time, and on several
        # threads a batched convolution rounds differently (a pixel or two move by a level or two).
        assert nearly_same(row.image, plain(setup, column, embedding, [row.seed])[0])
    assert [r.seed for r in varied] == [1, 2, 3] and not same(varied[0].image, varied[1].image)
    # A given image file is encoded instead of the column's own image.
    source.save(tmp_path / "input.png")
    given = Variations(num_variations=1, image=str(tmp_path / "input.png")).run(setup)
    assert len(given.images) == len(PROMPTS) * 2


def test_interpolating_two_prompts_ends_at_their_plain_decodes(setup, column):
    picture = Interpolation(steps=3, between="prompts").run(setup)
    assert len(picture.images) == 3 and picture.rows == [f"unclip: {PROMPTS[0]} -> {PROMPTS[1]}"]
    strip = [r.image for r in picture.images]
    ends = column.render(PROMPTS, [0, 0], **FAST)  # the column's own images: prior sample -> decoder
    assert same(strip[0], ends[0]) and same(strip[2], ends[1])
    assert not same(strip[1], strip[0]) and not same(strip[1], strip[2])


def test_interpolating_two_images_ends_at_the_decodes_of_their_embeddings(setup, column, tmp_path):
    files = []
    for k, colour in enumerate(["red", "blue"]):
        files.append(tmp_path / f"{colour}.png")
        Image.new("RGB", (32, 32), colour).save(files[-1])
    picture = Interpolation(steps=4, images=[str(f) for f in files]).run(setup)
    assert len(picture.images) == 4 and len(picture.rows) == 1
    embeds = column.render.encode([Image.open(f) for f in files])
    ends = plain(setup, column, embeds, [0, 0])
    assert same(picture.images[0].image, ends[0]) and same(picture.images[-1].image, ends[1])


def test_a_text_diff_starts_at_the_prompts_own_image(setup, column):
    picture = TextDiffs("one red circle", "one blue circle", strengths=[0.0, 0.5, 1.0]).run(setup)
    assert len(picture.images) == 3 * len(PROMPTS) and list(picture.columns) == ["s=0", "s=0.5", "s=1"]
    own = column.render([PROMPTS[0]], [0], **FAST)[0]
    assert same(picture.images[0].image, own) and not same(picture.images[2].image, own)
    assert picture.images[0].info["method"].startswith("slerp")


def test_best_of_n_reranks_an_unclip_column(setup):
    class Brightest:
        def score(self, images, prompts):
            return [float(np.asarray(image).mean()) for image in images]

    picture = BestOfN(Brightest(), n=2).run(setup)
    assert len(picture.images) == len(PROMPTS) * (2 + 2)


def test_what_an_unclip_column_cannot_do_is_an_error_naming_it(setup, backbone):
    with pytest.raises(ValueError, match="unCLIP column.*tool.between=prompts"):
        Interpolation(steps=2).run(setup)
    with pytest.raises(ValueError, match="noise_to_seed"):
        Interpolation(steps=2, between="prompts", noise_to_seed=3).run(setup)
    pixelsnail = Column("pixelsnail", None, {"kind": "pixelsnail"}, render=lambda prompts, seeds, **_: [])
    with pytest.raises(ValueError, match="column 'pixelsnail'.*neither a text conditioning nor an image embedding"):
        Variations().run(Setup(setup.pipeline, [pixelsnail], setup.prompts, [0], sampler=dict(FAST)))
    stock = Column("stock", None, {"kind": "unclip_stock"}, render=lambda prompts, seeds, **_: [])
    with pytest.raises(ValueError, match=r"column 'stock'.*leave it out \(unclip=null\)"):
        Variations().run(Setup(setup.pipeline, [stock], setup.prompts, [0], sampler=dict(FAST)))
    no_tower = Column("unclip", None, {}, render=type(setup.columns[0].render)(backbone, None, None))
    with pytest.raises(ValueError, match="no image tower"):
        no_tower.render.encode([Image.new("RGB", (8, 8))])


@pytest.mark.parametrize(
    "tool, overrides, images",
    [
        ("variations", ["tool.num_variations=2"], 2 * 3),
        ("interpolate", ["tool.between=prompts", "tool.steps=3", "include_base=false"], 3),
        ("text_diff", ["tool.strengths=[0,1]", "include_base=false"], 2 * 2),
    ],
)
def test_explore_runs_each_tool_on_an_unclip_export(
    tmp_path, cache_dir, tiny_sd, tiny_llm, export, tool, overrides, images
):
    overrides = [
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path}/run",
        "backbone=tiny",
        "llm=tiny",
        "sampler.num_inference_steps=2",
        "sampler.resolution=32",
        "device=cpu",
        f"unclip={export}",
        f"tool={tool}",
        *overrides,
    ]
    if tool == "variations":
        overrides.append("include_base=false")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="explore", overrides=overrides)
    written = explore(cfg, overrides=[])
    manifest = json.loads(Path(written["manifest"]).read_text())
    assert len(manifest["images"]) == images and {row["column"] for row in manifest["images"]} == {"unclip"}
