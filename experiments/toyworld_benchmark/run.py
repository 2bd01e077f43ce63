"""Every method on the same toy world: train each row's connector with several seeds, score every split,
and write the table (mean ± std over seeds), a bar chart and the raw results.

    python experiments/toyworld_benchmark/run.py                      # all rows, seeds 0 1 2
    python experiments/toyworld_benchmark/run.py --rows sur_paper ella --seeds 0 --steps 100

Each row is the demo's recipe (toy base, SmolLM2-135M, adapter-train split, lr 1e-3, the same step
budget) with one method switch changed, so rows differ only in what the row's name says. The base
model's own columns (base + simple, base + complex) are rendered once and shared by all rows. The
linear probe of SmolLM2's pooled state (``sur_lightning.toyworld.probe``) is reported beside the table:
what the LLM knows bounds what distilling it can teach.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sur_lightning.toyworld.world import SPLITS

# name -> (preset, overrides). Presets: the SUR demo (cosine alignment, adaptive η) or the ELLA demo.
ROWS: dict[str, tuple[str, list[str]]] = {
    "sur_paper": ("demo", ["eta=fixed", "loss=kl"]),
    "sur_released": (
        "demo",
        ["eta=fixed", "loss=kl", "connector.batch_first=false", "connector.train_llm_projection=false",
         "model.denoise_grad_to_connector=false"],
    ),
    "kl_adaptive_eta": ("demo", ["loss=kl"]),
    "cosine_fixed_eta": ("demo", ["eta=fixed"]),
    "cosine_learnable_eta": ("demo", ["eta=learnable"]),
    "cosine_adaptive_eta": ("demo", []),
    "cosine_no_llm_loss": ("demo", ["model.llm_loss=null"]),
    "mse_eta_one": ("demo", ["loss=mse", "loss.prompt.weight=1.0", "eta=fixed", "eta.value=1.0"]),
    "denoising_only": ("demo", ["loss=denoising"]),
    # LLM knowledge beyond one hidden state (issue 10): what the LLM writes, retrieved facts, several teachers.
    "cosine_align_rewrite": ("demo", ["loss.align_target=rewrite", "rewriter=toyworld"]),
    "cosine_align_both": ("demo", ["loss.align_target=both", "rewriter=toyworld"]),
    "cosine_rag": ("demo", ["+llm/rag=toyworld"]),
    "cosine_align_rewrite_rag": ("demo", ["loss.align_target=rewrite", "rewriter=toyworld_rag", "+llm/rag=toyworld"]),
    "cosine_multi_teacher": ("demo", ["llm=multi"]),
    "cosine_multi_teacher_learned": ("demo", ["llm=multi", "llm.learn_weights=true"]),
    "ella_smollm2_tokens": ("ella_demo", []),
    "cosine_teacher_unet": ("demo", ["+loss/teacher=unet"]),
    "teacher_unet_only": ("demo", ["loss=denoising", "+loss/teacher=unet"]),
    "ella_teacher_unet": ("ella_demo", ["+loss/teacher=unet", "model.caption_dropout=0.0"]),
    "cosine_teacher_unet_x10": ("demo", ["+loss/teacher=unet", "loss.teacher_prediction.weight=10"]),
    "teacher_unet_only_x10": ("demo", ["loss=denoising", "+loss/teacher=unet", "loss.teacher_prediction.weight=10"]),
    "cosine_teacher_x0": ("demo", ["+loss/teacher=unet", "loss.teacher_prediction.space=x0"]),
    "teacher_x0_only": ("demo", ["loss=denoising", "+loss/teacher=unet", "loss.teacher_prediction.space=x0"]),
}
DESCRIPTIONS = {
    "sur_paper": "SUR as the paper: KL alignment (λ=1e-5), fixed η=0.1",
    "sur_released": "SUR as released: + denoising grad cut, batch-axis attention, frozen W0",
    "kl_adaptive_eta": "KL alignment (λ=1e-5), adaptive η",
    "cosine_fixed_eta": "cosine alignment (per token, λ=1), fixed η=0.1",
    "cosine_learnable_eta": "cosine alignment, learnable η",
    "cosine_adaptive_eta": "cosine alignment, adaptive η (the demo)",
    "cosine_no_llm_loss": "cosine prompt alignment only, no LLM distillation",
    "mse_eta_one": "per-token MSE alignment (λ=1), η=1: the adapter's output replaces the CLIP states",
    "denoising_only": "denoising loss only: no alignment, no LLM (control)",
    "cosine_align_rewrite": "the demo, prompt term aligned to CLIP(SmolLM2's rewrite) instead of CLIP(complex)",
    "cosine_align_both": "the demo, prompt term the mean of CLIP(complex) and CLIP(rewrite) alignments",
    "cosine_rag": "the demo, SmolLM2 reads retrieved toy-world facts before the prompt (distilled state)",
    "cosine_align_rewrite_rag": "aligned to CLIP(rewrite), the rewriter reading retrieved facts",
    "cosine_multi_teacher": "the demo, two teachers (SmolLM2 + MiniLM, ½ each), one W0 each",
    "cosine_multi_teacher_learned": "two teachers, weights a learned softmax",
    "ella_smollm2_tokens": "ELLA TSC on SmolLM2 token states (denoising loss)",
    "cosine_teacher_unet": "the demo + MSE to the frozen UNet's prediction under CLIP(complex) (+loss/teacher=unet)",
    "teacher_unet_only": "denoising + the UNet-prediction teacher only: no token-wise prompt term, no LLM",
    "ella_teacher_unet": "ELLA TSC + the UNet-prediction teacher (no caption dropout)",
    "cosine_teacher_unet_x10": "the demo + the UNet-prediction teacher at λ=10",
    "teacher_unet_only_x10": "denoising + the UNet-prediction teacher at λ=10 only",
    "cosine_teacher_x0": "the demo + the teacher in x0 space (1/SNR-weighted: high-noise steps count)",
    "teacher_x0_only": "denoising + the x0-space teacher only",
}
METRICS = ("color_accuracy", "shape_accuracy", "count_accuracy")


def compose(preset: str, overrides: list[str], out: Path, cache: Path, seed: int, steps: int, base: Path | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sur_lightning.train import CONFIG_DIR

    common = [
        f"+experiment={preset}",
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "logger=csv",
        "callbacks=default",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint=null",
        f"paths.root_dir={ROOT}",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={out}",
    ] + ([f"backbone.pretrained.folder={base}"] if base else [])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=common + overrides)


def train_row(name: str, seed: int, args) -> Path:
    """Train one row with one seed (skipped when its adapter exists); returns the adapter file."""
    from sur_lightning.train import train

    out = args.out / "runs" / name / f"seed{seed}"
    adapter = out / "adapter.safetensors"
    if not adapter.exists():
        preset, overrides = ROWS[name]
        train(compose(preset, overrides, out, args.cache, seed, args.steps, args.base))
    return adapter


class Renderer:
    """The toy base, the world's suites and the sampler, loaded once; renders columns of images."""

    def __init__(self, args) -> None:
        from hydra.utils import instantiate

        from sur_lightning.toyworld import world

        cfg = compose("demo", [], args.out / "eval", args.cache, 0, 1, args.base)
        self.backbone = instantiate(cfg.backbone)
        self.llm_cfg = cfg.llm
        self.llm_tokens = compose("ella_demo", [], args.out / "eval", args.cache, 0, 1).llm
        self.prompts = world.suite(Path(ROOT) / "data" / "toyworld", SPLITS, per_split=args.per_split)
        self.seeds = list(args.eval_seeds)
        self.kwargs = {"num_inference_steps": args.eval_steps, "guidance_scale": args.guidance_scale, "batch_size": 32}

    def render(self, columns):
        from sur_lightning.generate import render_columns

        return render_columns(self.backbone, columns, self.prompts, self.seeds, progress=False, **self.kwargs)

    def base_columns(self):
        from sur_lightning.generate import ClipConditioning, Column, complex_prompt_column, frozen_text_features

        return [
            Column("base", ClipConditioning(frozen_text_features(self.backbone))),
            complex_prompt_column(self.backbone, self.prompts),
        ]

    def adapter_column(self, name: str, adapter: Path):
        from hydra.utils import instantiate

        from sur_lightning.generate import build_columns

        llm_cfg = self.llm_tokens if ROWS[name][0] == "ella_demo" else self.llm_cfg
        (column,) = build_columns(self.backbone, [str(adapter)], llm=lambda: instantiate(llm_cfg), include_base=False)
        column.name = "adapter"
        return column


