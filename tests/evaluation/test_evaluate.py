"""Evaluation: the offline default runs end to end (shape accuracy, FID/KID, CLIP score on a tiny local CLIP),
a generate run's folder scores the same, missing weights stop the run naming the config key, and the
evaluation callback logs its metrics during training."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image

from sur_lightning.evaluate import evaluate
from sur_lightning.evaluation.report import log_report, markdown_table
from sur_lightning.models.connectors import save_connector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class PooledPixels(torch.nn.Module):
    """A cheap stand-in for the FID Inception (48-d pooled colours), so FID's matrix square root stays small.
    The real bundled Inception is what the offline default uses (see test_offline_default_uses_the_bundled_inception)."""

    num_features = 48

    def __init__(self, path=None):
        super().__init__()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """A tiny random open_clip model registered under a name, saved as a local checkpoint file."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "sur-eval-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("sur-eval-tiny-clip")
    torch.save(model.state_dict(), folder / "tiny-clip.pt")
    return "sur-eval-tiny-clip", str(folder / "tiny-clip.pt")


@pytest.fixture(scope="module")
def sur_adapter(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    sur = SURAdapter(dim=32, llm_dim=32, eta=FixedEta(0.5), num_heads=4, ff_dim=32, dropout=0.0, zero_init_output=False)
    path, _ = save_connector(sur, tmp_path_factory.mktemp("adapter") / "sur.safetensors")
    return path


def compose_evaluate(root: Path, cache_dir: Path, *overrides: str):
    base = [
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={root}/run",
        "backbone=tiny",
        "llm=tiny",
        "device=cpu",
        "sampler.num_inference_steps=2",
        "sampler.resolution=32",
        "sampler.batch_size=8",
        "num_prompts=2",
        "seeds=[0,1]",
        "reference.num_images=6",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, cache_dir, tiny_sd, tiny_llm, tiny_clip_checkpoint, sur_adapter):
    name, checkpoint = tiny_clip_checkpoint
    root = tmp_path_factory.mktemp("evaluate")
    cfg = compose_evaluate(
        root,
        cache_dir,
        f"adapters=[{sur_adapter}]",
        "metrics.compute=[shapes,fid,clip]",
        f"metrics.clip.model={name}",
        f"metrics.clip.pretrained={checkpoint}",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sur_lightning.evaluation.metrics.fid.InceptionFeatures", PooledPixels)
        return cfg, evaluate(cfg)


def test_offline_default_uses_the_bundled_inception(tmp_path, cache_dir):
    from sur_lightning.config import evaluator_arguments
    from sur_lightning.evaluation.evaluator import Evaluator
    from sur_lightning.evaluation.metrics.fid import InceptionFeatures

    cfg = compose_evaluate(tmp_path, cache_dir, "reference.num_images=2")
    assert list(cfg.metrics.compute) == ["shapes", "fid"] and cfg.metrics.fid.inception is None
    evaluator = Evaluator(**evaluator_arguments(cfg))
    assert isinstance(evaluator.distribution.feature, InceptionFeatures)
    assert evaluator.reference_features.shape == (2, 2048)


def test_offline_default_scores_base_and_adapter(offline_run):
    cfg, report = offline_run
    assert list(report["columns"]) == ["base", "sur"]
    for summary in report["columns"].values():
        assert set(summary) == {
            "count_accuracy",
            "color_accuracy",
            "shape_accuracy",
            "shape_exact",
            "valid_image",
            "fid",
            "kid_mean",
            "kid_std",
            "clip_score",
            "clip_truncated",
        }
        assert all(
            0 <= summary[k] <= 1
            for k in ("count_accuracy", "color_accuracy", "shape_accuracy", "shape_exact", "valid_image")
        )
        assert 0 <= summary["clip_score"] <= 100 and summary["clip_truncated"] == 0
        assert math.isfinite(summary["fid"]) and summary["fid"] > 0 and math.isfinite(summary["kid_mean"])
    # Noise from a random UNet is far from drawn shapes: KID is clearly positive.
    assert report["columns"]["base"]["kid_mean"] > 0.01
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "report.json").read_text())
    assert saved["columns"] == report["columns"] and len(saved["images"]) == 2 * 2 * 2
    assert saved["images"][0]["prompt"] and "clip_score" in saved["images"][0]
    table = (run / "report.md").read_text()
    assert "| base |" in table and "| sur |" in table and "kid_mean" in table
    assert (run / "manifest.json").exists() and (run / "grid.png").exists()


