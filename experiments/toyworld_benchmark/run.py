"""Every method on the same toy world, judged by its learning curve: each (row, training seed) is one run that
exports its connector at several step counts; every export is scored by the programmatic checker on all three
splits; the table and the charts give, per step, the mean over seeds of the gap closed with a 95 % interval.

    python experiments/toyworld_benchmark/run.py                                  # every row, seeds 0 1 2
    python experiments/toyworld_benchmark/run.py --rows ella sur_demo --seeds 0 --steps 300 600
    python experiments/toyworld_benchmark/run.py --rows ella_unseen_objects --split-seeds 0 3 85 141 192

Split seeds (``--split-seeds``, default 0) are worlds: each draws its own held-out objects and combinations
(``data.root.seed``), lives in its own world folder, and has its own base columns, runs and images under
``<out>/split<S>/``. With several, the tables pool every row over the worlds (each weighted equally; intervals
resample split seeds, then training seeds, then prompt × seed pairs), name the worst world beside the pooled
figure, and break the held-out objects down object by object and shape by shape. ``COVERING_SPLIT_SEEDS`` hold out
each of the world's 20 objects exactly once.

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
    "sur_small": (
        "sur_demo",
        ["connector=sur_small"],
        "the SUR demo recipe with connector=sur_small (4 heads, ff 512)",
    ),
    "sur_paper": ("sur_demo", ["eta=fixed", "loss=kl"], "SUR as the paper: KL alignment (λ=1e-5), fixed η=0.1"),
    "sur_released": (
        "sur_demo",
        [
            "eta=fixed",
            "loss=kl",
            "connector.batch_first=false",
            "connector.train_llm_projection=false",
            "model.denoise_grad_to_connector=false",
        ],
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
        'the SUR demo recipe + caption dropout 0.1, a dropped row aligned to CLIP("") (issue 19 §4)',
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
    "pixelsnail": (
        "pixelsnail_toy",
        [],
        (
            "not a connector: VQ codes of the adapter-train images (256-code EMA codebook over the toy VAE's latents) "
            "and a text-conditioned PixelSNAIL (32 channels, 1 block) reading SmolLM2's token states; CFG 3, temperature 1"
        ),
    ),
    # unCLIP (issue 34): the prior -> decoder pipeline, trained in two runs per seed (runs/unclip_decoder/seed<S>, then
    # runs/unclip/seed<S> sampled through that decoder); the oracle decodes the image tower's embedding of a true image
    # of each prompt (world.draw_example of its target), which bounds every prior.
    "unclip": (
        "unclip_toy",
        [],
        (
            "unCLIP: a diffusion prior (PriorTransformer, 4 layers) from SmolLM2's token states + CLIP's pooled state to "
            "the image tower's embedding, decoded by the frozen toy UNet through a trained projection (4 tokens + time)"
        ),
    ),
    # The knowledge recipe of ella_unseen_objects on the prior: it reads the same LLM features, so the retrieved fact,
    # name dropout and anonymised names apply to it unchanged; the decoder (which reads no text) is the unclip row's.
    "unclip_anonymise": (
        "unclip_toy",
        ["+llm/rag=toyworld", "llm.rag_pooling=all", "llm.rag.name_dropout=1.0", "llm.rag.anonymise=true"],
        "the unclip row's prior reading SmolLM2's states of the retrieved fact + the prompt, every name a nonsense word",
    ),
    "unclip_oracle": (
        "unclip_decoder_toy",
        [],
        "unCLIP's decoder given the image tower's embedding of a true image of the prompt (the bound of every prior)",
    ),
}
UNCLIP_ROWS = ("unclip", "unclip_anonymise", "unclip_oracle")
# A row whose runs live under another folder name: the oracle scores the decoder runs every unCLIP row shares.
RUN_FOLDER = {"unclip_oracle": "unclip_decoder"}
# Presets that train their own generator (conf/callbacks/generator.yaml: an export_pretrained folder per scored step)
# instead of a connector on the frozen base -> the name of their final export. A row of one draws its images with
# its own sampler (Column.render); vqvae_toy is no row, it fits the tokenizer the pixelsnail row reads.
GENERATORS = {"pixelsnail_toy": "pixelsnail", "vqvae_toy": "tokenizer"}
# The text-encoder ablation (ELLA's central question): the demo recipe, only the text model the connector reads
# changes. ella_demo is its SmolLM2-135M row.
ROWS["ella_minilm"] = (
    "ella_demo",
    ["llm=minilm"],
    "the ELLA demo recipe reading all-MiniLM-L6-v2's token states (384-d)",
)
ROWS["ella_base_clip"] = (
    "ella_demo",
    ["llm=base_clip"],
    "the ELLA demo recipe reading the base's own CLIP text encoder's token states (control)",
)
ROWS["ella_random_llm"] = (
    "ella_demo",
    ["llm=smollm2_random"],
    "the ELLA demo recipe reading a random-weight SmolLM2-135M (same shape and tokens; the parameters-not-knowledge control)",
)
# The unseen-objects recipe as it was measured across worlds before fact wordings (results_splits, remedies): the
# preset with one wording per fact, read at inference as variant 0 alone. Pinned, so resuming those tables trains
# and scores what they measured.
VARIANT_ZERO = ["llm.rag.variant_mean=false"]
ONE_WORDING = ["llm.rag.vary_wording=false", *VARIANT_ZERO]
ROWS["ella_unseen_objects"] = (
    "ella_unseen_objects",
    ONE_WORDING,
    "the unseen-objects recipe with one wording per fact (the +experiment=ella_unseen_objects preset before fact wordings)",
)
# Remedies for the worlds that hold out shapes the training mix has few of (issue 36), each one change to that recipe.
ROWS["ella_unseen_objects_balanced"] = (
    "ella_unseen_objects",
    [*ONE_WORDING, "data.balance_by=shape"],
    "one wording per fact, with a training mix that gives each shape an equal share (data.balance_by=shape)",
)
ROWS["ella_unseen_objects_k7"] = (
    "ella_unseen_objects",
    [*ONE_WORDING, "llm.rag.name_variants=7"],
    "one wording per fact, with 7 nonsense words per caption instead of 4",
)
ROWS["ella_unseen_objects_4blocks"] = (
    "ella_unseen_objects",
    [*ONE_WORDING, "connector.num_blocks=4"],
    "one wording per fact, with a TSC of 4 blocks instead of 2: more of the connector to read the fact with",
)
# The remedy that worked, now in the preset (conf/experiment/ella_unseen_objects.yaml, llm.rag.vary_wording), read
# at inference as variant 0 alone, as it was measured (results_wordings).
ROWS["ella_unseen_objects_wordings"] = (
    "ella_unseen_objects",
    ["llm.rag.vary_wording=true", *VARIANT_ZERO],
    "each training object's fact in 4 wordings (one per nonsense word), read at inference as variant 0",
)
# Rows with no training of their own: the runs of another row, drawn with other inference settings (build_columns'
# keywords). Their images go to eval/<export>@<row> in the trained row's run folders.
SCORED_FROM: dict[str, tuple[str, dict]] = {}


def scored_row(name: str, trained: str, settings: dict, description: str) -> None:
    """Declare row ``name``: ``trained``'s runs scored with ``settings``."""
    ROWS[name] = (*ROWS[trained][:2], description)
    SCORED_FROM[name] = (trained, settings)