def score(evaluator, base_report: dict, rendered) -> dict:
    from sur_lightning.evaluate import gap_closed, score_columns, split_scores

    adapter = score_columns(evaluator, rendered)
    report = {
        "columns": {**base_report["columns"], **adapter["columns"]},
        "images": base_report["images"] + adapter["images"],
    }
    return {"splits": split_scores(report), "gap_closed": gap_closed(report)["adapter"]}


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else None


def summarise(results: dict, base: dict) -> dict:
    """{row: {split: {metric: (mean, std), gap_<metric>: (mean, std)}}} over seeds."""
    summary = {}
    for name, by_seed in results.items():
        summary[name] = {}
        for split in SPLITS:
            entry = {}
            for metric in METRICS:
                entry[metric] = mean_std([r["splits"]["adapter"][split][metric] for r in by_seed.values()])
                entry[f"gap_{metric}"] = mean_std([r["gap_closed"][split][metric] for r in by_seed.values()])
            summary[name][split] = entry
    return summary


def fmt(value) -> str:
    return "–" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def markdown(summary: dict, base: dict, probe: dict | None, args) -> str:
    sizes = "/".join(str(base["base"][split]["n"]) for split in SPLITS)
    lines = [
        (
            f"Seeds {list(args.seeds)}, {args.steps} training steps per run; each split scored on {sizes} images "
            f"(adapter-train / held-out combinations / held-out objects), DDIM {args.eval_steps} steps, "
            f"CFG {args.guidance_scale}."
        ),
        "",
    ]
    for split in SPLITS:
        lines += [f"### {split}", "", "| row | colour | shape | count | gap closed: colour | shape | count |", "|---" * 7 + "|"]
        for column, label in (("base", "base + simple"), ("base+complex", "base + complex")):
            entry = base[column][split]
            cells = [f"{entry[m]:.2f}" for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " | | | |")
        for name, by_split in summary.items():
            entry = by_split[split]
            cells = [fmt(entry[m]) for m in METRICS] + [fmt(entry[f"gap_{m}"]) for m in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Rows:", ""] + [f"- `{name}`: {DESCRIPTIONS[name]}" for name in summary] + [""]
    if probe:
        lines += [
            (
                "**What SmolLM2 knows.** A leave-one-object-out linear probe of its pooled last-block state (the "
                f"feature SUR distils) predicts an object's colour for {probe['accuracy']:.0%} of prompts "
                f"(majority-colour baseline {probe['majority_baseline']:.0%}, chance {probe['chance']:.0%})."
            ),
            "",
            "| object | probe accuracy |",
            "|---|---|",
        ] + [f"| {k} | {v:.2f} |" for k, v in probe["per_object"].items()]
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(4.2 * len(SPLITS), 0.45 * len(names) + 1.6), sharey=True)
    for ax, split in zip(axes, SPLITS):
        for offset, metric, color in ((-0.2, "gap_color_accuracy", "#d62728"), (0.2, "gap_shape_accuracy", "#1f77b4")):
            values = [summary[n][split][metric] or (np.nan, 0.0) for n in names]
            ax.barh(np.arange(len(names)) + offset, [v[0] for v in values], 0.38, xerr=[v[1] for v in values],
                    color=color, label=metric.replace("gap_", "").replace("_accuracy", ""))
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(1, color="grey", lw=0.8, ls="--")
        ax.set_title(split.replace("_", " "))
        ax.set_xlabel("gap closed")
    axes[0].set_yticks(np.arange(len(names)), names)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right")
    fig.suptitle("Toy world: share of the base's simple-vs-complex gap each connector closes (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--per-split", type=int, default=None, help="evaluation prompts per split (default: all)")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--base", type=Path, default=None, help="a base from toyworld.pretrain (default: the shipped one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())

    from sur_lightning.evaluate import Evaluator, score_columns, split_scores

    evaluator = Evaluator(compute=["shapes"])
    renderer = Renderer(args)
    base_report = score_columns(evaluator, renderer.render(renderer.base_columns()))
    base = split_scores(base_report)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text())["runs"] if results_file.exists() else {}
    for name in args.rows:
        for seed in args.seeds:
            if str(seed) in results.get(name, {}):
                continue
            adapter = train_row(name, seed, args)
            scores = score(evaluator, base_report, renderer.render([renderer.adapter_column(name, adapter)]))
            results.setdefault(name, {})[str(seed)] = scores
            results_file.write_text(json.dumps({"base": base, "runs": results}, indent=2))
            closed = scores["gap_closed"]["held_out_combinations"]
            print(f"{name} seed {seed}: gap closed on held-out combinations {closed}", flush=True)

    probe = None
    if not args.no_probe:
        from hydra.utils import instantiate

        from sur_lightning.toyworld.probe import probe_llm

        probe = probe_llm(instantiate(renderer.llm_cfg))
    rows = {name: results[name] for name in args.rows if name in results}
    summary = summarise(rows, base)
    table = markdown(summary, base, probe, args)
    (args.out / "results.md").write_text(table)
    results_file.write_text(json.dumps({"base": base, "runs": results, "summary": summary, "probe": probe}, indent=2))
    chart(summary, args.out / "chart.png")
    print(table)
    print(f"wrote {args.out / 'results.md'}, {args.out / 'chart.png'}, {results_file}")


if __name__ == "__main__":
    main()