def test_scores_of_a_generate_folder_match(offline_run, tmp_path, cache_dir, tiny_clip_checkpoint, monkeypatch):
    monkeypatch.setattr("sur_lightning.evaluation.metrics.fid.InceptionFeatures", PooledPixels)
    cfg, report = offline_run
    name, checkpoint = tiny_clip_checkpoint
    again = compose_evaluate(
        tmp_path,
        cache_dir,
        f"images_dir={cfg.paths.output_dir}",
        "metrics.compute=[shapes,fid,clip]",
        f"metrics.clip.model={name}",
        f"metrics.clip.pretrained={checkpoint}",
    )
    columns = evaluate(again)["columns"]
    assert list(columns) == list(report["columns"])
    for name, summary in columns.items():
        assert summary == pytest.approx(report["columns"][name], rel=1e-4)


def test_checker_captions_through_evaluate_on_a_generate_folder(offline_run, tmp_path, cache_dir):
    cfg, _ = offline_run
    again = compose_evaluate(
        tmp_path,
        cache_dir,
        f"images_dir={cfg.paths.output_dir}",
        "metrics.compute=[shapes,checker_captions]",
        "metrics.captions.meteor=false",
    )
    report = evaluate(again)
    for summary in report["columns"].values():
        assert {"checker_bleu_1", "checker_bleu_4", "checker_rouge1_f", "checker_rougeL_f"} <= set(summary)
        assert "checker_meteor" not in summary
    assert all(isinstance(row["checker_caption"], str) and row["checker_caption"] for row in report["images"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["metrics.compute=[clip]", "metrics.clip.pretrained=/nowhere/clip.safetensors"], "metrics.clip.pretrained"),
        (
            ["metrics.compute=[diversity]", "metrics.lpips.backbone_weights=/nowhere/alexnet.pth"],
            "metrics.lpips.backbone_weights",
        ),
        (["metrics.compute=[fid]", "metrics.fid.inception=/nowhere/default_1.pt"], "metrics.fid.inception"),
        (["metrics.compute=[captions]", "metrics.captioner.model=/nowhere/blip"], "metrics.captioner.model"),
        (
            ["metrics.compute=[checker_captions]", "metrics.captions.wordnet=/nowhere/wordnet"],
            "metrics.captions.wordnet",
        ),
    ],
)
def test_missing_weights_stop_the_run_before_generating(tmp_path, cache_dir, overrides, key):
    cfg = compose_evaluate(tmp_path, cache_dir, *overrides)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        evaluate(cfg)
    assert not (tmp_path / "run" / "images").exists()