scored_row(
    "ella_unseen_objects_concat_clip",
    "ella_unseen_objects",
    {"mode": "concat_clip"},
    "the preset's runs drawn with CLIP's states before the connector's (mode=concat_clip); scored, not trained again",
)
# The +experiment=ella_unseen_objects preset as it stands: the wordings row's runs (training is the same) read as
# the mean of the connector's outputs over each prompt's renamed variants (llm.rag.variant_mean).
scored_row(
    "ella_unseen_objects_variant_mean",
    "ella_unseen_objects_wordings",
    {"variant_mean": True},
    "the +experiment=ella_unseen_objects preset: the wordings row's runs read as the mean of the connector's outputs "
    "over each prompt's 4 renamed variants (placeholder k, the fact in wording k); scored, not trained again",
)
# Where the mean over variants gains: the one-wording recipe's runs read the same way average placeholder words only.
scored_row(
    "ella_unseen_objects_one_wording_variant_mean",
    "ella_unseen_objects",
    {"variant_mean": True},
    "the one-wording recipe's runs read as the mean over each prompt's 4 renamed variants (placeholder words only, "
    "one wording); scored, not trained again",
)
# Evaluation seeds of each split (seeds of the sampler's noise, not of the world).
SPLIT_SEEDS = {"adapter_train": [0], "held_out_combinations": [0, 1], "held_out_objects": [0, 1, 2]}
# Five worlds that together hold out every object once (found by search over make_splits(0..299)):
#   0: cherry, emerald, orange, sapphire      3: grape, lemon, pine tree, traffic cone
#   85, 141, 192: the other twelve (held_out_objects(S) lists them).
COVERING_SPLIT_SEEDS = (0, 3, 85, 141, 192)


