"""experiments/toyworld_benchmark/caption_back.py: the checker's caption of each kept benchmark image, scored against
its complex prompt per split, read at a row's last step or the one asked for."""

import json
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "toyworld_benchmark"))

import caption_back

from sur_lightning.toyworld.world import draw_example

REFERENCES = {
    "held_out_objects-cherry-2-t0": ("held_out_objects", "two red circles"),
    "held_out_combinations-lime-1-t0": ("held_out_combinations", "one green circle"),
}


def results_folder(root: Path) -> Path:
    """One world, base columns and row ``r`` (seed 0) scored at steps 10 and 20; step 20 draws both prompts right,
    step 10 draws the held-out object as three blue squares; the base draws nothing."""
    run = root / "split0" / "runs" / "r" / "seed0" / "eval"
    drawings = {
        20: {
            "held_out_objects-cherry-2-t0": (2, "red", "circle"),
            "held_out_combinations-lime-1-t0": (1, "green", "circle"),
        },
        10: {
            "held_out_objects-cherry-2-t0": (3, "blue", "square"),
            "held_out_combinations-lime-1-t0": (1, "green", "circle"),
        },
    }
    for step, targets in drawings.items():
        folder = run / f"adapter-step{step}" / "images" / "adapter"
        folder.mkdir(parents=True)
        for prompt_id, target in targets.items():
            draw_example(*target, random.Random(prompt_id)).save(folder / f"{prompt_id}_seed0.png")
    for column in caption_back.BASE_COLUMNS.values():
        folder = root / "split0" / "base" / "images" / column
        folder.mkdir(parents=True)
        for prompt_id in REFERENCES:
            Image.new("RGB", (64, 64), "white").save(folder / f"{prompt_id}_seed0.png")
    scored = {"train_seconds": 1.0, "images": []}
    (root / "results.json").write_text(
        json.dumps({"splits": {"0": {"base": {}, "runs": {"r": {"0": {"10": scored, "20": scored}}}}}})
    )
    return root


def test_rows_are_read_at_their_last_step_unless_asked_and_captions_score_against_the_complex_prompt(tmp_path):
    results = results_folder(tmp_path / "results")
    pairs, read_at = caption_back.collect([results], {}, lambda split_seed: REFERENCES)
    assert read_at["r"] == {"step": 20, "seeds": {0}, "worlds": {0}}
    assert pairs["r"]["held_out_objects"] == [("two red circles", "two red circles")]
    assert pairs["base + simple"]["held_out_combinations"] == [("nothing", "one green circle")]
    scores = caption_back.score(pairs, wordnet=None)
    assert scores["r"]["held_out_objects"]["bleu_1"] == pytest.approx(1.0)
    assert scores["base + complex"]["held_out_objects"]["rougeL_f"] == 0.0
    assert "meteor" not in scores["r"]["held_out_objects"] and "bleu_4" not in scores["r"]["held_out_objects"]

    earlier, _ = caption_back.collect([results], {"r": 10}, lambda split_seed: REFERENCES)
    assert earlier["r"]["held_out_objects"] == [("three blue squares", "two red circles")]
    assert caption_back.score(earlier, None)["r"]["held_out_objects"]["bleu_1"] == 0.0
    table = caption_back.markdown(scores, read_at, caption_back.METRICS)
    assert "| r | 20 | 1 | 0 | – | 1.00 / 1.00 / 1.00 | 1.00 / 1.00 / 1.00 |" in table


def test_an_image_of_an_unknown_prompt_or_a_missing_step_is_named(tmp_path):
    results = results_folder(tmp_path / "results")
    with pytest.raises(KeyError, match="_seed0.png: prompt id .* is not in the world's suites"):
        caption_back.collect([results], {}, lambda split_seed: {})
    with pytest.raises(FileNotFoundError, match="no kept images of step 30"):
        caption_back.step_images(results / "split0" / "runs" / "r" / "seed0", 30)


def test_a_row_scored_from_another_rows_runs_reads_its_own_images(tmp_path):
    """run.SCORED_FROM rows (concat_clip) keep their images beside the trained row's, as eval/<export>@<row>."""
    from sur_lightning.generation.conditioning import MODES

    results = results_folder(tmp_path / "results")
    run = results / "split0" / "runs" / "r" / "seed0"
    scored = run / "eval" / "adapter-step20@r_concat" / "images" / "adapter"
    scored.mkdir(parents=True)
    assert caption_back.step_images(run, 20) == run / "eval" / "adapter-step20" / "images" / "adapter"
    assert caption_back.step_images(run, 20, "r_concat") == scored
    for row, (trained, knobs) in caption_back.benchmark.SCORED_FROM.items():
        assert trained in caption_back.benchmark.ROWS and row in caption_back.benchmark.ROWS
        assert knobs.get("mode", "replace") in MODES
