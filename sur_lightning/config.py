"""The run's configuration, shared by every entry point: where ``conf/`` is, the interpolations, the checks
that run before any model loads, and what the process needs to know about its environment.

- ``CONFIG_DIR``, ``check_config(cfg)`` (resolve every value now), ``use_wandb_offline_without_key()``,
  ``process_rank()`` (before torch.distributed starts), ``datamodule_arguments(cfg)`` (the rewriter the
  datamodule needs for a training config, or nothing), ``feature_cache_arguments(cfg)`` (what names its
  feature cache: ``FeatureCache.open(**feature_cache_arguments(cfg))``).

What makes one Hydra multirun compare connectors, LLMs and losses: configs that follow the connector,
a check of every job's combination before the first job starts, and W&B names per job and sweep.

- ``${llm_pooling:${connector._target_}}`` (the LLM configs' ``pooling``): SUR distils one pooled state,
  ELLA reads token states, so ``llm=smollm2`` serves both connectors of ``connector=sur,ella``.
- ``check_combination(cfg)``: raises ``IncompatibleConfigError`` naming the pair of choices that cannot
  train together (ELLA with an alignment loss, SUR with token states, caption dropout with the UNet teacher).
  ``train`` calls it first; ``PreflightCheck`` (a Hydra callback) calls it for every job of a
  multirun before the first one starts.
- ``${wandb_run_name:${task_name},<connector>,${seed}}``, ``${wandb_group:${task_name}}``, ``${connector_name:...}``:
  a short W&B run name (task, connector, seed and a hash of the overrides), one group per sweep, and its
  ``job_type`` is the connector.

Resuming a run in place: ``${run_dir:<a fresh folder>,${ckpt_path}}`` (conf/hydra/default.yaml) is the folder
Hydra runs the job in: the run being resumed for ``ckpt_path=last`` (the newest run of the task with a
checkpoint) or ``ckpt_path=<run folder>``, else the fresh one. ``run_checkpoint(folder)`` is that run's newest
checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sur_lightning.models.connectors import connector_config, connector_name, reads_token_states

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class IncompatibleConfigError(ValueError):
    """Two config choices that cannot train together; the message names both and what to use instead."""


def llm_pooling(target: str | None) -> str:
    """The LLM pooling the connector reads: ``none`` (token states) for ELLA, ``mean`` for SUR."""
    return "none" if reads_token_states(target) else "mean"


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def command_line_overrides() -> list[str]:
    """The job's overrides as typed (``backbone=sd15``, ``adapters=[...]``); empty outside a Hydra main."""
    hydra_config = _hydra()
    return list(hydra_config.overrides.task) if hydra_config is not None else []


def wandb_run_name(task_name: str, connector: str | None = None, seed: int | None = None) -> str:
    """``demo-ella-s42-3f9c1a``: the task, the connector, the seed and a 6-hex hash of the job's overrides
    (hydra.job.override_dirname, which leaves out paths, the preset and ckpt_path), so two jobs of a sweep get
    two names that fit in W&B's run list. No hash without overrides or outside Hydra. The overrides themselves
    are in the run's config (``overrides``, logged by train.py)."""
    hydra = _hydra()
    overrides = hydra.job.override_dirname if hydra is not None else ""
    parts = [task_name, connector, f"s{seed}" if seed is not None else None]
    if overrides:
        parts.append(hashlib.sha1(overrides.encode()).hexdigest()[:6])
    return "-".join(str(p) for p in parts if p)


def wandb_group(task_name: str) -> str:
    """One W&B group per multirun (``demo-2026-12-01_23-50-00``, the sweep folder's name); the task name otherwise."""
    hydra = _hydra()
    if hydra is not None and str(hydra.mode) == "RunMode.MULTIRUN":
        return f"{task_name}-{Path(hydra.sweep.dir).name}"
    return task_name