def held_out_objects(split_seed: int) -> list[str]:
    from sur_lightning.toyworld.world import make_splits

    return sorted({name for name, _ in make_splits(split_seed).held_out_objects})


CHECKPOINT_EVERY = 200  # steps between a benchmark run's checkpoints


def compose(preset: str, overrides: list[str], out: Path, args, seed: int, steps: list[int], split_seed: int = 0):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = str(ROOT / "conf")
    at_steps = f"[{','.join(map(str, steps))}]"
    if preset in GENERATORS:
        # The tokenizer folder is the benchmark's own (tokenizer_for), passed in by the caller's overrides.
        callbacks = [f"callbacks.model_export.at_steps={at_steps}"]
    elif preset.startswith("unclip"):
        # unCLIP's presets export with callbacks=unclip's `export` (ModelExport).
        callbacks = [f"callbacks.export.at_steps={at_steps}"]
    else:
        callbacks = ["callbacks=default", "callbacks.sample_grid=null", f"callbacks.adapter_export.at_steps={at_steps}"]
    common = [
        f"+experiment={preset}",
        f"seed={seed}",
        f"data.root.seed={split_seed}",
        f"threads={args.threads}",
        f"trainer.max_steps={max(steps)}",
        f"trainer.val_check_interval={min(steps)}",
        "logger=csv",
        *callbacks,
        # A killed run resumes from its last checkpoint: every 200 steps, not at the first scored step (a run
        # killed at step 989 of 4,800 lost all of it).
        f"callbacks.model_checkpoint.every_n_train_steps={min(min(steps), CHECKPOINT_EVERY)}",
        "callbacks.model_checkpoint.save_top_k=1",
        f"paths.root_dir={ROOT}",
        f"paths.cache_dir={args.cache}",
        f"paths.output_dir={out}",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=common + overrides)


def world_out(args, split_seed: int) -> Path:
    """Everything of one world (split seed): its base columns' images and its runs. No two worlds share a file."""
    return args.out / f"split{split_seed}"


def train_run(name: str, seed: int, split_seed: int, args) -> Path:
    """Train one (row, seed) on one world to the last step, resuming a killed run; returns its folder."""
    from sur_lightning.train import train

    out = world_out(args, split_seed) / "runs" / name / f"seed{seed}"
    preset, overrides, _ = ROWS[name]
    if (out / "adapter.safetensors").exists() or (preset in GENERATORS and (out / GENERATORS[preset]).is_dir()):
        return out
    if preset == "pixelsnail_toy":
        overrides = overrides + [f"data.tokenizer={tokenizer_for(args)}"]
    cfg = compose(preset, overrides, out, args, seed, args.steps, split_seed)
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        cfg.ckpt_path = str(last)
    started = time.time()
    train(cfg)
    print(f"{name} seed {seed} split seed {split_seed}: trained in {time.time() - started:.0f} s", flush=True)
    return out


def tokenizer_for(args) -> Path:
    """The VQ tokenizer every PixelSNAIL run of this benchmark reads: ``+experiment=vqvae_toy`` (seed 0, about a
    minute), fitted once into ``<out>/runs/vqvae_toy`` and kept."""
    from sur_lightning.train import train

    out = args.out / "runs" / "vqvae_toy"
    if not (out / "tokenizer").is_dir():
        cfg = compose("vqvae_toy", ["callbacks.model_checkpoint.every_n_train_steps=20"], out, args, 0, [40])
        if (out / "checkpoints" / "last.ckpt").exists():
            cfg.ckpt_path = str(out / "checkpoints" / "last.ckpt")
        train(cfg)
    return out / "tokenizer"