def test_bad_metric_requests_are_config_errors(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(compose_evaluate(tmp_path, cache_dir, "metrics.compute=[fidd]"))
    with pytest.raises(ValueError, match="2 seeds"):
        evaluate(compose_evaluate(tmp_path, cache_dir, "metrics.compute=[diversity]", "seeds=[0]"))


def test_report_goes_to_loggers_with_an_image_table():
    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.generation.pipeline import Rendered

    class TableLogger:
        def __init__(self):
            self.metrics, self.tables = [], []

        def log_metrics(self, metrics, step):
            self.metrics.append((metrics, step))

        def log_table(self, key, columns, data):
            self.tables.append((key, columns, data))

    prompt = Prompt("p0", "two red circles", "shapes")
    rendered = [Rendered("base", prompt, 0, Image.new("RGB", (8, 8)), "images/base/p0_seed0.png")]
    report = {
        "columns": {"base": {"kid_mean": 0.5}},
        "images": [
            {
                "column": "base",
                "prompt_id": "p0",
                "prompt": prompt.prompt,
                "category": "shapes",
                "seed": 0,
                "file": "images/base/p0_seed0.png",
                "shape_exact": 0.0,
            }
        ],
    }
    logger = TableLogger()
    log_report([logger], report, rendered, step=3)
    assert logger.metrics == [({"eval/base/kid_mean": 0.5}, 3)]
    key, columns, data = logger.tables[0]
    assert key == "eval/images" and columns[0] == "image" and "shape_exact" in columns and len(data) == 1
    assert markdown_table(report["columns"]).splitlines()[2] == "| base | 0.5000 |"


def test_evaluation_callback_logs_metrics_during_training(compose, monkeypatch):
    from sur_lightning.train import train

    monkeypatch.setattr("sur_lightning.evaluation.metrics.fid.InceptionFeatures", PooledPixels)
    cfg = compose(
        "+experiment=sur_demo",
        "callbacks=with_evaluation",
        "+trainer.fast_dev_run=true",
        "callbacks.evaluation.num_prompts=2",
        "callbacks.evaluation.num_inference_steps=2",
        "callbacks.evaluation.resolution=32",
        "callbacks.evaluation.reference_size=6",
    )
    metrics = train(cfg)
    assert {"eval/base/kid_mean", "eval/adapter/kid_mean", "eval/adapter/shape_exact"} <= set(metrics)
    output = Path(cfg.paths.output_dir)
    step = json.loads((output / "evaluation" / "step000001.json").read_text())
    assert set(step["columns"]) == {"base", "adapter"} and len(step["images"]) == 2 * 2 * 2
    assert "eval/adapter/kid_mean" in json.loads((output / "metrics.json").read_text())


def fake_run(
    log_dir: Path, task: str, stamp: str, connector: torch.nn.Module, choices: dict, components: dict | None = None
) -> Path:
    """A training run folder as train.py leaves it: adapter files and Hydra's .hydra/{config,hydra}.yaml
    (``components``: the run config's backbone/llm nodes)."""
    import yaml

    run = log_dir / task / "runs" / stamp
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": task, **(components or {})}))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    path, _ = save_connector(connector, run / "adapter.safetensors")
    return path


def test_adapter_columns_are_named_by_connector_and_experiment_not_by_timestamp(tmp_path):
    from sur_lightning.generation.columns import adapter_entries
    from sur_lightning.models.connectors.ella import TimestepAwareSemanticConnector

    sur = SURAdapter(dim=16, llm_dim=8, eta=FixedEta(0.1), num_heads=2, ff_dim=16)
    ella = TimestepAwareSemanticConnector(
        dim=16, llm_dim=8, num_blocks=1, num_heads=2, num_latents=4, time_channels=8, time_embed_dim=16
    )
    first = fake_run(tmp_path, "demo", "2026-11-24_00-10-04", sur, {})
    second = fake_run(tmp_path, "demo", "2026-11-25_09-00-00", sur, {})
    tsc = fake_run(tmp_path, "ella_demo", "2026-11-24_00-10-04", ella, {})
    assert [name for name, _ in adapter_entries([str(tsc), str(first)])] == ["ella_demo", "sur-demo"]
    # The run folder tells two runs of one experiment apart; the user's own keys are kept as given.
    assert [name for name, _ in adapter_entries([str(first), str(second)])] == [
        "sur-demo (2026-11-24_00-10-04)",
        "sur-demo (2026-11-25_09-00-00)",
    ]
    assert [name for name, _ in adapter_entries({"mine": str(first)})] == ["mine"]
    # A misspelt setting is an error naming the adapter and the key, not a setting silently ignored.
    with pytest.raises(ValueError, match=r"adapter 'mine': unknown keys \['varient_mean'\]"):
        adapter_entries({"mine": {"path": str(first), "varient_mean": True}})
    with pytest.raises(ValueError, match="adapter 'mine': no path"):
        adapter_entries({"mine": {"mode": "replace"}})


def test_evaluate_accepts_a_training_preset_and_picks_its_latest_adapter(tmp_path, capsys):
    import os

    from sur_lightning.evaluate import preset_overrides

    sur = SURAdapter(dim=16, llm_dim=8, eta=FixedEta(0.1), num_heads=2, ff_dim=16)
    choices = {"backbone": "toy", "llm": "smollm2", "data": "toyworld", "connector": "sur"}
    toy = {
        "backbone": {
            "_target_": "sur_lightning.models.backbone.StableDiffusionBackbone",
            "pretrained": {"_target_": "sur_lightning.toyworld.shipped_base", "folder": None},
        }
    }
    old = fake_run(tmp_path, "demo", "2026-11-24_00-10-04", sur, choices, toy)
    new = fake_run(tmp_path, "demo", "2026-11-25_09-00-00", sur, choices, toy)
    os.utime(old, (1, 1))
    args = preset_overrides(["+experiment=demo", "seeds=[0]"], tmp_path)
    assert args == [f"adapters=['{new}']", "+suite=toyworld", "seeds=[0]"]
    # The README's toy-world commands add the suite themselves: it is not added twice.
    assert preset_overrides(["+experiment=demo", "+suite=toyworld"], tmp_path) == [
        f"adapters=['{new}']",
        "+suite=toyworld",
    ]
    # The overrides compose into a toy-world evaluation of that adapter.
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=args)
    assert list(cfg.adapters) == [str(new)] and cfg.toyworld_suite.splits[0] == "adapter_train"
    # ... with the backbone the run recorded.
    from sur_lightning.config import use_recorded
    from sur_lightning.generation.columns import adapter_records

    assert use_recorded(cfg, adapter_records(cfg.adapters), args) == [
        f"backbone: shipped_base(folder=None) (recorded by {new}; set backbone=... to choose another)"
    ]
    assert "toyworld" in str(cfg.backbone.pretrained._target_)
    with pytest.raises(SystemExit, match=r"no trained adapter under .*sur_paper.*adapters=\["):
        preset_overrides(["+experiment=sur_paper"], tmp_path)


