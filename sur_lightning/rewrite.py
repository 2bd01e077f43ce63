"""Read what the rewriter writes before training on it (``sur_lightning.knowledge.rewriter``):

    python -m sur_lightning.rewrite prompts=data/toyworld/suites/held_out_combinations.jsonl rewriter=toyworld

writes ``out`` (one JSON row per prompt with its rewrite) and ``<out>.summary.json``: how many rewrites
were generated or read from the rewriter's cache, and for toy-world prompts how often a rewrite names
the target's count, colour and shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from sur_lightning.config import CONFIG_DIR
from sur_lightning.data.prompt_suites import load_prompt_list
from sur_lightning.knowledge.rewriter import PromptRewriter
from sur_lightning.toyworld.world import toyworld_accuracy


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="rewrite")
def main(cfg: DictConfig) -> dict:
    prompts = load_prompt_list(cfg.prompts, cfg.get("num_prompts"))
    rewriter: PromptRewriter = instantiate(cfg.rewriter)
    texts = [p.prompt for p in prompts]
    rewrites = rewriter.rewrite(texts, task=cfg.task)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": p.id, "prompt": p.prompt, "rewrite": r, **({"target": list(p.target)} if p.target else {})}
        for p, r in zip(prompts, rewrites)
    ]
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    width = max(len(t) for t in texts)
    for text, rewrite in zip(texts, rewrites):
        print(f"{text:<{width}}  ->  {rewrite}")
    summary = {"prompts": len(texts), "generated": rewriter.generated, "cached": len(set(texts)) - rewriter.generated}
    if all(p.target for p in prompts):
        summary.update(toyworld_accuracy(rewrites, [p.target for p in prompts]))
    print(json.dumps(summary, indent=2))
    print(f"rewrites: {out}  (cache: {rewriter.cache_file})")
    (out.with_suffix(".summary.json")).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    main()