def train_unclip(name: str, seed: int, split_seed: int, args) -> Path:
    """unCLIP's runs for one seed: the decoder (runs/unclip_decoder/seed<S>, ``--decoder-steps``), shared by every
    row of that seed, then for a prior row the prior sampled through it (runs/<row>/seed<S>, ``--steps``); each
    resumes a killed run. Returns the row's run folder."""
    from sur_lightning.train import train

    decoder_run = world_out(args, split_seed) / "runs" / RUN_FOLDER["unclip_oracle"] / f"seed{seed}"
    runs = [(decoder_run, "unclip_decoder_toy", [args.decoder_steps], "decoder", [])]
    if name != "unclip_oracle":
        preset, overrides, _ = ROWS[name]
        runs.append(
            (
                world_out(args, split_seed) / "runs" / name / f"seed{seed}",
                preset,
                args.steps,
                "unclip",
                [f"model.decoder={decoder_run / 'decoder'}", *overrides],
            )
        )
    for out, preset, steps, export, overrides in runs:
        if (out / export).exists():
            continue
        cfg = compose(preset, overrides, out, args, seed, steps, split_seed)
        last = out / "checkpoints" / "last.ckpt"
        if last.exists():
            cfg.ckpt_path = str(last)
        started = time.time()
        train(cfg)
        print(f"{preset} seed {seed} split seed {split_seed}: trained in {time.time() - started:.0f} s", flush=True)
    return runs[-1][0]


def true_image(prompts: dict):
    """``reference(prompt, seed)`` for the oracle: a fresh world image of the prompt's target (its complex prompt),
    from a generator keyed by prompt and seed. ``prompts``: one world's ``{split: prompts}``."""
    import random

    from sur_lightning.toyworld import world

    targets = {p.prompt: world.parse_toyworld(p.complex) for prompts_ in prompts.values() for p in prompts_}

    def reference(prompt: str, seed: int):
        return world.draw_example(*targets[prompt], random.Random(f"unclip-oracle:{prompt}:{seed}"))

    return reference


class Scorer:
    """The toy base, each world's three splits' prompts (each split with its own evaluation seeds, ≥ 128 images),
    the sampler and the checker, loaded once; renders and scores columns."""

    def __init__(self, args) -> None:
        from hydra.utils import instantiate

        from sur_lightning.evaluation.evaluator import Evaluator
        from sur_lightning.toyworld import world

        cfg = compose("sur_demo", [], args.out / "eval", args, 0, [1])
        self.backbone = instantiate(cfg.backbone)
        self.prompts = {
            split_seed: {split: world.suite(ROOT / "data" / "toyworld", split, seed=split_seed) for split in SPLITS}
            for split_seed in args.split_seeds
        }
        self.evaluator = Evaluator(compute=["shapes"])
        self.kwargs = {"num_inference_steps": args.eval_steps, "guidance_scale": args.guidance_scale, "batch_size": 32}
        self.llms: dict[str, torch.nn.Module] = {}
        self.args = args

    def rows(self, columns, out_dir: Path, split_seed: int) -> dict[str, list[dict]]:
        """{column: per-image rows} over every split of one world, each split with its seeds. The images are kept under
        ``out_dir`` (``images/<column>/<prompt id>_seed<k>.png``, 3 KB each), so a revised checker can rescore them."""
        from sur_lightning.evaluation.evaluator import score_columns
        from sur_lightning.generation.pipeline import render_columns

        rendered = []
        for split, prompts in self.prompts[split_seed].items():
            rendered += render_columns(
                self.backbone, columns, prompts, SPLIT_SEEDS[split], out_dir=out_dir, progress=False, **self.kwargs
            )
        report = score_columns(self.evaluator, rendered)
        return {column.name: learning_curve.image_rows(report, column.name) for column in columns}

    def base_rows(self, split_seed: int) -> dict[str, list[dict]]:
        from sur_lightning.generation.columns import Column, complex_prompt_column
        from sur_lightning.generation.conditioning import ClipConditioning, frozen_text_features

        every = [p for prompts in self.prompts[split_seed].values() for p in prompts]
        base = Column("base", ClipConditioning(frozen_text_features(self.backbone)))
        columns = [base, complex_prompt_column(self.backbone, every)]
        return self.rows(columns, world_out(self.args, split_seed) / "base", split_seed)

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

    def adapter(self, name: str, path: Path, split_seed: int) -> list[dict]:
        from sur_lightning.generation.columns import build_columns, pixelsnail_column

        if ROWS[name][0] in GENERATORS:  # its own sampler: codes drawn by the prior, decoded by the tokenizer
            column = pixelsnail_column(
                path, "adapter", llm=self.llm(name), guidance_scale=self.args.prior_guidance_scale
            )
        else:
            knobs = SCORED_FROM.get(name, (name, {}))[1]
            (column,) = build_columns(
                self.backbone, [str(path)], llm=lambda: self.llm(name), include_base=False, **knobs
            )
        column.name = "adapter"
        images = path.stem if name not in SCORED_FROM else f"{path.stem}@{name}"
        return self.rows([column], path.parent / "eval" / images, split_seed)["adapter"]

    def unclip(self, name: str, path: Path, split_seed: int) -> list[dict]:
        """A prior export (``unclip-step<N>/``), sampled prior -> decoder (the decoder its unclip.json names)."""
        from sur_lightning.generation.columns import unclip_column

        column = unclip_column(self.backbone, path, llm=self.llm(name), name="adapter")
        return self.rows([column], path.parent / "eval" / path.name, split_seed)["adapter"]

    def unclip_oracle(self, path: Path, split_seed: int) -> list[dict]:
        """A decoder export, given the image tower's embedding of a true image of each prompt."""
        from sur_lightning.generation.columns import oracle_column
        from sur_lightning.toyworld import shipped_image_tower

        column = oracle_column(
            self.backbone, path, shipped_image_tower(), true_image(self.prompts[split_seed]), name="adapter"
        )
        return self.rows([column], path.parent / "eval" / path.name, split_seed)["adapter"]