# ---------------------------------------------------------------- toy-world report: valid images, gap intervals


def toy_rows(column: str, split: str, correct: list[int], valid: list[int] | None = None, counts=None, offset=0):
    """Per-image rows as score_columns writes them: one prompt per value, seed 0; colour and shape right
    where ``correct``, count always right."""
    valid = valid or [1] * len(correct)
    counts = counts or [1] * len(correct)
    return [
        {
            "column": column,
            "category": split,
            "prompt_id": f"{split}-{offset + i}",
            "seed": 0,
            "count": n,
            "color_accuracy": float(c),
            "shape_accuracy": float(c),
            "count_accuracy": 1.0,
            "valid_image": float(v),
        }
        for i, (c, v, n) in enumerate(zip(correct, valid, counts))
    ]


def test_evaluator_scores_valid_images_and_rows_carry_their_count():
    import random

    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.evaluation.evaluator import Evaluator, score_columns
    from sur_lightning.evaluation.report import split_scores
    from sur_lightning.generation.pipeline import Rendered
    from sur_lightning.toyworld import world

    rng = random.Random(0)
    targets = [(1, "red", "circle"), (2, "blue", "square"), (3, "green", "triangle")]
    prompts = [Prompt(f"p{i}", "a narrative prompt", "held_out", target=t) for i, t in enumerate(targets)]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rendered = [Rendered("base", p, 0, world.draw_example(*p.target, rng)) for p in prompts]
    rendered += [Rendered("base+complex", p, 0, world.draw_example(*p.target, rng)) for p in prompts]
    rendered += [
        Rendered("sur", p, 0, world.draw_example(*p.target, rng) if p.target[0] > 1 else noise) for p in prompts
    ]
    report = score_columns(Evaluator(["shapes"]), rendered)
    assert report["columns"]["base"]["valid_image"] == 1.0
    assert report["columns"]["sur"]["valid_image"] == pytest.approx(2 / 3)
    assert [row["count"] for row in report["images"][:3]] == [1, 2, 3]
    by_count = split_scores(report)["sur"]["held_out"]["valid_by_count"]
    assert {count: entry["valid_image"] for count, entry in by_count.items()} == {1: 0.0, 2: 1.0, 3: 1.0}
    assert "gap_closed_ci95" in report
    # Three images per split: no gap closed is stated, and report.json says why beside the None.
    assert report["gap_closed"]["sur"]["held_out"]["color_accuracy"] is None
    assert report["gap_closed_reasons"]["sur"]["held_out"]["color_accuracy"] == "n=3"


