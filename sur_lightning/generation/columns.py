"""Columns: what one column of a generated grid is conditioned by, built from adapter files.

A ``Column`` is a name, a conditioning and a description of its source. ``build_columns`` gives the base
column and one per adapter (or per η of a sweep), each checked against the backbone and LLM on an empty
prompt, so a mismatch fails naming the adapter file. ``complex_prompt_column`` is the base model given
each prompt's complex prompt (the upper bound). ``unclip_column`` / ``oracle_column`` draw with unCLIP's prior ->
decoder and its decoder alone (``generation/unclip.py``), ``stock_unclip_column`` with diffusers'
``StableUnCLIPPipeline`` around a prior exported in its format, ``pixelsnail_column`` with a PixelSNAIL export
(``generation/pixelsnail.py``): both through ``Column.render``. ``grid_columns`` gives a grid's columns from the
values of a generate/evaluate config (``config.column_arguments``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.generation.conditioning import (
    ClipConditioning,
    NonFiniteConditioningError,
    frozen_text_features,
    read_connector,
)
from sur_lightning.models.connectors import TextFeatures


@dataclass
class Column:
    """One column of images: a label, a folder-safe slug, its conditioning, and what it came from.

    ``render``: for a generator that is not the UNet under a text conditioning (unCLIP's prior -> decoder,
    ``generation/unclip.py``; PixelSNAIL, ``generation/pixelsnail.py``), the callable that draws the column's
    images instead, ``render(prompts, seeds, scheduler=, negative_prompt=, num_inference_steps=, guidance_scale=,
    height=, width=) -> list[PIL.Image]``, one image per (prompt, seed); its ``conditioning`` is then None.
    """

    name: str
    conditioning: ClipConditioning | None
    source: dict = field(default_factory=dict)
    render: Callable[..., list] | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.replace("eta=", "eta")).strip("_")


def needs_llm(connector: nn.Module) -> bool:
    """SUR reads the LLM only as a distillation target in training; a connector that reads its token states
    (ELLA; unknown connectors are assumed to) needs it to condition."""
    return getattr(connector, "reads_token_states", True)


ADAPTER_KEYS = ("path", "mode", "eta", "format", "negative", "variant_mean")


def adapter_entries(adapters) -> list[tuple[str, dict]]:
    """``adapters``: a list of paths, or a mapping name -> path or name -> {path, mode, eta, format, negative,
    variant_mean} (``ADAPTER_KEYS``; another key is an error naming it). Returns (name, {path, ...}) pairs. A mapping's keys are the names; a list's names come
    from each adapter (``adapter_label``: ``sur-demo``), with the run folder added only to tell two apart."""
    from omegaconf import OmegaConf

    from sur_lightning.config import adapter_label

    if OmegaConf.is_config(adapters):
        adapters = OmegaConf.to_container(adapters, resolve=True)
    if not adapters:
        return []
    if isinstance(adapters, Mapping):
        items = [(str(k), v if isinstance(v, dict) else {"path": v}) for k, v in adapters.items()]
    else:
        items = [(adapter_label(entry), {"path": str(entry)}) for entry in adapters]
        labels = [name for name, _ in items]
        items = [
            (name if labels.count(name) == 1 else f"{name} ({Path(spec['path']).parent.name})", spec)
            for name, spec in items
        ]
    for name, spec in items:
        unknown = sorted(set(spec) - set(ADAPTER_KEYS))
        if unknown or "path" not in spec:
            raise ValueError(
                f"adapter {name!r}: {'unknown keys ' + str(unknown) if unknown else 'no path'}; an adapter entry "
                f"takes {', '.join(ADAPTER_KEYS)}"
            )
    names = [name for name, _ in items]
    return [(name if names.count(name) == 1 else f"{name}-{i}", spec) for i, (name, spec) in enumerate(items)]


ADAPTER_FORMATS = ("sur_lightning", "official")


def load_adapter(path, file_format: str = "sur_lightning", dim: int | None = None) -> nn.Module:
    """A connector this project wrote (an ``adapter/`` folder, or ``adapter.safetensors`` + config), or the SUR
    authors' ``adapter_checkpoint*.pt`` (``format: official``: their released module, η = 0.1). ``dim``: the
    UNet's cross-attention width; a connector trained for another fails naming both."""
    from sur_lightning.models.connectors import load_connector
    from sur_lightning.models.connectors.sur import official_adapter

    if file_format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter {path}: format must be one of {ADAPTER_FORMATS}, got {file_format!r}")
    return official_adapter(path) if file_format == "official" else load_connector(path, dim=dim)


