"""Every method on the same toy world, judged by its learning curve: each (row, training seed) is one run that
exports its connector at several step counts; every export is scored by the programmatic checker on all three
splits; the table and the charts give, per step, the mean over seeds of the gap closed with a 95 % interval.

    python experiments/toyworld_benchmark/run.py                                  # every row, seeds 0 1 2
    python experiments/toyworld_benchmark/run.py --rows ella sur_demo --seeds 0 --steps 300 600

Resumable at every level: a finished run is not trained again, a killed run resumes from its last checkpoint
(``ckpt_path``; the training clock continues), and each scored step is written to ``results.json`` at once, so
killing the script loses at most one step's scoring. Run it from a frozen worktree (``git worktree add``), so
the code does not change under a run that lasts several sessions. Runs go seed-major: every row's seed 0 first.

Each row is a preset (the SUR demo recipe ``sur_demo`` or ``ella_demo``) with one switch changed, so rows differ
only in what the row's name says. The base model's own columns (base + simple, base + complex) are rendered once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sur_lightning.evaluation import learning_curve
from sur_lightning.toyworld.world import SPLITS

# name -> (preset, overrides, description)
# The ELLA demo recipe before min-SNR and the cosine schedule (issue 19): the "ella" row keeps it.
ELLA_CONSTANT_LR = [
    "model.optimizer.lr=1.0e-3",
    "model.lr_scheduler._target_=diffusers.optimization.get_constant_schedule_with_warmup",
    "~model.lr_scheduler.num_training_steps",
    "loss.denoising.snr_gamma=null",
]
ROWS: dict[str, tuple[str, list[str], str]] = {
    "ella_demo": (
        "ella_demo",
        [],
        "ELLA TSC (2 blocks) on SmolLM2 token states, the demo recipe: lr 2e-3 cosine, min-SNR-5, caption dropout 0.1",
    ),
    "ella": ("ella_demo", ELLA_CONSTANT_LR, "the same TSC at the earlier recipe: constant lr 1e-3, plain ε-MSE"),
    "sur_demo": ("sur_demo", [], "SUR, the demo recipe: cosine alignment (per token, λ=1), adaptive η"),
    "sur_small": ("sur_demo", ["connector=sur_small"], "the SUR demo recipe with connector=sur_small (4 heads, ff 512)"),
    "sur_paper": ("sur_demo", ["eta=fixed", "loss=kl"], "SUR as the paper: KL alignment (λ=1e-5), fixed η=0.1"),
    "sur_released": (
        "sur_demo",
        ["eta=fixed", "loss=kl", "connector.batch_first=false", "connector.train_llm_projection=false",
         "model.denoise_grad_to_connector=false"],
        "SUR as released: + denoising grad cut, batch-axis attention, frozen W0",
    ),
    "mse_eta_one": (
        "sur_demo",
        ["loss=mse", "loss.prompt.weight=1.0", "eta=fixed", "eta.value=1.0"],
        "per-token MSE alignment (λ=1), η=1: the adapter's output replaces the CLIP states",
    ),
    "denoising_only": ("sur_demo", ["loss=denoising"], "SUR trained by the denoising loss only (control)"),
    "sur_caption_dropout": (
        "sur_demo",
        ["model.caption_dropout=0.1"],
        "the SUR demo recipe + caption dropout 0.1, a dropped row aligned to CLIP(\"\") (issue 19 §4)",
    ),
    "sur_multi_teacher": (
        "sur_demo",
        ["llm=multi", "llm.learn_weights=true"],
        "the SUR demo recipe distilling SmolLM2 + MiniLM, learned weights (the issue-10 row with the best colour)",
    ),
    "ella_rag": (
        "ella_demo",
        ["+llm/rag=toyworld", "llm.rag_pooling=all"],
        "the ELLA demo recipe reading SmolLM2's states of the retrieved fact + the prompt (all tokens)",
    ),
    "ella_name_dropout": (
        "ella_demo",
        ["+llm/rag=toyworld", "llm.rag_pooling=all", "llm.rag.name_dropout=0.5"],
        "ella_rag + name dropout 0.5: the object's name becomes a nonsense word in prompt and fact (4 variants)",
    ),
    "ella_name_dropout_p1": (
        "ella_demo",
        ["+llm/rag=toyworld", "llm.rag_pooling=all", "llm.rag.name_dropout=1.0"],
        "ella_rag + name dropout 1.0: every training name is a nonsense word, so only the fact says what to draw",
    ),
    "ella_name_dropout_p1_k7": (
        "ella_demo",
        ["+llm/rag=toyworld", "llm.rag_pooling=all", "llm.rag.name_dropout=1.0", "llm.rag.name_variants=7"],
        "ella_name_dropout_p1 with 7 nonsense words per caption (the most 157 words allow for 20 names) instead of 4",
    ),
    # Training is ella_name_dropout_p1's (every training name is renamed already, so anonymise changes nothing there):
    # its runs' exports can be copied here and scored, not trained again.
    "ella_name_dropout_p1_anonymise": (
        "ella_demo",
        ["+llm/rag=toyworld", "llm.rag_pooling=all", "llm.rag.name_dropout=1.0", "llm.rag.anonymise=true"],
        "ella_name_dropout_p1 read anonymised at inference too: every name becomes a nonsense word after retrieval",
    ),
    # unCLIP (issue 34): the prior -> decoder pipeline, trained in two runs per seed (runs/unclip_decoder/seed<S>, then
    # runs/unclip/seed<S> sampled through that decoder); the oracle decodes the image tower's embedding of a true image
    # of each prompt (world.draw_example of its target), which bounds every prior.
    "unclip": (
        "unclip_toy",
        [],
        ("unCLIP: a diffusion prior (PriorTransformer, 4 layers) from SmolLM2's token states + CLIP's pooled state to "
         "the image tower's embedding, decoded by the frozen toy UNet through a trained projection (4 tokens + time)"),
    ),
    "unclip_oracle": (
        "unclip_decoder_toy",
        [],
        "unCLIP's decoder given the image tower's embedding of a true image of the prompt (the bound of every prior)",
    ),
}
UNCLIP_ROWS = ("unclip", "unclip_oracle")
SPLIT_SEEDS = {"adapter_train": [0], "held_out_combinations": [0, 1], "held_out_objects": [0, 1, 2]}


def compose(preset: str, overrides: list[str], out: Path, args, seed: int, steps: list[int]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = str(ROOT / "conf")
    # unCLIP's presets export with callbacks=unclip's `export` (ModelExport), the connectors' with adapter_export.
    unclip = preset.startswith("unclip")
    export = "export" if unclip else "adapter_export"
    common = [
        f"+experiment={preset}",
        f"seed={seed}",
        f"threads={args.threads}",
        f"trainer.max_steps={max(steps)}",
        f"trainer.val_check_interval={min(steps)}",
        "logger=csv",
        *([] if unclip else ["callbacks=default", "callbacks.sample_grid=null"]),
        f"callbacks.{export}.at_steps=[{','.join(map(str, steps))}]",
        f"callbacks.model_checkpoint.every_n_train_steps={min(steps)}",
        "callbacks.model_checkpoint.save_top_k=1",
        f"paths.root_dir={ROOT}",
        f"paths.cache_dir={args.cache}",
        f"paths.output_dir={out}",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=common + overrides)


def train_run(name: str, seed: int, args) -> Path:
    """Train one (row, seed) to the last step, resuming a killed run; returns its folder."""
    from sur_lightning.train import train

    out = args.out / "runs" / name / f"seed{seed}"
    if (out / "adapter.safetensors").exists():
        return out
    preset, overrides, _ = ROWS[name]
    cfg = compose(preset, overrides, out, args, seed, args.steps)
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        cfg.ckpt_path = str(last)
    started = time.time()
    train(cfg)
    print(f"{name} seed {seed}: trained in {time.time() - started:.0f} s", flush=True)
    return out


def train_unclip(name: str, seed: int, args) -> Path:
    """unCLIP's runs for one seed: the decoder (runs/unclip_decoder/seed<S>, ``--decoder-steps``), then for the
    ``unclip`` row the prior sampled through it (runs/unclip/seed<S>, ``--steps``); each resumes a killed run.
    Returns the row's run folder."""
    from sur_lightning.train import train

    decoder_run = args.out / "runs" / "unclip_decoder" / f"seed{seed}"
    runs = [(decoder_run, "unclip_decoder_toy", [args.decoder_steps], "decoder", [])]
    if name == "unclip":
        runs.append((args.out / "runs" / "unclip" / f"seed{seed}", "unclip_toy", args.steps, "unclip",
                     [f"model.decoder={decoder_run / 'decoder'}"]))
    for out, preset, steps, export, overrides in runs:
        if (out / export).exists():
            continue
        cfg = compose(preset, overrides, out, args, seed, steps)
        last = out / "checkpoints" / "last.ckpt"
        if last.exists():
            cfg.ckpt_path = str(last)
        started = time.time()
        train(cfg)
        print(f"{preset} seed {seed}: trained in {time.time() - started:.0f} s", flush=True)
    return runs[-1][0]