def test_split_scores_give_the_valid_rate_per_split_and_count():
    from sur_lightning.evaluation.report import gap_closed, split_scores

    rows = toy_rows("base", "a", [0, 0, 1, 1]) + toy_rows("base+complex", "a", [1, 1, 1, 1])
    rows += toy_rows("sur", "a", [1, 0, 1, 1], valid=[0, 1, 1, 1], counts=[1, 1, 2, 2])
    entry = split_scores({"images": rows})["sur"]["a"]
    assert entry["valid_image"] == 0.75 and entry["valid_image_ci95"] == pytest.approx(1.96 * (0.75 * 0.25 / 4) ** 0.5)
    assert entry["valid_by_count"][1] == {
        "valid_image": 0.5,
        "valid_image_ci95": pytest.approx(1.96 * 0.5 / 2**0.5),
        "n": 2,
    }
    assert entry["valid_by_count"][2]["valid_image"] == 1.0
    # The valid rate is not a gap metric.
    assert set(gap_closed({"images": rows})["sur"]["a"]) == {"color_accuracy", "shape_accuracy", "count_accuracy"}


def bootstrap_report(repeat: int = 1) -> dict:
    """base 1/4, base+complex 4/4, sur 3/4 right on colour and shape, each pattern ``repeat`` times over new prompts."""
    rows = []
    for r in range(repeat):
        rows += toy_rows("base", "a", [0, 0, 0, 1], offset=4 * r) + toy_rows(
            "base+complex", "a", [1, 1, 1, 1], offset=4 * r
        )
        rows += toy_rows("sur", "a", [1, 0, 1, 1], offset=4 * r) + toy_rows("same", "a", [1, 1, 1, 1], offset=4 * r)
    return {"columns": {}, "images": rows}


def test_gap_closed_intervals_bootstrap_paired_prompts():
    from sur_lightning.evaluation.report import gap_closed, gap_closed_intervals

    report = bootstrap_report(repeat=5)
    point = gap_closed(report)["sur"]["a"]["color_accuracy"]
    low, high = gap_closed_intervals(report)["sur"]["a"]["color_accuracy"]
    assert low < point < high
    assert gap_closed_intervals(report)["sur"]["a"]["count_accuracy"] is None  # no gap, no interval
    # Deterministic for a seed, and the seed is what varies it.
    assert gap_closed_intervals(report) == gap_closed_intervals(report)
    assert gap_closed_intervals(report, seed=1)["sur"]["a"] != gap_closed_intervals(report)["sur"]["a"]
    # Paired: a column that matches base+complex on every prompt closes the whole gap in every resample.
    assert gap_closed_intervals(report)["same"]["a"]["color_accuracy"] == (1.0, 1.0)
    # More prompts with the same rates: a narrower interval around the same point.
    wide = high - low
    low20, high20 = gap_closed_intervals(bootstrap_report(repeat=20))["sur"]["a"]["color_accuracy"]
    assert low20 < point < high20 and high20 - low20 < 0.7 * wide


def test_toyworld_table_shows_the_valid_rate_and_gap_intervals():
    from sur_lightning.evaluation.report import gap_closed_intervals, toyworld_table

    report = bootstrap_report(repeat=5)
    for row in report["images"]:
        if row["column"] == "sur" and row["prompt_id"] in ("a-0", "a-1"):
            row["valid_image"], row["count"] = 0.0, 3
    table = toyworld_table(report)
    assert "| valid | valid by count |" in table.splitlines()[0]
    sur = next(line for line in table.splitlines() if "| sur + simple |" in line)
    assert "| a | sur + simple | 20 | 0.75 ± 0.19 | 0.75 ± 0.19 | 1.00 ± 0.00 | 0.90 ± 0.13 | 1: 1.00, 3: 0.00 |" in sur
    low, high = gap_closed_intervals(report)["sur"]["a"]["color_accuracy"]
    assert f"| 0.67 [{low:.2f}, {high:.2f}] / 0.67 [" in sur and sur.endswith(" / – (no gap) |")


