"""Learning curves: adapters exported at several steps, each scored, summarised over seeds with intervals."""

import json
from pathlib import Path

import pytest
import torch

from sur_lightning.evaluation.learning_curve import converged_step, exported_adapters, image_rows, score_run, summarise
from sur_lightning.train import train

SPLIT = "held_out_combinations"


def rows(values: dict[str, list[float]], split: str = SPLIT) -> list[dict]:
    """Per-image rows: one per (prompt p<i>, seed 0), with the given correctness per metric."""
    n = len(next(iter(values.values())))
    return [
        {"prompt_id": f"p{i}", "seed": 0, "category": split, **{k: v[i] for k, v in values.items()}} for i in range(n)
    ]


def test_two_step_run_exports_each_step_and_every_export_is_scored(compose, backbone):
    cfg = compose(
        "+experiment=sur_demo",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.adapter_export.at_steps=[1,2]",
        "callbacks.sample_grid=null",
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    exports = exported_adapters(run)
    assert [e["step"] for e in exports] == [1, 2]
    assert all(e["path"].exists() for e in exports)
    assert 0 < exports[0]["train_seconds"] <= exports[1]["train_seconds"]

    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.evaluation.evaluator import Evaluator, score_columns
    from sur_lightning.generation.columns import build_columns
    from sur_lightning.generation.pipeline import render_columns

    prompts = [
        Prompt("p0", "two red circles", SPLIT, "two red circles", (2, "red", "circle")),
        Prompt("p1", "one blue square", SPLIT, "one blue square", (1, "blue", "square")),
    ]
    evaluator = Evaluator(compute=["shapes"])
    scored = []

    def score_adapter(path):
        scored.append(path.name)
        (column,) = build_columns(backbone, [str(path)], include_base=False)
        column.name = "adapter"
        rendered = render_columns(backbone, [column], prompts, [0], progress=False, num_inference_steps=2)
        return image_rows(score_columns(evaluator, rendered), "adapter")

    written = []
    results = score_run(run, score_adapter, on_step=lambda step, result: written.append(step))
    assert sorted(results) == [1, 2] == written and scored == ["adapter-step1.safetensors", "adapter-step2.safetensors"]
    assert [r["prompt_id"] for r in results[2]["images"]] == ["p0", "p1"]
    assert set(results[2]["images"][0]) >= {"color_accuracy", "shape_accuracy", "count_accuracy"}
    # Resuming: steps already scored are not rendered again.
    scored.clear()
    assert score_run(run, score_adapter, done={1: results[1], 2: results[2]}) == results and scored == []
    # A row that reads fewer steps than the run exported scores only those.
    assert sorted(score_run(run, score_adapter, steps=[2])) == [2] and scored == ["adapter-step2.safetensors"]


def test_a_run_without_exports_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="exports.jsonl"):
        exported_adapters(tmp_path)
    (tmp_path / "exports.jsonl").write_text(
        '{"step": 1, "train_seconds": 1, "file": "adapter-step1.safetensors"}\n{oops\n'
    )
    with pytest.raises(ValueError, match="exports.jsonl:2"):
        exported_adapters(tmp_path)