def true_image(prompts):
    """``reference(prompt, seed)`` for the oracle: a fresh world image of the prompt's target (its complex prompt),
    from a generator keyed by prompt and seed."""
    import random

    from sur_lightning.toyworld import world

    targets = {p.prompt: world.parse_toyworld(p.complex) for prompts_ in prompts.values() for p in prompts_}

    def reference(prompt: str, seed: int):
        return world.draw_example(*targets[prompt], random.Random(f"unclip-oracle:{prompt}:{seed}"))

    return reference


class Scorer:
    """The toy base, the three splits' prompts (each split with its own evaluation seeds, ≥ 128 images), the
    sampler and the checker, loaded once; renders and scores columns."""

    def __init__(self, args) -> None:
        from hydra.utils import instantiate

        from sur_lightning.evaluation.evaluator import Evaluator
        from sur_lightning.toyworld import world

        cfg = compose("sur_demo", [], args.out / "eval", args, 0, [1])
        self.backbone = instantiate(cfg.backbone)
        self.prompts = {split: world.suite(ROOT / "data" / "toyworld", split) for split in SPLITS}
        self.evaluator = Evaluator(compute=["shapes"])
        self.kwargs = {"num_inference_steps": args.eval_steps, "guidance_scale": args.guidance_scale, "batch_size": 32}
        self.llms: dict[str, torch.nn.Module] = {}
        self.args = args

    def rows(self, columns, out_dir: Path) -> dict[str, list[dict]]:
        """{column: per-image rows} over every split, each split with its seeds. The images are kept under
        ``out_dir`` (``images/<column>/<prompt id>_seed<k>.png``, 3 KB each), so a revised checker can rescore them."""
        from sur_lightning.evaluation.evaluator import score_columns
        from sur_lightning.generation.pipeline import render_columns

        rendered = []
        for split, prompts in self.prompts.items():
            rendered += render_columns(self.backbone, columns, prompts, SPLIT_SEEDS[split], out_dir=out_dir,
                                       progress=False, **self.kwargs)
        report = score_columns(self.evaluator, rendered)
        return {column.name: learning_curve.image_rows(report, column.name) for column in columns}

    def base_rows(self) -> dict[str, list[dict]]:
        from sur_lightning.generation.columns import Column, complex_prompt_column
        from sur_lightning.generation.conditioning import ClipConditioning, frozen_text_features

        every = [p for prompts in self.prompts.values() for p in prompts]
        base = Column("base", ClipConditioning(frozen_text_features(self.backbone)))
        return self.rows([base, complex_prompt_column(self.backbone, every)], self.args.out / "base")

    def llm(self, name: str) -> torch.nn.Module:
        """The row's LLM (its own config: RAG rows read facts at inference too), loaded once per distinct config."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        preset, overrides, _ = ROWS[name]
        llm_cfg = compose(preset, overrides, self.args.out / "eval", self.args, 0, [1]).llm
        key = OmegaConf.to_yaml(llm_cfg, resolve=True)
        if key not in self.llms:
            self.llms[key] = instantiate(llm_cfg).to(self.backbone.device)
        return self.llms[key]

    def adapter(self, name: str, path: Path) -> list[dict]:
        from sur_lightning.generation.columns import build_columns

        (column,) = build_columns(self.backbone, [str(path)], llm=lambda: self.llm(name), include_base=False)
        column.name = "adapter"
        return self.rows([column], path.parent / "eval" / path.stem)["adapter"]


    def unclip(self, path: Path) -> list[dict]:
        """A prior export (``unclip-step<N>/``), sampled prior -> decoder (the decoder its unclip.json names)."""
        from sur_lightning.generation.columns import unclip_column

        column = unclip_column(self.backbone, path, llm=self.llm("unclip"), name="adapter")
        return self.rows([column], path.parent / "eval" / path.name)["adapter"]

    def unclip_oracle(self, path: Path) -> list[dict]:
        """A decoder export, given the image tower's embedding of a true image of each prompt."""
        from sur_lightning.generation.columns import oracle_column
        from sur_lightning.toyworld import shipped_image_tower

        column = oracle_column(self.backbone, path, shipped_image_tower(), true_image(self.prompts), name="adapter")
        return self.rows([column], path.parent / "eval" / path.name)["adapter"]


