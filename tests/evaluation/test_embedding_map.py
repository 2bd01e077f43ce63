"""The embedding map: CLIP(simple), connector(simple) and CLIP(complex) in 2-D, and the distances to CLIP(complex)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.data.synthetic import COLORS
from sur_lightning.embedding_map import embedding_map
from sur_lightning.evaluation.embeddings import distances_to, represent, suite_states
from sur_lightning.generation.columns import Column, complex_prompt_column
from sur_lightning.generation.conditioning import ClipConditioning, ConnectorConditioning, frozen_text_features
from sur_lightning.models.connectors import save_connector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
SPLITS = ["adapter_train", "held_out_combinations", "held_out_objects"]


def compose_map(tmp_path, cache_dir, *overrides):
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path}/run",
        "backbone=tiny",
        "llm=tiny",
        "device=cpu",
        "toyworld_suite.per_split=2",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="embedding_map", overrides=[*base, *overrides])


def test_the_command_writes_the_maps_and_one_point_per_prompt_and_method(
    tmp_path, cache_dir, tiny_sd, tiny_llm, backbone, capsys
):
    torch.manual_seed(0)
    sur = SURAdapter(dim=32, llm_dim=32, eta=FixedEta(0.5), num_heads=4, ff_dim=32, dropout=0.0, zero_init_output=False)
    adapter, _ = save_connector(sur.eval(), tmp_path / "sur.safetensors")
    cfg = compose_map(tmp_path, cache_dir, f"adapters=[{adapter}]")
    report = embedding_map(cfg)
    run = Path(cfg.paths.output_dir)

    for name in ("pca.png", "tsne.png"):
        image = Image.open(run / name)
        assert image.size[0] > 3 * 200 and np.asarray(image.convert("L")).std() > 0  # three panels, something drawn
    written = json.loads((run / "embedding_map.json").read_text())
    assert written["mean_distance"] == report["mean_distance"]
    points = written["points"]
    prompts = list(dict.fromkeys((p["prompt_id"], p["split"]) for p in points))
    assert [split for _, split in prompts] == [s for s in SPLITS for _ in range(2)]  # the toy world's three splits
    methods = ["base", "sur", "base+complex"]
    assert sorted((p["prompt_id"], p["method"]) for p in points) == sorted((i, m) for i, _ in prompts for m in methods)
    assert all(len(p["pca"]) == len(p["tsne"]) == 2 for p in points)
    assert written["settings"]["tsne_perplexity"] == pytest.approx((18 - 1) / 3)
    assert written["methods"]["sur"]["adapter"] == str(adapter) and written["methods"]["base"]["tokens"] == 77

    # The distances: the base's is recomputed here from the backbone; the adapter moves its points.
    by = {(p["method"], p["prompt_id"]): p for p in points}
    first = by[("base", prompts[0][0])]
    simple, complex_ = backbone.encode_prompt([first["prompt"], first["complex"]]).mean(dim=1)
    assert first["distance_to_complex"] == pytest.approx(float(torch.linalg.norm(simple - complex_)), rel=1e-4)
    for prompt_id, _ in prompts:
        assert by[("sur", prompt_id)]["distance_to_complex"] != pytest.approx(
            by[("base", prompt_id)]["distance_to_complex"]
        )
    for method in ("base", "sur"):
        for split in SPLITS:
            values = [p["distance_to_complex"] for p in points if p["method"] == method and p["split"] == split]
            assert written["mean_distance"][method][split] == pytest.approx(np.mean(values))
    assert set(written["mean_distance"]) == {"base", "sur"}
    assert all(p["color"] in COLORS for p in points)  # each prompt's target colour, from the suite
    printed = capsys.readouterr().out
    assert f"{written['mean_distance']['sur']['held_out_objects']:.4f}" in printed and "held_out_objects (2)" in printed


class Echo(nn.Module):
    """A hand-made timestep-aware connector: its output is the CLIP states it is given, or (``tokens``) their
    mean over tokens repeated ``tokens`` times, as a connector with its own token count (ELLA) would give."""

    reads_token_states = False

    def __init__(self, tokens: int | None = None) -> None:
        super().__init__()
        self.tokens = tokens
        self.timesteps = []

    def forward(self, features, timesteps):
        self.timesteps += timesteps.tolist()
        clip = features.clip
        if self.tokens:
            clip = clip.mean(dim=1, keepdim=True).expand(-1, self.tokens, -1)
        return SimpleNamespace(conditioning=clip)


def test_a_connector_that_outputs_clip_complex_is_at_distance_zero(backbone):
    prompts = [
        Prompt("a", "a pair of tomatoes", "train", "two red circles", (2, "red", "circle")),
        Prompt("b", "a single lime", "train", "one green circle", (1, "green", "circle")),
        Prompt("c", "three bricks", "held", "three orange squares", (3, "orange", "square")),
    ]
    complex_column = complex_prompt_column(backbone, prompts)
    reads_complex = (
        complex_column.conditioning.text_features
    )  # simple prompt -> the CLIP features of its complex prompt
    echo, pooled = Echo(), Echo(tokens=8)
    columns = [
        Column("base", ClipConditioning(frozen_text_features(backbone))),
        Column("echo", ConnectorConditioning(echo, reads_complex)),
        Column("pooled", ConnectorConditioning(pooled, reads_complex)),
        complex_column,
    ]
    states = {c.name: suite_states(c, prompts, timestep=500, batch_size=2) for c in columns}  # two batches
    assert states["pooled"].shape[1] == 8 and states["echo"].shape[1] == 77
    assert set(echo.timesteps) == {500}
    distances = distances_to(represent(states, "mean"))
    assert set(distances) == {"base", "echo", "pooled"}
    np.testing.assert_allclose(distances["echo"], 0.0, atol=1e-5)
    np.testing.assert_allclose(distances["pooled"], 0.0, atol=1e-5)  # another token count, the same mean: 0
    assert (distances["base"] > 1e-2).all()

    with pytest.raises(ValueError, match="pooled: 8"):
        represent(states, "flatten")
    del states["pooled"]
    flat = distances_to(represent(states, "flatten"))
    np.testing.assert_allclose(flat["echo"], 0.0, atol=1e-5)
    expected = torch.linalg.norm((states["base"] - states["base+complex"]).flatten(1), dim=1).numpy()
    np.testing.assert_allclose(flat["base"], expected, rtol=1e-5)
    assert (flat["base"] > distances["base"]).all()  # positions kept: a different (larger) distance than the mean's


def test_a_wrong_adapter_path_fails_naming_it(tmp_path, cache_dir, tiny_sd, tiny_llm):
    missing = tmp_path / "no-such-run" / "adapter.safetensors"
    cfg = compose_map(tmp_path, cache_dir, f"adapters=[{missing}]")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        embedding_map(cfg)
    assert not (tmp_path / "run" / "embedding_map.json").exists()


def test_prompts_without_complex_prompts_are_refused(tmp_path, cache_dir, tiny_sd, tiny_llm):
    cfg = compose_map(tmp_path, cache_dir, "prompts=[two red circles,a pair of tomatoes]")
    with pytest.raises(ValueError, match=r"no complex prompt .*prompt-000"):
        embedding_map(cfg)


def test_points_take_the_toy_worlds_colours():
    from sur_lightning.evaluation.embeddings import point_colour

    assert point_colour(Prompt("a", "a single lime", "s", "one green circle", (1, "green", "circle"))) == tuple(
        c / 255 for c in COLORS["green"]
    )
    assert point_colour(Prompt("b", "a cyan ball", "s", "one cyan circle", (1, "cyan", "circle"))) == "cyan"
    assert point_colour(Prompt("c", "a dog", "s", "a dog")) == (0.5, 0.5, 0.5)