def test_summary_gap_is_zero_at_the_base_and_one_at_the_complex_prompt_with_intervals():
    base = rows({"color_accuracy": [0, 0, 1, 0] * 8})
    upper = rows({"color_accuracy": [1, 1, 1, 0] * 8})
    runs = {
        0: {10: {"train_seconds": 2.0, "images": base}, 20: {"train_seconds": 4.0, "images": upper}},
        1: {10: {"train_seconds": 4.0, "images": base}, 20: {"train_seconds": 6.0, "images": upper}},
    }
    summary = summarise(runs, base, upper, [SPLIT], n_boot=200)
    assert summary[10]["train_seconds"] == 3.0 and summary[10]["seeds"] == 2
    assert summary[10][SPLIT]["gap_color_accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert summary[20][SPLIT]["gap_color_accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert summary[20][SPLIT]["color_accuracy"]["mean"] == 0.75
    assert summary[20][SPLIT]["color_accuracy"]["lo"] < 0.75 < summary[20][SPLIT]["color_accuracy"]["hi"]
    # No gap (base == upper): None, not a ratio of two near-equal numbers.
    assert summarise(runs, base, base, [SPLIT], n_boot=10)[20][SPLIT]["gap_color_accuracy"] is None


def test_summary_interval_holds_the_spread_between_training_seeds():
    base = rows({"color_accuracy": [0] * 32})
    upper = rows({"color_accuracy": [1] * 32})
    half = rows({"color_accuracy": [1, 0] * 16})
    runs = {0: {5: {"train_seconds": 1.0, "images": base}}, 1: {5: {"train_seconds": 1.0, "images": upper}}}
    cell = summarise(runs, base, upper, [SPLIT], n_boot=400)[5][SPLIT]["gap_color_accuracy"]
    assert cell["mean"] == 0.5 and cell["lo"] == 0.0 and cell["hi"] == 1.0  # the seeds disagree completely
    same = summarise(
        {0: {5: {"train_seconds": 1.0, "images": half}}, 1: {5: {"train_seconds": 1.0, "images": half}}},
        base,
        upper,
        [SPLIT],
        n_boot=400,
    )[5][SPLIT]["gap_color_accuracy"]
    assert same["mean"] == 0.5 and 0.2 < same["lo"] < 0.5 < same["hi"] < 0.8  # only image noise left
    # Deterministic: the bootstrap has its own seeded generator.
    assert summarise(runs, base, upper, [SPLIT], n_boot=50) == summarise(runs, base, upper, [SPLIT], n_boot=50)


def test_converged_step_is_where_the_curve_stops_moving():
    def curve(values):
        return {s: {SPLIT: {"gap": {"mean": v}}} for s, v in zip([300, 600, 1200, 2400], values)}

    assert converged_step(curve([0.0, 0.5, 0.9, 0.92]), SPLIT, "gap") == 1200
    assert converged_step(curve([0.0, 0.1, 0.3, 0.6]), SPLIT, "gap") is None
    assert converged_step(curve([0.2, 0.21, 0.2, 0.22]), SPLIT, "gap") == 300
    assert json.dumps(curve([0, 0, 0, 0]))  # plain JSON: the benchmark writes it as it is


def test_chart_gives_each_row_its_own_line_style_and_marks_undefined_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from sur_lightning.evaluation.learning_curve import chart

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    cell = {"mean": 0.5, "lo": 0.4, "hi": 0.6}
    curves = {
        f"row{i}": {
            s: {"train_seconds": s / 10, SPLIT: {"gap_color_accuracy": cell, "gap_count_accuracy": None}}
            for s in (300, 600)
        }
        for i in range(12)
    }
    path = chart(curves, [SPLIT], tmp_path / "curve.png", metrics=("gap_color_accuracy", "gap_count_accuracy"))
    assert path.stat().st_size > 0
    (fig,) = figures
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(curves)  # no axis-line labels
    drawn, undefined = fig.axes
    styles = {(line.get_color(), line.get_linestyle()) for line in drawn.lines if not line.get_label().startswith("_")}
    assert len(styles) == 12  # the default colour cycle would repeat after ten
    assert not undefined.lines and "undefined" in undefined.texts[0].get_text()
    assert [int(t) for t in drawn.get_xticks()] == [300, 600]


def test_converged_table_reads_each_row_from_its_own_file_and_names_a_missing_one(tmp_path):
    from conftest import load_experiment_script

    converged = load_experiment_script("toyworld_benchmark/converged.py", "converged")
    cell = {"mean": 0.91, "lo": 0.82, "hi": 0.98}
    entry = {"seeds": 3, "train_seconds": 577.0, **{s: {"gap_color_accuracy": cell} for s in converged.SPLITS}}
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "summary.json").write_text(json.dumps({"ella_demo": {"2400": entry, "4800": entry}}))
    (tmp_path / "summary.json").write_text(json.dumps({"sur_demo": {"2400": {**entry, "seeds": 2}}}))
    read_at = {"ella_demo": ("long/summary.json", 4800), "sur_demo": ("summary.json", 2400)}
    text = converged.table(read_at, tmp_path)
    assert "| ella_demo | 4800 | 3 | 577 | 0.91 [0.82, 0.98] | – |" in text
    assert "| sur_demo | 2400 | 2 |" in text and "`long/summary.json`, `summary.json`" in text
    # Flat from 2,400 on both held-out splits (the two steps agree); one step says nothing.
    assert text.splitlines()[4].endswith("| 2400 / 2400 |") and text.splitlines()[5].endswith("| – |")
    assert list(converged.curves(read_at, tmp_path)["ella_demo"]) == [2400, 4800]
    with pytest.raises(KeyError, match="summary.json has no row 'ella_demo' at step 1200"):
        converged.table({"ella_demo": ("long/summary.json", 1200)}, tmp_path)