def score_unclip(name: str, run: Path, scorer: Scorer, done: dict, on_step) -> None:
    """Score each step export of an unCLIP run: the prior's ``unclip-step<N>`` (and the final ``unclip``), or for the
    oracle the decoder's final export at its step."""
    if name == "unclip":
        exports = learning_curve.exported_adapters(run, prefix="unclip")
        for export in exports:
            if export["step"] not in done:
                done[export["step"]] = {"train_seconds": export["train_seconds"], "images": scorer.unclip(export["path"])}
                on_step(export["step"], done[export["step"]])
        return
    (export,) = [e for e in learning_curve.exported_adapters(run, prefix="decoder")][-1:]
    if export["step"] not in done:
        done[export["step"]] = {"train_seconds": export["train_seconds"], "images": scorer.unclip_oracle(export["path"])}
        on_step(export["step"], done[export["step"]])


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"base": None, "runs": {}}
    results = json.loads(path.read_text())
    # JSON keys are strings; seeds and steps are ints here.
    results["runs"] = {
        row: {int(seed): {int(step): v for step, v in steps.items()} for seed, steps in seeds.items()}
        for row, seeds in results["runs"].items()
    }
    return results


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(path)


def summaries(results: dict, rows: list[str]) -> dict[str, dict]:
    base = results["base"]
    return {
        name: learning_curve.summarise(results["runs"][name], base["base"], base["base+complex"], SPLITS)
        for name in rows
        if results["runs"].get(name)
    }