def register_resolvers() -> None:
    for name, function in {
        "llm_pooling": llm_pooling,
        "connector_name": connector_name,
        "wandb_run_name": wandb_run_name,
        "wandb_group": wandb_group,
        "run_dir": run_dir,
        "hydra_subdir": hydra_subdir,
        "newest_export": newest_export,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


# ------------------------------------------------------------------------------------------ resuming a run folder

# What Lightning's ckpt_path="last" picks from: ModelCheckpoint(save_last=True) and OnExceptionCheckpoint, both
# written to <run>/checkpoints by conf/callbacks/*.yaml.
RESUMABLE = ("last.ckpt", "on_exception.ckpt")


def run_checkpoint(folder: str | Path) -> Path | None:
    """The newest of ``<folder>/checkpoints/{last,on_exception}.ckpt`` (the step a killed or crashed run
    reached), or None."""
    found = [p for p in (Path(folder) / "checkpoints" / name for name in RESUMABLE) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def newest_run(runs: str | Path) -> Path | None:
    """The run folder under ``runs`` (``outputs/<task>/runs``) whose checkpoint was written last: the run
    trained most recently, which a resumed run is too, whatever its folder's time stamp says."""
    folders = [p for p in Path(runs).iterdir() if p.is_dir()] if Path(runs).is_dir() else []
    checkpoints = [c for c in map(run_checkpoint, folders) if c is not None]
    return max(checkpoints, key=lambda p: p.stat().st_mtime).parent.parent if checkpoints else None


def newest_export(runs: str, name: str) -> str:
    """``<the newest run under runs>/<name>``: e.g. the tokenizer of the newest ``+experiment=vqvae_toy`` run, which
    ``data=codes`` reads by default. Stops naming the folder and the fix when there is none."""
    run = newest_run(runs)
    if run is None or not (run / name).is_dir():
        raise FileNotFoundError(
            f"no run under {runs} has a {name}/ folder: train one first (python -m sur_lightning.train "
            f"+experiment={Path(runs).parent.name}), or name the folder (data.{name}=<folder>)"
        )
    return str(run / name)


def run_dir(fresh: str, ckpt_path: str | None) -> str:
    """The folder Hydra runs a training job in (``hydra.run.dir``), chosen before the job starts.

    ``ckpt_path=last``: the newest run of this task under ``fresh``'s parent (``newest_run``), resumed in place;
    ``ckpt_path=<a run folder>``: that folder; otherwise (no ckpt_path, a .ckpt file, or nothing to resume)
    the fresh folder. ``train`` then stops with a message where ``ckpt_path`` asked for a resume it cannot find."""
    if ckpt_path is None:
        return fresh
    if str(ckpt_path) == "last":
        found = newest_run(Path(fresh).parent)
        return str(found) if found is not None else fresh
    return str(ckpt_path) if Path(ckpt_path).is_dir() else fresh


def hydra_subdir(run_folder: str, stamp: str) -> str:
    """Where Hydra writes the job's config.yaml/overrides.yaml (``hydra.output_subdir``): ``.hydra``, or in a
    folder that already has one (a run resumed in place) ``.hydra/resumed-<stamp>``, so the run's original
    config stays beside each resume's."""
    return f".hydra/resumed-{stamp}" if (Path(run_folder) / ".hydra" / "config.yaml").exists() else ".hydra"


# ------------------------------------------------------------------------------------------ checks


def _choice(choices: dict, group: str, fallback: str) -> str:
    return f"{group}={choices[group]}" if choices.get(group) else fallback


def check_combination(cfg: DictConfig, choices: dict | None = None) -> None:
    """Raise ``IncompatibleConfigError`` when the connector, LLM and losses of ``cfg`` cannot train together.

    ``choices``: group -> option as the user picked them (Hydra's ``runtime.choices``), for the message.
    """
    if OmegaConf.select(cfg, "connector") is None:
        # A model that is not a connector (model=vqvae, pixelsnail, unclip_prior, unclip_decoder: their presets set
        # connector: null) checks its own inputs when it is built.
        return
    if choices is None:
        hydra = _hydra()
        choices = dict(hydra.runtime.choices) if hydra is not None else {}
    target = str(OmegaConf.select(cfg, "connector._target_") or "")
    kind = connector_name(target)
    connector = _choice(choices, "connector", f"connector={kind}")
    llm_cfg = OmegaConf.select(cfg, "llm")
    llm_target = str(OmegaConf.select(cfg, "llm._target_") or "")
    llm = _choice(choices, "llm", f"llm={llm_target.rpartition('.')[2] or 'null'}")
    has_alignment = (
        OmegaConf.select(cfg, "model.prompt_loss") is not None or OmegaConf.select(cfg, "model.llm_loss") is not None
    )
    loss = _choice(choices, "loss", "an alignment loss")
    try:
        reads_tokens = reads_token_states(target)
    except (ImportError, AttributeError, ValueError):  # an unimportable target fails with its own message later
        reads_tokens = False
    gives_tokens = None
    if llm_cfg is not None:
        gives_tokens = llm_target.endswith("T5EncoderFeatures") or OmegaConf.select(cfg, "llm.pooling") == "none"

    if reads_tokens and llm_target.endswith("MultiTeacherFeatures"):
        raise IncompatibleConfigError(
            f"{connector} and {llm} are incompatible: several teachers are distilled into SUR's encoder through one "
            f"W0 each; ELLA reads one LLM's token states. Use connector=sur, or one llm."
        )
    if reads_tokens and has_alignment:
        raise IncompatibleConfigError(
            f"{connector} and {loss} are incompatible: the alignment terms compare SUR's 77-token output with "
            f"CLIP(complex prompt) and distil the LLM into SUR's encoder; ELLA has neither (it reads the LLM "
            f"directly). Train ELLA with loss=denoising."
        )
    if reads_tokens and llm_cfg is None and OmegaConf.select(cfg, "model.llm_dim") is None:
        raise IncompatibleConfigError(f"{connector} needs LLM token states, but llm is null: pick an llm")
    if reads_tokens and gives_tokens is False:
        raise IncompatibleConfigError(
            f"{connector} and {llm} with llm.pooling=mean are incompatible: ELLA reads token states. "
            f"Leave llm.pooling at its default (it follows the connector) or set llm.pooling=none."
        )
    if not reads_tokens and gives_tokens:
        raise IncompatibleConfigError(
            f"{connector} and {llm} are incompatible: SUR distils one pooled LLM state per prompt, and {llm} "
            f"gives token states. Use a causal LM with llm.pooling=mean (its default under connector=sur)."
        )
    unknown = unknown_connector_keys(cfg)
    if unknown:
        raise IncompatibleConfigError(
            f"{connector} does not take {', '.join(unknown)}: these keys belong to another connector "
            f"(set by a preset or an override); drop them or pick that connector"
        )
    dropout = OmegaConf.select(cfg, "model.caption_dropout") or 0.0
    if dropout and OmegaConf.select(cfg, "model.teacher_prediction_loss") is not None:
        raise IncompatibleConfigError(
            f"model.caption_dropout={dropout} and loss/teacher=unet are incompatible: a dropped caption's prediction "
            f"would be pulled toward the UNet under the complex prompt of the caption it replaced. Drop "
            f"+loss/teacher=unet, or set model.caption_dropout=0."
        )


def unknown_connector_keys(cfg: DictConfig) -> list[str]:
    """Keys of ``cfg.connector`` that its class's constructor does not take (``dim``/``llm_dim`` are filled in later)."""
    import inspect

    from hydra.utils import get_class

    node = OmegaConf.select(cfg, "connector")
    if node is None or "_target_" not in node:
        return []
    try:
        parameters = inspect.signature(get_class(node._target_)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):  # fails with its own message at instantiation
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return sorted(k for k in node if not k.startswith("_") and k not in parameters)


class PreflightCheck(Callback):
    """A Hydra callback: before a multirun's first job, compose every job's config and check its combination,
    so an incompatible pair stops the sweep at once instead of failing in job 7 of 8."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if "basic_sweeper" not in str(OmegaConf.select(config, "hydra.sweeper._target_") or ""):
            return  # other sweepers draw their jobs as they go: each job checks itself in train()
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        config_name = OmegaConf.select(config, "hydra.job.config_name") or "train"
        problems = []
        for job in jobs:
            job_cfg = compose(config_name=config_name, overrides=list(job), return_hydra_config=True)
            choices = dict(job_cfg.hydra.runtime.choices)
            try:
                check_combination(job_cfg, choices)
            except IncompatibleConfigError as error:
                problems.append(f"  job {' '.join(job)}:\n    {error}")
        if problems:
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings and carries on.
            raise SystemExit(
                f"IncompatibleConfigError: {len(problems)} of {len(jobs)} jobs of this sweep cannot train; "
                "none was started:\n" + "\n".join(problems)
            )
        print(f"sweep pre-flight: all {len(jobs)} jobs are compatible", flush=True)


# ------------------------------------------------------------------------------------------ the process


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def use_wandb_offline_without_key() -> None:
    """W&B must never prompt or block: without an API key, log to an offline run (``wandb sync`` later)."""
    if os.environ.get("WANDB_MODE") is None and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"


def check_config(cfg: DictConfig) -> dict:
    """Resolve every value now, so a missing or malformed one fails before any model loads."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def process_rank() -> int:
    """This process's rank before torch.distributed starts: ``RANK`` (torchrun, Lightning), ``SLURM_PROCID``, or
    for Lightning's own launcher ``NODE_RANK``/``LOCAL_RANK`` (any non-zero one means "not the first process")."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return int(os.environ.get("NODE_RANK", "0") or 0) + int(os.environ.get("LOCAL_RANK", "0") or 0)


# ------------------------------------------------------------------------------------------ wiring a training config


ALIGN_TARGETS = ("complex", "rewrite", "both")


def datamodule_arguments(cfg: DictConfig) -> dict:
    """The datamodule's rewriter arguments for a training config: the rewriter (``cfg.rewriter``) only when
    ``loss.align_target`` needs rewrites or ``data.simple_from=llm``, so other runs never load its LLM."""
    from hydra.utils import instantiate

    align_target = (cfg.get("loss") or {}).get("align_target", "complex")
    if align_target not in ALIGN_TARGETS:
        raise ValueError(f"loss.align_target must be one of {ALIGN_TARGETS}, got {align_target!r}")
    rewrite = align_target != "complex" and (cfg.loss.get("prompt") is not None)
    if not rewrite and cfg.data.get("simple_from") != "llm":
        return {}
    if cfg.get("rewriter") is None:
        raise ValueError(
            "loss.align_target=rewrite|both and data.simple_from=llm need a rewriter: add rewriter=smollm2"
        )
    return {"rewriter": instantiate(cfg.rewriter), "rewrite": rewrite}


def feature_cache_arguments(cfg: DictConfig) -> dict:
    """What names a training config's feature cache (``FeatureCache.open``): its folder, the backbone's and the
    LLM's config nodes (the producers, also built from them to fill what is missing), and how images are read."""
    return {
        "cache_dir": cfg.data.cache_dir,
        "backbone": cfg.backbone,
        "llm": cfg.get("llm"),
        "resolution": cfg.data.resolution,
        "max_image_pixels": cfg.data.get("max_image_pixels"),
    }


# ------------------------------------------------------------------------------------------ wiring a generate/evaluate config


def evaluator_arguments(cfg: DictConfig) -> dict:
    """``Evaluator``'s arguments from an evaluate/explore config: ``metrics`` (compute and each metric's settings),
    ``reference``, ``reference_size`` and ``device``; diversity without two seeds per prompt is refused here."""
    metrics = OmegaConf.to_container(cfg.metrics, resolve=True)
    if "diversity" in metrics["compute"] and len(cfg.seeds) < 2 and not cfg.get("images_dir"):
        raise ValueError("metrics.compute has diversity, which needs at least 2 seeds per prompt: set seeds=[0,1,2,3]")
    return {
        "reference": cfg.get("reference"),
        "reference_size": cfg.get("reference_size"),
        "device": cfg.device,
        **metrics,
    }


def column_arguments(cfg: DictConfig) -> dict:
    """``generation.columns.grid_columns``'s arguments after the backbone and prompts, from a generate/evaluate/
    explore config: the adapters, the LLM's config node (built only for a connector that reads token states),
    mode, η or its sweep, whether the base columns are drawn, the negative prompt's conditioning, whether an
    ELLA + RAG connector is read over its renamed variants (``variant_mean``), the
    PixelSNAIL exports drawn as columns of their own, and the unCLIP prior export (and the pipeline that draws it)."""
    return {
        "adapters": cfg.adapters,
        "llm_config": cfg.get("llm"),
        "mode": cfg.mode,
        "eta": cfg.eta,
        "eta_sweep": list(cfg.eta_sweep or []),
        "include_base": cfg.include_base,
        "negative": cfg.get("negative", "connector"),
        "variant_mean": cfg.get("variant_mean"),
        "pixelsnail": list(cfg.get("pixelsnail") or []),
        "unclip": cfg.get("unclip"),
        "unclip_pipeline": cfg.get("unclip_pipeline"),
    }


def adapter_label(path: str | Path) -> str:
    """A name for an adapter file: its stem, or for a run's ``adapter.safetensors`` the connector and the
    run's experiment (``sur-demo``, ``ella_demo``, ``sur_paper``), read from its config and ``.hydra/config.yaml``."""
    import yaml

    path = Path(path)
    if path.stem != "adapter":
        return path.stem
    try:
        target = connector_config(path).get("_target_", "")
    except (OSError, ValueError):
        target = ""
    kind = connector_name(target) if target else "adapter"
    run_config = path.parent / ".hydra" / "config.yaml"
    task = yaml.safe_load(run_config.read_text()).get("task_name") if run_config.exists() else None
    if not task:
        return kind
    return str(task) if kind in str(task) else f"{kind}-{task}"


GROUPS = ("backbone", "llm")


def chosen_groups(overrides) -> set[str]:
    """Which of ``backbone`` / ``llm`` the command line chose as a group (``backbone=sd15``, ``llm=null``);
    a dotted override (``backbone.dtype=bfloat16``) changes a node without choosing it."""
    keys = {override.partition("=")[0].lstrip("+~") for override in overrides}
    return {group for group in GROUPS if group in keys}


def use_recorded(cfg: DictConfig, records: list[tuple[str, dict]], overrides=()) -> list[str]:
    """Give ``cfg`` the backbone and LLM its adapters were trained with, except a group the command line chose.
    ``records``: (adapter path, what it was trained with) per adapter (``generation.columns.adapter_records``).
    Dotted overrides (``backbone.dtype=bfloat16``) still apply on top of the recorded node. Returns one line per
    group taken from a record; adapters recorded with different components stop here, naming them."""
    from omegaconf import open_dict

    chosen = chosen_groups(overrides)
    notes = []
    for group in GROUPS:
        if group in chosen:
            continue
        found = [(path, record[group]) for path, record in records if record.get(group)]
        if not found:
            continue
        ids = {str(entry.get("id")) for _, entry in found}
        if len(ids) > 1:
            listed = ", ".join(f"{path}: {entry.get('id')}" for path, entry in found)
            raise ValueError(
                f"the adapters were trained with different {group}s ({listed}): choose one with {group}=..."
            )
        path, entry = found[0]
        node = OmegaConf.create(entry["config"])
        for override in overrides:  # dotted overrides of this group, as the command line set them
            key = override.partition("=")[0].lstrip("+~")
            if key.startswith(group + "."):
                OmegaConf.update(node, key[len(group) + 1 :], OmegaConf.select(cfg, key), force_add=True)
        with open_dict(cfg):
            cfg[group] = node
        notes.append(f"{group}: {entry.get('id')} (recorded by {path}; set {group}=... to choose another)")
    return notes