def build_columns(
    backbone,
    adapters=None,
    llm: nn.Module | Callable[[], nn.Module] | None = None,
    mode: str = "replace",
    eta: float | None = None,
    eta_sweep: Sequence[float] = (),
    include_base: bool = True,
    negative: str = "connector",
    variant_mean: bool | None = None,
) -> list[Column]:
    """The base column, then per adapter one column (η overridden by ``eta`` when set) or one per η of
    ``eta_sweep``. ``llm``: the LLM module, or a zero-argument function loading it only when a connector
    needs it (ELLA), on the backbone's device. Each adapter is checked against the backbone and LLM on
    an empty prompt, so a mismatch fails here naming the adapter file. ``variant_mean``: an LLM connector
    trained with name dropout is read as the mean over each prompt's renamed variants
    (``VariantMeanConditioning``); the LLM must rename (``rag.anonymise`` or ``rag.name_dropout`` > 0). None:
    as the LLM's ``rag.variant_mean`` says (the adapter's recorded LLM, for generate and evaluate)."""

    columns = (
        [Column("base", ClipConditioning(frozen_text_features(backbone)), {"kind": "base"})] if include_base else []
    )
    loaded_llm = llm if isinstance(llm, nn.Module) or llm is None else None
    for name, spec in adapter_entries(adapters):
        path = spec["path"]
        connector = load_adapter(path, spec.get("format", "sur_lightning"), backbone.cross_attention_dim).to(
            backbone.device
        )
        uses_llm = needs_llm(connector)
        if uses_llm and loaded_llm is None:
            if llm is None:
                raise ValueError(f"adapter {path} ({type(connector).__name__}) needs LLM features: set llm=<its LLM>")
            loaded_llm = llm().to(backbone.device)
        text_features = frozen_text_features(backbone, loaded_llm if uses_llm else None)
        adapter_mode = spec.get("mode", mode)
        etas = list(eta_sweep) if eta_sweep else [spec.get("eta", eta)]
        rag = getattr(loaded_llm, "rag", None) if uses_llm else None
        mean_over_variants = spec.get("variant_mean", variant_mean)
        if mean_over_variants is None:
            mean_over_variants = bool(getattr(rag, "variant_mean", False))
        renamer = getattr(rag, "renamer", None)
        if mean_over_variants and renamer is None:
            raise ValueError(
                f"adapter {path}: variant_mean reads an ELLA connector over its LLM's renamed variants; "
                "its LLM renames nothing (set llm.rag.anonymise=true, as +experiment=ella_unseen_objects does)"
            )
        for value in etas:
            label = name if value is None else f"{name} eta={value:g}"
            conditioning = read_connector(
                connector,
                text_features,
                adapter_mode,
                value,
                spec.get("negative", negative),
                renamer if mean_over_variants else None,
            )
            check_conditioning(conditioning, backbone, path)
            columns.append(Column(label, conditioning, {"adapter": str(path), **conditioning.describe()}))
    return columns


def complex_prompt_column(backbone, prompts: Sequence[Prompt]) -> Column | None:
    """ "base+complex": the base model given each prompt's ``complex`` prompt instead (the upper bound a
    connector is measured against), or None when no prompt has one. Any other text (the empty negative
    prompt) is encoded as it is."""
    complex_of = {p.prompt: p.complex for p in prompts if p.complex}
    if not complex_of:
        return None
    encode = frozen_text_features(backbone)

    def text_features(texts: list[str]) -> TextFeatures:
        return encode([complex_of.get(text, text) for text in texts])

    return Column("base+complex", ClipConditioning(text_features), {"kind": "base", "prompt": "complex"})


def check_conditioning(conditioning: ClipConditioning, backbone, path) -> None:
    """Run the conditioning on one empty prompt; a shape or width mismatch is an error naming the adapter."""
    try:
        out = conditioning([""], backbone.noise_scheduler.config.num_train_timesteps - 1)
    except NonFiniteConditioningError as error:
        raise NonFiniteConditioningError(
            f"adapter {path}, checked on the empty prompt before drawing: {error}"
        ) from error
    except (RuntimeError, ValueError, AttributeError, TypeError) as error:
        raise ValueError(
            f"adapter {path} does not fit this backbone/LLM ({type(error).__name__}: {error}); "
            "use the backbone= and llm= it was trained with"
        ) from error
    if out.ndim != 3 or out.shape[-1] != backbone.cross_attention_dim:
        raise ValueError(
            f"adapter {path} gives conditioning of shape {tuple(out.shape)}, but the UNet cross-attends to width "
            f"{backbone.cross_attention_dim}: use the backbone= it was trained with"
        )


# ------------------------------------------------------------------ unCLIP (generation/unclip.py)