# ------------------------------------------------------------------ split seeds: several worlds pooled


def world_runs(adapter: list[float], seeds: int = 2):
    """One world: every training seed scores ``adapter`` per prompt at step 100; the base scores 0, complex 1."""
    run = {100: {"train_seconds": 10.0, "images": rows({"color_accuracy": adapter})}}
    return (
        {s: run for s in range(seeds)},
        rows({"color_accuracy": [0.0] * len(adapter)}),
        rows({"color_accuracy": [1.0] * len(adapter)}),
    )


def test_pooling_weighs_each_world_equally_and_names_the_worst_one():
    from sur_lightning.evaluation.learning_curve import summarise_pooled

    easy, hard = world_runs([1.0] * 8), world_runs([1.0, 0.0, 0.0, 0.0])
    pooled = summarise_pooled({0: easy, 3: hard}, [SPLIT], n_boot=200)[100]
    assert pooled["split_seeds"] == 2 and pooled["seeds"] == 4
    # Equal weights although world 0 has twice the prompts: (1.0 + 0.25) / 2.
    gap = pooled[SPLIT]["gap_color_accuracy"]
    assert gap["mean"] == pytest.approx(0.625) and gap["lo"] < 0.625 < gap["hi"]
    assert pooled["worst"][SPLIT]["gap_color_accuracy"] == {"split_seed": 3, "mean": pytest.approx(0.25)}
    # One world pooled is that world's own summary.
    alone = summarise_pooled({0: hard}, [SPLIT], n_boot=200)[100][SPLIT]["gap_color_accuracy"]["mean"]
    assert alone == pytest.approx(summarise(*hard, [SPLIT], n_boot=200)[100][SPLIT]["gap_color_accuracy"]["mean"])


def test_breakdown_groups_one_splits_images():
    from sur_lightning.evaluation.learning_curve import breakdown
    from sur_lightning.toyworld.world import prompt_object

    images = [
        {
            "prompt_id": "held_out_objects-pine_tree-2-t0",
            "seed": 0,
            "category": "held_out_objects",
            "color_accuracy": 1.0,
        },
        {
            "prompt_id": "held_out_objects-pine_tree-3-t1",
            "seed": 1,
            "category": "held_out_objects",
            "color_accuracy": 0.0,
        },
        {"prompt_id": "held_out_objects-cherry-1-t0", "seed": 0, "category": "held_out_objects", "color_accuracy": 1.0},
        {
            "prompt_id": "held_out_combinations-tomato-2-t0",
            "seed": 0,
            "category": "held_out_combinations",
            "color_accuracy": 0.0,
        },
    ]
    assert breakdown(images, prompt_object, "held_out_objects") == {
        "cherry": {"images": 1, "color_accuracy": 1.0},
        "pine tree": {"images": 2, "color_accuracy": 0.5},
    }
    with pytest.raises(ValueError, match="not a toy-world prompt id"):
        prompt_object("p0")