def score_unclip(name: str, run: Path, scorer: Scorer, done: dict, on_step, split_seed: int) -> None:
    """Score each step export of an unCLIP run: the prior's ``unclip-step<N>`` (and the final ``unclip``), or for the
    oracle the decoder's final export at its step."""
    if name != "unclip_oracle":
        exports = learning_curve.exported_adapters(run, prefix="unclip")
        for export in exports:
            if export["step"] not in done:
                done[export["step"]] = {
                    "train_seconds": export["train_seconds"],
                    "images": scorer.unclip(name, export["path"], split_seed),
                }
                on_step(export["step"], done[export["step"]])
        return
    exports = learning_curve.exported_adapters(run, prefix="decoder")
    if not exports:  # a decoder trained without a step export (before at_steps reached it): its final folder
        line = json.loads((run / "exports.jsonl").read_text().splitlines()[-1])
        exports = [{**line, "path": run / line["file"]}]
    export = exports[-1]
    if export["step"] not in done:
        done[export["step"]] = {
            "train_seconds": export["train_seconds"],
            "images": scorer.unclip_oracle(export["path"], split_seed),
        }
        on_step(export["step"], done[export["step"]])


def load_results(path: Path) -> dict:
    """``{"splits": {split seed: {"base": {column: rows} or None, "runs": {row: {seed: {step: result}}}}}}``.
    A file from before split seeds were an axis (``{"base", "runs"}`` at the top) is split seed 0's."""
    if not path.exists():
        return {"splits": {}}
    results = json.loads(path.read_text())
    worlds = results.get("splits", {"0": results})
    # JSON keys are strings; split seeds, training seeds and steps are ints here.
    return {
        "splits": {
            int(split_seed): {
                "base": world["base"],
                "runs": {
                    row: {int(seed): {int(step): v for step, v in steps.items()} for seed, steps in seeds.items()}
                    for row, seeds in world["runs"].items()
                },
            }
            for split_seed, world in worlds.items()
        }
    }


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(path)


def summaries(world: dict, rows: list[str]) -> dict[str, dict]:
    """One world's ``{row: summarise(...)}``."""
    base = world["base"]
    return {
        name: learning_curve.summarise(world["runs"][name], base["base"], base["base+complex"], SPLITS)
        for name in rows
        if world["runs"].get(name)
    }