def unclip_column(
    backbone,
    folder: str | Path,
    llm=None,
    decoder: str | Path | None = None,
    name: str = "unclip",
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
) -> Column:
    """The column prior -> decoder of a prior export ``folder`` (``unclip.json``). ``llm``: the LLM module the prior
    reads (token states), or None to build the one it was trained with (its record's ``trained_with.llm``);
    ``decoder``: a decoder folder instead of the one its record names. The image tower the prior's (or else the
    decoder's) record names is loaded too when it exists here, for the tools that encode images (``explore``)."""
    from sur_lightning.generation.unclip import (
        DecoderRender,
        PriorEmbeddings,
        load_decoder,
        load_image_tower,
        load_prior,
    )

    prior, record = load_prior(folder)
    decoder = decoder or record.get("decoder")
    if decoder is None:
        raise ValueError(
            f"{folder}: its unclip.json names no decoder (trained with model.decoder=null): pass decoder=<folder>"
        )
    projection, decoder_record = load_decoder(decoder)
    if llm is None:
        node = (record.get("trained_with") or {}).get("llm")
        if node is None:
            raise ValueError(f"{folder}: its unclip.json records no LLM: pass llm=")
        from omegaconf import OmegaConf

        llm = token_llm(OmegaConf.create(node))
    llm = llm.to(backbone.device)
    embed = PriorEmbeddings(
        backbone, prior.to(backbone.device), frozen_text_features(backbone, llm), num_inference_steps, guidance_scale
    )
    source = {"kind": "unclip", "prior": str(folder), "decoder": str(decoder), "prior_guidance_scale": guidance_scale}
    tower = load_image_tower(record, decoder_record)
    tower = None if tower is None else tower.to(backbone.device)
    return Column(name, None, source, render=DecoderRender(backbone, projection, embed, tower))


def stock_unclip_column(backbone, folder: str | Path, pipeline: str | None = None, name: str = "unclip") -> Column:
    """The column of a prior export that holds ``prior_transformer/`` (``+experiment=unclip_sd21_clip``), drawn by
    diffusers' ``StableUnCLIPPipeline`` as it ships with that prior swapped in (``unclip.StockUnclipRender``):
    ``pipeline``, or the one whose prior text the export read, on the backbone's device and in its dtype."""
    from sur_lightning.generation.unclip import StockUnclipRender, stock_prior, stock_unclip_pipeline

    loaded = stock_unclip_pipeline(pipeline, folder, torch_dtype=backbone.unet.dtype).to(backbone.device)
    render = StockUnclipRender(loaded)
    source = {
        "kind": "unclip_stock",
        "prior": str(folder),
        "pipeline": str(pipeline or stock_prior(folder)["pipeline"]),
        "prior_num_inference_steps": render.prior_num_inference_steps,
        "prior_guidance_scale": render.prior_guidance_scale,
    }
    return Column(name, None, source, render=render)


def oracle_column(
    backbone, decoder: str | Path, image_tower: str | Path, reference: Callable, name: str = "unclip_oracle"
) -> Column:
    """The decoder given the image tower's embedding of a true image of each prompt: ``reference(prompt, seed)``
    draws it (the toy world: ``world.draw_example`` of the prompt's target, seeded)."""
    from sur_lightning.generation.unclip import DecoderRender, TowerEmbeddings, load_decoder
    from sur_lightning.models.image_tower import ImageTower

    projection, _ = load_decoder(decoder)
    tower = ImageTower.from_pretrained(str(image_tower)).to(backbone.device)
    embed = TowerEmbeddings(tower, reference)
    source = {"kind": "unclip_oracle", "decoder": str(decoder), "image_tower": str(image_tower)}
    return Column(name, None, source, render=DecoderRender(backbone, projection, embed, tower))


def adapter_records(adapters, unclip: str | Path | None = None) -> list[tuple[str, dict]]:
    """(path, what it was trained with) for each of ``adapters`` (as ``adapter_entries`` reads them) that this
    project wrote and that exists: ``connector_record``, an adapter folder's ``trained_with`` or the run's
    ``.hydra/config.yaml`` beside an adapter file; ``{}`` when none says. An unCLIP prior export (``unclip``)
    records its backbone and LLM the same way, in ``unclip.json``. ``config.use_recorded`` reads them."""
    from sur_lightning.models.connectors import connector_record

    records = []
    for _, spec in adapter_entries(adapters):
        if spec.get("format", "sur_lightning") == "sur_lightning" and Path(spec["path"]).exists():
            records.append((spec["path"], connector_record(spec["path"]) or {}))
    if unclip:
        from sur_lightning.generation.unclip import PRIOR_RECORD, read_record

        records.append((str(unclip), read_record(unclip, PRIOR_RECORD).get("trained_with") or {}))
    return records