def markdown(curves: dict[str, dict], results: dict, args) -> str:
    """The curve table (every row × step, held-out splits' colour and shape gaps) and the table at each row's last
    common step, with 95 % intervals; plus the base's bounds and the valid-image rates."""
    fmt = learning_curve.fmt
    lines = [
        (f"Training seeds {args.seeds} (a row's figures average the seeds it has finished; `seeds` says how many), "
        f"evaluation seeds per split {SPLIT_SEEDS}, DDIM {args.eval_steps} steps, CFG {args.guidance_scale}. "
        "Intervals: 95 %, two-level bootstrap (training seeds, then prompt × seed pairs)."),
        "",
        "### Base bounds",
        "",
        "| split | n | base + simple: colour / shape / count / valid | base + complex: colour / shape / count / valid |",
        "|---|---|---|---|",
    ]
    for split in SPLITS:
        cells = []
        for column in ("base", "base+complex"):
            split_rows = [r for r in results["base"][column] if r["category"] == split]
            rates = [sum(r.get(m, 0) for r in split_rows) / len(split_rows) for m in learning_curve.RATES]
            cells.append(" / ".join(f"{v:.2f}" for v in rates))
        lines.append(f"| {split} | {len(split_rows)} | {cells[0]} | {cells[1]} |")
    for split in SPLITS:
        lines += [
            "",
            f"### {split}: gap closed by step",
            "",
            "| row | step | seeds | train s | colour | shape | count | gap closed: colour | shape | count | valid |",
            "|---" * 11 + "|",
        ]
        for name, summary in curves.items():
            for step, entry in sorted(summary.items()):
                cell = entry[split]
                values = [fmt(cell.get(m)) for m in learning_curve.ACCURACIES]
                gaps = [fmt(cell.get(f"gap_{m}")) for m in learning_curve.ACCURACIES]
                valid = fmt(cell.get("valid_image"))
                lines.append(
                    f"| {name} | {step} | {entry['seeds']} | {entry['train_seconds']:.0f} | "
                    + " | ".join(values + gaps + [valid]) + " |"
                )
    lines += ["", "Rows:", ""] + [f"- `{name}`: {ROWS[name][2]} (`{' '.join(ROWS[name][1]) or ROWS[name][0]}`)"
                                  for name in curves]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs="+", type=int, default=[300, 600, 1200, 2400])
    parser.add_argument("--decoder-steps", type=int, default=1500, help="unCLIP's decoder budget (rows unclip, unclip_oracle)")
    parser.add_argument("--eval-steps", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    # The runs pin their own thread count (conf/train.yaml `threads`); the published results were trained on one
    # thread each (then set by OMP_NUM_THREADS=1), so the benchmark keeps that unless told otherwise.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true", help="summarise results.json; train and score nothing")
    args = parser.parse_args()
    args.steps = sorted(set(args.steps))
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = load_results(results_file)

    if not args.report_only:
        scorer = Scorer(args)
        if results["base"] is None:
            results["base"] = scorer.base_rows()
            save_results(results_file, results)
        for seed in args.seeds:
            for name in args.rows:
                done = results["runs"].setdefault(name, {}).setdefault(seed, {})
                wanted = [args.decoder_steps] if name == "unclip_oracle" else args.steps
                if all(step in done for step in wanted):
                    continue
                run = train_unclip(name, seed, args) if name in UNCLIP_ROWS else train_run(name, seed, args)

                def on_step(step, result, name=name, seed=seed):
                    results["runs"][name][seed][step] = result
                    save_results(results_file, results)
                    gaps = learning_curve.summarise({0: {step: result}}, results["base"]["base"],
                                                    results["base"]["base+complex"], SPLITS, n_boot=10)[step]
                    shown = {s: learning_curve.fmt(gaps[s].get("gap_color_accuracy")) for s in SPLITS}
                    print(f"{name} seed {seed} step {step}: colour gap closed {shown}", flush=True)

                if name in UNCLIP_ROWS:
                    score_unclip(name, run, scorer, done, on_step)
                else:
                    learning_curve.score_run(run, lambda path, name=name: scorer.adapter(name, path), done, on_step)

    curves = summaries(results, [n for n in args.rows if n in results["runs"]])
    table = markdown(curves, results, args)
    (args.out / "results.md").write_text(table)
    (args.out / "summary.json").write_text(json.dumps({k: {str(s): v for s, v in c.items()} for k, c in curves.items()}, indent=1))
    learning_curve.chart(curves, SPLITS, args.out / "curve_steps.png", x="step")
    learning_curve.chart(curves, SPLITS, args.out / "curve_seconds.png", x="train_seconds")
    print(table)
    print(f"wrote {args.out / 'results.md'}, {args.out / 'curve_steps.png'}, {args.out / 'curve_seconds.png'}")


if __name__ == "__main__":
    main()