def pooled_summaries(results: dict, rows: list[str], split_seeds: list[int]) -> dict[str, dict]:
    """``{row: summarise_pooled(...)}`` over the split seeds where the row has runs."""
    curves = {}
    for name in rows:
        worlds = {
            s: (
                results["splits"][s]["runs"][name],
                results["splits"][s]["base"]["base"],
                results["splits"][s]["base"]["base+complex"],
            )
            for s in split_seeds
            if s in results["splits"] and results["splits"][s]["runs"].get(name)
        }
        if worlds:
            curves[name] = learning_curve.summarise_pooled(worlds, SPLITS)
    return curves


def row_settings(name: str) -> str:
    """How a row was trained (its overrides, or its preset), and for a scored row what it was read with."""
    preset, overrides, _ = ROWS[name]
    trained = f"`{' '.join(overrides) or preset}`"
    if name not in SCORED_FROM:
        return trained
    source, settings = SCORED_FROM[name]
    read = " ".join(f"{k}={v}" for k, v in settings.items())
    return f"the runs of `{source}` ({trained}), read with `{read}`"


def seeds_in(worlds: list[dict], rows: list[str]) -> list[int]:
    """The training seeds the given rows have results for in these worlds (not --seeds: --report-only reads
    whatever a results file holds)."""
    return sorted({int(seed) for world in worlds for row in rows for seed in world["runs"].get(row, {})})


def base_rates(worlds: list[dict], column: str, split: str) -> list[float]:
    """A base column's colour, shape, count and valid rates on one split, each world weighted equally (empty when
    no world has images of that split)."""
    per_world = []
    for world in worlds:
        split_rows = [r for r in world["base"][column] if r["category"] == split]
        if not split_rows:
            continue
        per_world.append([sum(r.get(m, 0) for r in split_rows) / len(split_rows) for m in learning_curve.RATES])
    return [sum(rates) / len(per_world) for rates in zip(*per_world)]


def markdown(curves: dict[str, dict], world: dict, args) -> str:
    """One world's curve table (every row × step, every split's accuracies and gaps closed, with 95 % intervals),
    after the base's bounds."""
    fmt = learning_curve.fmt
    lines = [
        (
            f"Training seeds {seeds_in([world], list(curves))} (a row's figures average the seeds it has finished; "
            "`seeds` says how many), "
            f"evaluation seeds per split {SPLIT_SEEDS}, DDIM {args.eval_steps} steps, CFG {args.guidance_scale}. "
            "Intervals: 95 %, two-level bootstrap (training seeds, then prompt × seed pairs)."
        ),
        "",
        "### Base bounds",
        "",
        "| split | n | base + simple: colour / shape / count / valid | base + complex: colour / shape / count / valid |",
        "|---|---|---|---|",
    ]
    for split in SPLITS:
        cells = [" / ".join(f"{v:.2f}" for v in base_rates([world], c, split)) for c in ("base", "base+complex")]
        n = sum(r["category"] == split for r in world["base"]["base"])
        lines.append(f"| {split} | {n} | {cells[0]} | {cells[1]} |")
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
                    + " | ".join(values + gaps + [valid])
                    + " |"
                )
    lines += ["", "Rows:", ""] + [f"- `{name}`: {ROWS[name][2]} ({row_settings(name)})" for name in curves]
    return "\n".join(lines) + "\n"