def test_the_benchmark_report_pools_worlds_and_breaks_held_out_objects_down(tmp_path):
    from argparse import Namespace

    from conftest import load_experiment_script

    run = load_experiment_script("toyworld_benchmark/run.py", "toyworld_benchmark_run")

    def world(split_seed: int, correct: float) -> dict:
        images = []
        for obj in run.held_out_objects(split_seed):
            for count in (1, 2):
                images.append(
                    {
                        "prompt_id": f"held_out_objects-{obj.replace(' ', '_')}-{count}-t0",
                        "seed": 0,
                        "category": "held_out_objects",
                        "color_accuracy": correct,
                        "shape_accuracy": 1.0,
                        "count_accuracy": 1.0,
                        "valid_image": 1.0,
                    }
                )
        base = [{**r, "color_accuracy": 0.0, "shape_accuracy": 0.0} for r in images]
        return {
            "base": {
                "base": base,
                "base+complex": images
                if correct == 1.0
                else [{**r, "color_accuracy": 1.0, "valid_image": 0.0} for r in images],
            },
            "runs": {"ella_demo": {0: {2400: {"train_seconds": 5.0, "images": images}}}},
        }

    results = {"splits": {0: world(0, 1.0), 3: world(3, 0.0)}}
    run.save_results(tmp_path / "results.json", results)
    assert run.load_results(tmp_path / "results.json") == results  # int keys survive JSON
    # --seeds as --report-only defaults it: the table names the seeds the results hold.
    args = Namespace(split_seeds=[0, 3], seeds=[0, 1, 2], eval_steps=15, guidance_scale=4.0)
    curves = run.pooled_summaries(results, ["ella_demo"], [0, 3])
    text = run.pooled_markdown(curves, results, args)
    assert "training seeds [0]," in text
    assert "0: cherry, emerald, orange, sapphire; 3: grape, lemon, pine tree, traffic cone" in text
    assert "| ella_demo | 2400 | 2 | 2 | 0.50 [" in text and "0.00 (split 3)" in text
    assert "| pine tree | triangle | green | 3 | 2 | 0.00 | 1.00 | 1.00 | 1.00 |" in text
    assert "| circle | cherry, grape, lemon, orange | 8 | 0.50 |" in text
    # The base's bounds, each world weighted equally: world 3's complex-prompt images are all invalid.
    assert "| held_out_objects | 0.00 / 0.00 / 1.00 / 1.00 | 1.00 / 1.00 / 1.00 / 0.50 |" in text
    # A results file from before split seeds were an axis reads as split seed 0's.
    (tmp_path / "old.json").write_text(json.dumps({"base": None, "runs": {"ella": {"1": {"300": {}}}}}))
    assert run.load_results(tmp_path / "old.json") == {"splits": {0: {"base": None, "runs": {"ella": {1: {300: {}}}}}}}
    # The covering split seeds hold out each of the 20 objects exactly once.
    held = [o for s in run.COVERING_SPLIT_SEEDS for o in run.held_out_objects(s)]
    assert len(held) == len(set(held)) == 20


def test_a_benchmark_run_checkpoints_often_enough_to_resume_and_is_scored_at_each_step(tmp_path):
    import argparse

    from conftest import load_experiment_script

    run = load_experiment_script("toyworld_benchmark/run.py", "toyworld_benchmark_run")
    args = argparse.Namespace(threads=1, cache=tmp_path / "cache")
    cfg = run.compose("ella_unseen_objects", [], tmp_path / "run", args, seed=0, steps=[1200, 2400, 4800], split_seed=3)
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == run.CHECKPOINT_EVERY == 200
    assert cfg.callbacks.adapter_export.at_steps == [1200, 2400, 4800]
    assert (cfg.trainer.max_steps, cfg.data.root.seed) == (4800, 3)
    # A budget shorter than the interval still leaves a checkpoint at its first scored step.
    short = run.compose("ella_demo", [], tmp_path / "short", args, seed=0, steps=[100, 150], split_seed=0)
    assert short.callbacks.model_checkpoint.every_n_train_steps == 100


def test_the_text_encoder_ablation_rows_differ_from_the_demo_recipe_in_the_text_model_alone(compose):
    from conftest import load_experiment_script
    from omegaconf import OmegaConf

    run = load_experiment_script("toyworld_benchmark/run.py", "toyworld_benchmark_run")
    reference = OmegaConf.to_container(compose("+experiment=ella_demo", tiny=False))
    for row in ("ella_minilm", "ella_base_clip", "ella_random_llm"):
        preset, overrides, _ = run.ROWS[row]
        cfg = OmegaConf.to_container(compose(f"+experiment={preset}", *overrides, tiny=False))
        changed = {k for k in reference if reference[k] != cfg[k]}
        assert changed == {"llm"}, (row, changed)
        # Token states for ELLA, whichever text model: set, or chosen by the connector (conf/llm/minilm.yaml).
        assert cfg["llm"]["pooling"] == "none" or "llm_pooling" in cfg["llm"]["pooling"]