def random_backbone_warning(backbone, adapters) -> str | None:
    """A warning for generating without an adapter on a random test backbone (``backbone=tiny``, generate's
    default, or a ``*_random`` one): its images are noise by construction, which looks like a bug without it.
    None otherwise."""
    from sur_lightning.models.random_models import is_random_test_model

    pretrained = getattr(backbone, "pretrained", None)
    if adapter_entries(adapters) or pretrained is None or not is_random_test_model(pretrained):
        return None
    return (
        f"Warning: the backbone {pretrained} is a random test model (random weights, built for tests and "
        "benchmarks): its images will be noise. For real pictures choose backbone=toy (the shipped toy-world base: "
        "coloured shapes, e.g. 'two red circles') or backbone=sd15 / backbone=sdxl (from the Hugging Face hub)."
    )


def token_llm(node) -> nn.Module:
    """The LLM of config ``node``, built to return token states (``pooling: none``) for a connector that reads them."""
    from hydra.utils import instantiate

    return instantiate(node, **({"pooling": "none"} if "pooling" in node else {}))


def pixelsnail_column(folder, name: str = "pixelsnail", llm: nn.Module | None = None, **knobs) -> Column:
    """A column whose images a PixelSNAIL export draws (``generation/pixelsnail.py``; ``Column.render``).
    ``llm``: the LLM it was trained with, else built from the export's ``trained_with.json``; ``knobs``:
    ``guidance_scale``, ``temperature``, ``batch_size``: the prior's own, set here. The diffusion knobs a grid
    passes to every column (scheduler, steps, the UNet's guidance scale, size) do not apply to it."""
    from sur_lightning.generation.pixelsnail import PixelSNAILSampler

    sampler = PixelSNAILSampler.from_pretrained(folder, llm=llm, **knobs)
    source = {
        "kind": "pixelsnail",
        "path": str(folder),
        "guidance_scale": sampler.guidance_scale,
        "temperature": sampler.temperature,
    }
    return Column(name, None, source, render=lambda prompts, seeds, **_diffusion_knobs: sampler(prompts, seeds))


def sampler_columns(folders) -> list[Column]:
    """One column per PixelSNAIL export folder (``pixelsnail=[...]``), named ``pixelsnail`` or, for several,
    ``pixelsnail (<run folder>/<export>)``."""
    folders = [Path(folder) for folder in (folders or [])]
    if len(folders) == 1:
        return [pixelsnail_column(folders[0])]
    return [pixelsnail_column(f, name=f"pixelsnail ({f.parent.name}/{f.name})") for f in folders]


def grid_columns(
    backbone,
    prompts: Sequence[Prompt],
    adapters=None,
    llm_config=None,
    mode: str = "replace",
    eta: float | None = None,
    eta_sweep: Sequence[float] = (),
    include_base: bool = True,
    negative: str = "connector",
    variant_mean: bool | None = None,
    pixelsnail: Sequence[str] = (),
    unclip: str | None = None,
    unclip_pipeline: str | None = None,
) -> list[Column]:
    """A grid's columns: ``build_columns`` (the LLM built from ``llm_config``, its config node, only when a
    connector reads its token states), with ``base+complex`` second when ``include_base`` and a prompt has a
    complex one, a column per PixelSNAIL export in ``pixelsnail`` and one for an unCLIP prior export ``unclip``
    (drawn by ``StableUnCLIPPipeline`` when the export holds its ``prior_transformer/``: ``unclip_pipeline``, or the
    pipeline it records).
    ``config.column_arguments(cfg)`` gives every argument after ``prompts`` from a
    generate/evaluate/explore config; run ``config.use_recorded`` first for the backbone and LLM the adapters
    were trained with."""
    columns = build_columns(
        backbone,
        adapters=adapters,
        # Only connectors that read token states (ELLA) load the LLM here; SUR does not use it at inference.
        llm=(lambda: token_llm(llm_config)) if llm_config is not None else None,
        mode=mode,
        eta=eta,
        eta_sweep=list(eta_sweep or []),
        include_base=include_base,
        negative=negative,
        variant_mean=variant_mean,
    )
    from sur_lightning.generation.unclip import stock_prior

    if unclip and stock_prior(unclip) is not None:  # the stock pipeline with the trained prior: no LLM to read
        columns.append(stock_unclip_column(backbone, unclip, unclip_pipeline))
    elif unclip:  # unCLIP: prior -> decoder, reading the LLM its record names unless llm= chose one
        columns.append(unclip_column(backbone, unclip, llm=token_llm(llm_config) if llm_config is not None else None))
    complex_column = complex_prompt_column(backbone, prompts) if include_base else None
    if complex_column is not None:
        columns.insert(1, complex_column)
    columns += sampler_columns(pixelsnail)
    if not columns:
        raise ValueError("nothing to render: include_base=false and no adapters given")
    return columns
