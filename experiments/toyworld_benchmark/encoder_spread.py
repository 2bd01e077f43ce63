"""The text-encoder ablation's diagnostic: how far apart a text model puts the toy world's objects.

    python experiments/toyworld_benchmark/encoder_spread.py                 # ~1 min on one CPU core
    python experiments/toyworld_benchmark/encoder_spread.py --llms smollm2_tokens minilm

Each object of the toy world is read in the same sentence, "a pair of <plural>", so only its name differs. A
model's state of the object is the mean of its last two real tokens (the end of the name, and for CLIP and MiniLM
the end token), as the model is configured for ELLA (``llm=<name> connector=ella``, the benchmark rows' path).
Printed per model, over the 20 objects:

- ``cosine``: the mean cosine between two objects' states (1: the model reads every object alike);
- ``spread``: the mean distance of a state from the objects' mean state, over the mean state's norm.

A connector can only learn an object's colour from what tells that object apart from the others; a model whose
objects all read alike leaves it little to learn from, even on the objects it trains on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sur_lightning.toyworld.world import OBJECTS

# The text models of the ablation rows (run.py: ella_demo, ella_minilm, ella_base_clip, ella_random_llm).
ABLATION_LLMS = ["smollm2_tokens", "minilm", "base_clip", "smollm2_random"]


def object_states(features, prompts: list[str]) -> torch.Tensor:
    """[N, D]: each prompt's mean state over its last two real tokens."""
    states, mask = features(prompts)
    return torch.stack([states[i][mask[i]][-2:].float().mean(dim=0) for i in range(len(prompts))])


def spread(states: torch.Tensor) -> dict[str, float]:
    """Mean pairwise cosine (off the diagonal) and mean distance from the mean state over its norm."""
    n = len(states)
    unit = torch.nn.functional.normalize(states, dim=-1)
    cosine = unit @ unit.T
    mean = states.mean(dim=0)
    return {
        "cosine": float((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))),
        "spread": float((states - mean).norm(dim=-1).mean() / mean.norm()),
    }


def load_llm(name: str, cache: Path):
    overrides = [f"llm={name}", "connector=ella", "backbone=toy", f"paths.cache_dir={cache}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return instantiate(cfg.llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llms", nargs="+", default=ABLATION_LLMS, help="conf/llm options")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = [f"a pair of {obj.plural}" for obj in OBJECTS]
    print("| llm | cosine between objects | spread |")
    print("|---|---|---|")
    with torch.no_grad():
        for name in args.llms:
            figures = spread(object_states(load_llm(name, args.cache), prompts))
            print(f"| {name} | {figures['cosine']:.3f} | {figures['spread']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