def test_each_unseen_object_remedy_row_changes_one_thing_of_the_preset(compose):
    from conftest import load_experiment_script
    from omegaconf import OmegaConf

    run = load_experiment_script("toyworld_benchmark/run.py", "toyworld_benchmark_run")
    # The recipe the remedies were measured against: the preset with one wording per fact.
    reference = OmegaConf.to_container(compose("+experiment=ella_unseen_objects", *run.ONE_WORDING, tiny=False))
    assert run.ROWS["ella_unseen_objects"] == (
        "ella_unseen_objects",
        run.ONE_WORDING,
        run.ROWS["ella_unseen_objects"][2],
    )
    # The row that adds the wordings trains the preset as it stands and reads it as variant 0 alone; the preset
    # reads the mean over variants, which the row scored from the wordings row's runs measures.
    preset, overrides, _ = run.ROWS["ella_unseen_objects_wordings"]
    wordings = OmegaConf.to_container(compose(f"+experiment={preset}", *overrides, tiny=False))
    now = OmegaConf.to_container(compose("+experiment=ella_unseen_objects", tiny=False))
    assert (now["llm"]["rag"]["variant_mean"], wordings["llm"]["rag"]["variant_mean"]) == (True, False)
    wordings["llm"]["rag"]["variant_mean"] = True
    assert wordings == now
    expected = {
        "ella_unseen_objects_balanced": ("data", "balance_by", "shape"),
        "ella_unseen_objects_k7": ("llm", "rag", 7),
        "ella_unseen_objects_4blocks": ("connector", "num_blocks", 4),
        "ella_unseen_objects_wordings": ("llm", "rag", True),
    }
    # Rows scored from another row's runs name a trained row and build_columns' own keywords.
    import inspect

    from sur_lightning.generation.columns import build_columns

    assert run.SCORED_FROM["ella_unseen_objects_variant_mean"] == (
        "ella_unseen_objects_wordings",
        {"variant_mean": True},
    )
    for trained, settings in run.SCORED_FROM.values():
        assert trained in run.ROWS and trained not in run.SCORED_FROM
        inspect.signature(build_columns).bind_partial(**settings)
    for row, (group, key, value) in expected.items():
        preset, overrides, _ = run.ROWS[row]
        cfg = OmegaConf.to_container(compose(f"+experiment={preset}", *overrides, tiny=False))
        changed = {k for k in reference if reference[k] != cfg[k]}
        # (conf/data reads name_variants from llm.rag by interpolation: unresolved, the data node is unchanged.)
        assert changed == {group}, (row, changed)
        found = cfg[group][key]["name_variants" if value == 7 else "vary_wording"] if key == "rag" else cfg[group][key]
        assert found == value, row


def test_the_across_worlds_table_shows_the_pooled_gap_beside_the_worst_world_and_names_what_is_missing(tmp_path):
    from conftest import load_experiment_script

    converged = load_experiment_script("toyworld_benchmark/converged.py", "toyworld_benchmark_converged")
    cell = {"mean": 0.5, "lo": 0.4, "hi": 0.6}
    entry = {
        "seeds": 6,
        "split_seeds": 3,
        "worst": {
            split: {"gap_color_accuracy": {"split_seed": 3, "mean": 0.1}, "gap_shape_accuracy": {}}
            for split in converged.HELD_OUT
        },
        **{
            split: {"gap_color_accuracy": cell, "gap_shape_accuracy": cell, "valid_image": cell}
            for split in converged.HELD_OUT
        },
    }
    (tmp_path / "s.json").write_text(json.dumps({"row_a": {"4800": entry}}))
    text = converged.across_worlds_table({"row_a": ("s.json", 4800), "row_b": ("t.json", 2400)}, tmp_path)
    assert (
        "| row_a | 4800 | 3 | 6 | 0.50 [0.40, 0.60] (0.10, world 3) | 0.50 [0.40, 0.60] | 0.50 [0.40, 0.60] |" in text
    )
    assert "Not measured yet: `row_b` (t.json, step 2400)." in text
    # One row read at two budgets: "<row>@<label>" names the row in its summary.
    (tmp_path / "u.json").write_text(json.dumps({"row_a": {"9600": entry}}))
    text = converged.across_worlds_table({"row_a@9600": ("u.json", 9600)}, tmp_path)
    assert "| row_a@9600 | 9600 | 3 | 6 | 0.50 [0.40, 0.60] (0.10, world 3) |" in text


def test_the_encoder_spread_reads_the_last_two_real_tokens_and_measures_how_alike_objects_read():
    from conftest import load_experiment_script

    diagnostic = load_experiment_script("toyworld_benchmark/encoder_spread.py", "toyworld_encoder_spread")
    same = diagnostic.spread(torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]))
    assert same["cosine"] == pytest.approx(1.0) and same["spread"] == pytest.approx(0.0)
    # Two orthogonal states: cosine 0; each lies sqrt(0.5) from their mean, whose norm is sqrt(0.5).
    apart = diagnostic.spread(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert apart["cosine"] == pytest.approx(0.0) and apart["spread"] == pytest.approx(1.0)

    states = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    pooled = diagnostic.object_states(lambda prompts: (states, mask), ["a", "b"])
    # Row 0: tokens 1 and 2 (token 3 is padding); row 1: tokens 2 and 3.
    assert pooled.squeeze(-1).tolist() == [1.5, 6.5]