def pooled_markdown(curves: dict[str, dict], results: dict, args) -> str:
    """The rows pooled over worlds, with the worst world beside each gap; then, at each row's last step, every
    held-out object's and every shape's accuracies and valid-image rate, pooled over training seeds."""
    from sur_lightning.toyworld.world import OBJECTS_BY_NAME, prompt_object

    fmt = learning_curve.fmt
    worlds = [s for s in args.split_seeds if s in results["splits"]]
    trained = seeds_in([results["splits"][s] for s in worlds], list(curves))
    lines = [
        (
            f"Split seeds (worlds) {worlds}, training seeds {trained}, evaluation seeds per split {SPLIT_SEEDS}, "
            f"DDIM {args.eval_steps} steps, CFG {args.guidance_scale}. Pooled: each world weighted equally; 95 % "
            "intervals from a three-level bootstrap (split seeds, training seeds, prompt × seed pairs). Worst: the "
            "world whose own mean gap closed is lowest."
        ),
        "",
        "Held-out objects of each world: " + "; ".join(f"{s}: {', '.join(held_out_objects(s))}" for s in worlds) + ".",
        "",
        "### Base bounds, pooled over worlds",
        "",
        (
            "The frozen base read the simple prompt (the floor) and the complex one (the reference each gap is closed "
            "towards). Its valid-image rate with the complex prompt is the rate a connector that matched it would "
            "reach."
        ),
        "",
        "| split | base + simple: colour / shape / count / valid | base + complex: colour / shape / count / valid |",
        "|---|---|---|",
    ]
    for split in SPLITS:
        bases = [results["splits"][s] for s in worlds if results["splits"][s]["base"]]
        cells = [" / ".join(f"{v:.2f}" for v in base_rates(bases, c, split)) for c in ("base", "base+complex")]
        if cells[0]:  # a split no world scored has no bounds
            lines.append(f"| {split} | {cells[0]} | {cells[1]} |")
    for split in SPLITS[1:]:
        lines += [
            "",
            f"### {split}: gap closed, pooled over worlds",
            "",
            "| row | step | worlds | runs | colour | worst world | shape | worst world | count | valid |",
            "|---" * 10 + "|",
        ]
        for name, summary in curves.items():
            for step, entry in sorted(summary.items()):
                cell, worst = entry[split], entry["worst"][split]

                def worst_cell(metric, worst=worst):
                    w = worst.get(metric)
                    return f"{w['mean']:.2f} (split {w['split_seed']})" if w else "–"

                lines.append(
                    f"| {name} | {step} | {entry['split_seeds']} | {entry['seeds']} | "
                    f"{fmt(cell.get('gap_color_accuracy'))} | {worst_cell('gap_color_accuracy')} | "
                    f"{fmt(cell.get('gap_shape_accuracy'))} | {worst_cell('gap_shape_accuracy')} | "
                    f"{fmt(cell.get('gap_count_accuracy'))} | {fmt(cell.get('valid_image'))} |"
                )
    split = "held_out_objects"
    for name, summary in curves.items():
        step = max(summary)
        images, base_by_object = [], {}
        for s in worlds:
            world = results["splits"][s]
            runs = world["runs"].get(name, {})
            if not runs or any(step not in r for r in runs.values()):
                continue
            images += [row for r in runs.values() for row in r[step]["images"]]
            for column in ("base", "base+complex"):
                for obj, cell in learning_curve.breakdown(world["base"][column], prompt_object, split).items():
                    base_by_object.setdefault(obj, {})[column] = cell
        if not images:
            continue

        def shape_of(prompt_id: str) -> str:
            return OBJECTS_BY_NAME[prompt_object(prompt_id)].shape

        def rates(cell: dict) -> str:
            return " | ".join(f"{cell.get(m, float('nan')):.2f}" for m in learning_curve.RATES)

        lines += [
            "",
            f"### {name} at step {step}: held-out objects one by one (pooled over training seeds)",
            "",
            (
                "| object | shape | colour | world | images | colour | shape | count | valid "
                "| base + simple: colour / shape | base + complex: colour / shape |"
            ),
            "|---" * 11 + "|",
        ]
        by_object = learning_curve.breakdown(images, prompt_object, split)
        for obj in sorted(by_object, key=lambda o: (OBJECTS_BY_NAME[o].shape, o)):
            info, cell = OBJECTS_BY_NAME[obj], by_object[obj]
            owner = ", ".join(str(s) for s in worlds if obj in held_out_objects(s))
            bounds = [
                " / ".join(
                    f"{base_by_object.get(obj, {}).get(c, {}).get(m, float('nan')):.2f}"
                    for m in ("color_accuracy", "shape_accuracy")
                )
                for c in ("base", "base+complex")
            ]
            lines.append(
                f"| {obj} | {info.shape} | {info.color} | {owner} | {cell['images']} | {rates(cell)} "
                f"| {bounds[0]} | {bounds[1]} |"
            )
        lines += ["", "| shape | held-out objects | images | colour | shape | count | valid |", "|---" * 7 + "|"]
        for shape, cell in learning_curve.breakdown(images, shape_of, split).items():
            objects = sorted(o for o in by_object if OBJECTS_BY_NAME[o].shape == shape)
            lines.append(f"| {shape} | {', '.join(objects)} | {cell['images']} | {rates(cell)} |")
    lines += ["", "Rows:", ""] + [f"- `{name}`: {ROWS[name][2]} ({row_settings(name)})" for name in curves]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--split-seeds",
        nargs="+",
        type=int,
        default=[0],
        help=f"worlds; {' '.join(map(str, COVERING_SPLIT_SEEDS))} hold out every object once",
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[300, 600, 1200, 2400])
    parser.add_argument(
        "--decoder-steps", type=int, default=1500, help="unCLIP's decoder budget (rows unclip, unclip_oracle)"
    )
    parser.add_argument("--eval-steps", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--prior-guidance-scale", type=float, default=3.0, help="CFG of the pixelsnail row's sampler")
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
        for split_seed in args.split_seeds:
            world = results["splits"].setdefault(split_seed, {"base": None, "runs": {}})
            if world["base"] is None:
                world["base"] = scorer.base_rows(split_seed)
                save_results(results_file, results)
        # Seed-major: every row's training seed 0 on every world lands before any seed 1.
        for seed in args.seeds:
            for split_seed in args.split_seeds:
                world = results["splits"][split_seed]
                for name in args.rows:
                    done = world["runs"].setdefault(name, {}).setdefault(seed, {})
                    wanted = [args.decoder_steps] if name == "unclip_oracle" else args.steps
                    if all(step in done for step in wanted):
                        continue
                    if name in UNCLIP_ROWS:
                        run = train_unclip(name, seed, split_seed, args)
                    else:
                        run = train_run(SCORED_FROM.get(name, (name,))[0], seed, split_seed, args)

                    def on_step(step, result, name=name, seed=seed, world=world, split_seed=split_seed):
                        world["runs"][name][seed][step] = result
                        save_results(results_file, results)
                        gaps = learning_curve.summarise(
                            {0: {step: result}}, world["base"]["base"], world["base"]["base+complex"], SPLITS, n_boot=10
                        )[step]
                        shown = {s: learning_curve.fmt(gaps[s].get("gap_color_accuracy")) for s in SPLITS}
                        print(
                            f"{name} seed {seed} split seed {split_seed} step {step}: colour gap closed {shown}",
                            flush=True,
                        )

                    if name in UNCLIP_ROWS:
                        score_unclip(name, run, scorer, done, on_step, split_seed)
                    else:
                        learning_curve.score_run(
                            run,
                            lambda path, name=name, s=split_seed: scorer.adapter(name, path, s),
                            done,
                            on_step,
                            steps=wanted,  # a scored-from row may read fewer steps than its runs exported
                        )

    worlds = [s for s in args.split_seeds if s in results["splits"] and results["splits"][s]["base"]]
    per_world = {
        s: summaries(results["splits"][s], [n for n in args.rows if n in results["splits"][s]["runs"]]) for s in worlds
    }
    if len(worlds) == 1:
        curves = per_world[worlds[0]]
        table = markdown(curves, results["splits"][worlds[0]], args)
    else:
        curves = pooled_summaries(results, args.rows, worlds)
        table = pooled_markdown(curves, results, args) + "".join(
            f"\n## World {s} (held out: {', '.join(held_out_objects(s))})\n\n"
            + markdown(per_world[s], results["splits"][s], args)
            for s in worlds
        )
        (args.out / "summary_by_split.json").write_text(
            json.dumps(
                {str(s): {k: {str(step): v for step, v in c.items()} for k, c in per_world[s].items()} for s in worlds},
                indent=1,
            )
        )
    (args.out / "results.md").write_text(table)
    (args.out / "summary.json").write_text(
        json.dumps({k: {str(s): v for s, v in c.items()} for k, c in curves.items()}, indent=1)
    )
    learning_curve.chart(curves, SPLITS, args.out / "curve_steps.png", x="step")
    learning_curve.chart(curves, SPLITS, args.out / "curve_seconds.png", x="train_seconds")
    print(table)
    print(f"wrote {args.out / 'results.md'}, {args.out / 'curve_steps.png'}, {args.out / 'curve_seconds.png'}")


if __name__ == "__main__":
    main()