def test_small_or_inverted_or_overlapping_bounds_state_no_gap_closed():
    """Issue 32: at per_split=1 the table printed "1.00 [1.00, 1.00]" for a wrong adapter, because base + simple
    was right and base + complex wrong (inverted bounds), and one pair's bootstrap has one value."""
    from sur_lightning.evaluation.report import gap_closed, gap_closed_intervals, gap_closed_reasons, toyworld_table

    def report(base, upper, adapter, repeat):
        rows = []
        for r in range(repeat):
            rows += toy_rows("base", "a", base, offset=len(base) * r) + toy_rows(
                "base+complex", "a", upper, offset=len(base) * r
            )
            rows += toy_rows("sur", "a", adapter, offset=len(base) * r)
        return {"columns": {}, "images": rows}

    def gap_cells(table):
        return next(line for line in table.splitlines() if "| sur + simple |" in line).rsplit("|", 2)[1].strip()

    one = report([1], [0], [0], repeat=1)  # the case: n=1, inverted bounds, the adapter wrong
    assert gap_closed(one)["sur"]["a"]["color_accuracy"] is None
    assert gap_closed_reasons(one)["sur"]["a"] == {
        "color_accuracy": "n=1",
        "shape_accuracy": "n=1",
        "count_accuracy": "n=1",
    }
    assert gap_cells(toyworld_table(one)) == "– (n=1) / – (n=1) / – (n=1)"

    inverted = report([1, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], repeat=3)  # n=12: base + simple above base + complex
    assert gap_closed_reasons(inverted)["sur"]["a"]["color_accuracy"] == "bounds inverted"
    assert gap_closed_intervals(inverted)["sur"]["a"]["color_accuracy"] is None
    assert gap_cells(toyworld_table(inverted)).startswith("– (bounds inverted) / – (bounds inverted) / – (no gap)")

    overlap = report([0, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], repeat=3)  # 0.25 ± 0.24 against 0.50 ± 0.28
    assert gap_closed_reasons(overlap)["sur"]["a"]["color_accuracy"] == "bounds overlap"
    assert gap_cells(toyworld_table(overlap)).startswith("– (bounds overlap)")

    clear = report([0, 0, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1], repeat=3)  # 0.25 ± 0.24 against 1.00: a gap to close
    assert gap_closed(clear)["sur"]["a"]["color_accuracy"] == pytest.approx(2 / 3)
    assert gap_closed_reasons(clear)["sur"]["a"] == {"count_accuracy": "no gap"}
    low, high = gap_closed_intervals(clear)["sur"]["a"]["color_accuracy"]
    assert low <= 2 / 3 <= high and gap_cells(toyworld_table(clear)).startswith(f"0.67 [{low:.2f}, {high:.2f}]")


def test_checker_captions_score_any_column_against_the_complex_prompt():
    import random

    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.evaluation.evaluator import Evaluator, score_columns
    from sur_lightning.generation.pipeline import Rendered
    from sur_lightning.toyworld import world

    rng = random.Random(0)
    prompts = [
        Prompt("p0", "a pair of tomatoes", "held_out", complex="two red circles", target=(2, "red", "circle")),
        Prompt("p1", "one blue square", "train", complex="one blue square", target=(1, "blue", "square")),
    ]
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    rendered = [Rendered("pixelsnail", p, 0, world.draw_example(*p.target, rng)) for p in prompts]
    rendered += [Rendered("unclip", prompts[0], 0, world.draw_example(3, "red", "circle", rng))]
    rendered += [Rendered("unclip", prompts[1], 0, blank)]
    report = score_columns(Evaluator(["checker_captions"], captions={"meteor": False}), rendered)
    exact = report["columns"]["pixelsnail"]
    assert exact["checker_bleu_1"] == pytest.approx(1.0) and exact["checker_rougeL_f"] == pytest.approx(1.0)
    assert [row["checker_caption"] for row in report["images"]] == [
        "two red circles",
        "one blue square",
        "three red circles",
        "nothing",
    ]
    assert report["columns"]["unclip"]["checker_rouge1_f"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-6)
    assert "checker_caption" not in report["categories"]["unclip"]["held_out"]
