"""Prompts → images with the base model and with trained connectors, same seeds, side by side.

    python -m sur_lightning.generate adapters=[outputs/demo/runs/<time>/adapter.safetensors]
    python -m sur_lightning.generate adapters=[<adapter>] eta_sweep=[0.1,0.5,1.0]
    python -m sur_lightning.generate backbone=sd15 llm=llama13b adapters=[<adapter>] prompts=counting

writes, under the run folder: ``images/<column>/<prompt id>_seed<seed>.png``, ``grid.png`` (one column
per base/adapter/η, one row per prompt and seed), ``strips/<adapter>/<prompt id>_seed<seed>.png`` when
η is swept, and ``manifest.json`` saying what produced each image.

How a connector conditions the UNet
-----------------------------------
Built on diffusers' ``StableDiffusionPipeline``; nothing of it is copied. Each column of images comes
from a *conditioning* (``ClipConditioning`` for the base model, ``ConnectorConditioning`` for an
adapter) in two parts: ``features(prompts)`` runs the frozen encoders once per batch (CLIP states,
LLM states), ``apply(features, timesteps)`` maps them to the UNet's ``encoder_hidden_states`` [B,N,d].

``conditioning_hook`` (a forward pre-hook on the UNet) calls ``apply`` with the timestep the UNet is
actually called with, at every call. So a timestep-aware connector (ELLA) is recomputed at every
sampling step, with every scheduler, by the same mechanism that serves SUR (whose output does not
depend on t) and the base model. With classifier-free guidance the pipeline batches the UNet input as
[negative; positive]: the hook conditions the negative (empty) prompts and the positive prompts in
two separate connector calls, so neither sees the other (the released SUR's ``batch_first=False``
would otherwise let them attend to each other).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from torch import nn

from sur_lightning.models.connectors import TextFeatures
from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.train import CONFIG_DIR, check_config

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
MODES = ("replace", "concat_clip")
NEGATIVES = ("connector", "base")

TextFeaturesFn = Callable[[list[str]], TextFeatures]


# ------------------------------------------------------------------------------------ pipeline


def build_pipeline(backbone, scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` over the backbone's frozen components (no copies)."""
    import diffusers

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    config = backbone.noise_scheduler.config
    # The training scheduler (DDPM) carries clip_sample=True, which SD's DDIM sampling must not use.
    overrides = {"clip_sample": False} if scheduler == "ddim" else {}
    sampler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(config, **overrides)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ------------------------------------------------------------------------------------ conditioning


def frozen_text_features(backbone, llm: nn.Module | None = None) -> TextFeaturesFn:
    """prompts -> TextFeatures(clip [B,77,d], llm/llm_mask from ``llm`` when given), like the training module's."""

    def text_features(prompts: list[str]) -> TextFeatures:
        clip = backbone.encode_prompt(list(prompts))
        if llm is None:
            return TextFeatures(clip=clip)
        states, mask = llm(list(prompts))
        return TextFeatures(
            clip=clip, llm=states.to(clip.device), llm_mask=None if mask is None else mask.to(clip.device)
        )

    return text_features


@contextmanager
def override_eta(connector: nn.Module, value: float | None):
    """Within the block, the connector's η module is ``FixedEta(value)`` (SUR); ``None`` changes nothing."""
    if value is None:
        yield connector
        return
    from sur_lightning.models.eta import FixedEta

    if not isinstance(getattr(connector, "eta", None), nn.Module):
        raise TypeError(f"{type(connector).__name__} has no η module to override (η applies to SUR adapters)")
    original = connector.eta
    connector.eta = FixedEta(float(value))
    try:
        yield connector
    finally:
        connector.eta = original


def _batch_timesteps(timesteps: torch.Tensor | float, batch: int, device) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=device)
    return timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(batch)


class ClipConditioning:
    """The base model's conditioning: CLIP states of the prompt, whatever the timestep.

    ``features(prompts) -> TextFeatures`` (frozen encoders, once per batch);
    ``apply(features, timesteps [B] or scalar) -> [B, N, d]``;
    ``conditioning(prompts, timesteps) -> [B, N, d]`` does both.
    """

    def __init__(self, text_features: TextFeaturesFn) -> None:
        self.text_features = text_features

    @torch.no_grad()
    def features(self, prompts: Sequence[str]) -> TextFeatures:
        return self.text_features(list(prompts))

    def apply(self, features: TextFeatures, timesteps: torch.Tensor) -> torch.Tensor:
        return features.clip

    def apply_negative(self, features: TextFeatures, timesteps: torch.Tensor) -> torch.Tensor:
        """The negative (unconditional) branch under classifier-free guidance."""
        return self.apply(features, timesteps)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], timesteps: torch.Tensor | float) -> torch.Tensor:
        return self.apply(self.features(prompts), timesteps)

    conditioning = __call__

    def describe(self) -> dict:
        return {"kind": "base"}


class ConnectorConditioning(ClipConditioning):
    """A trained connector's conditioning: ``connector(features, t).conditioning`` [B, N, d].

    mode="replace":     the connector's output alone (SUR: 77 tokens; ELLA: its latents, e.g. 64).
    mode="concat_clip": CLIP states then the connector's output along tokens ("ELLA + CLIP": 77+64).
    eta:                replaces the connector's η by ``FixedEta(eta)`` for these calls (SUR only).
    negative="connector": the negative prompt goes through the connector too (as the SUR authors' pipeline);
    negative="base":    it keeps the base's own CLIP states (for connectors with CLIP's token count, e.g. SUR).
    """

    def __init__(
        self,
        connector: nn.Module,
        text_features: TextFeaturesFn,
        mode: str = "replace",
        eta: float | None = None,
        negative: str = "connector",
    ) -> None:
        super().__init__(text_features)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
        self.negative = negative
        self.connector = connector
        self.mode = mode
        self.eta = eta
        # A connector that ignores the timestep (SUR) runs once per prompt batch, not at every sampling step.
        self.timestep_aware = getattr(connector, "timestep_aware", True)
        self._recent: list[tuple[TextFeatures, torch.Tensor]] = []

    @torch.no_grad()
    def apply(self, features: TextFeatures, timesteps: torch.Tensor | float) -> torch.Tensor:
        if self.timestep_aware:
            return self._apply(features, timesteps)
        # The same features object comes back at every sampling step (prompt and negative): reuse its output.
        for seen, conditioning in self._recent:
            if seen is features:
                return conditioning
        conditioning = self._apply(features, timesteps)
        self._recent = [*self._recent, (features, conditioning)][-2:]
        return conditioning

    def apply_negative(self, features: TextFeatures, timesteps: torch.Tensor | float) -> torch.Tensor:
        if self.negative == "connector":
            return self.apply(features, timesteps)
        return features.clip

    def _apply(self, features: TextFeatures, timesteps: torch.Tensor | float) -> torch.Tensor:
        reference = features.clip if features.clip is not None else features.llm
        timesteps = _batch_timesteps(timesteps, reference.shape[0], reference.device)
        with override_eta(self.connector, self.eta):
            conditioning = self.connector(features, timesteps).conditioning
        if self.mode == "concat_clip":
            conditioning = torch.cat([features.clip.to(conditioning.dtype), conditioning], dim=1)
        return conditioning

    def describe(self) -> dict:
        return {"kind": type(self.connector).__name__, "mode": self.mode, "eta": self.eta, "negative": self.negative}


@contextmanager
def conditioning_hook(unet: nn.Module, conditioning: ClipConditioning, features: TextFeatures, negative: TextFeatures):
    """While active, every call of ``unet`` gets ``encoder_hidden_states`` recomputed by ``conditioning.apply``
    at the timestep of that call: rows [negative; positive] under classifier-free guidance (two separate
    connector calls), or the positive rows alone without it.
    """
    batch = (features.clip if features.clip is not None else features.llm).shape[0]

    def hook(module, args, kwargs):
        in_kwargs = "encoder_hidden_states" in kwargs
        states = kwargs["encoder_hidden_states"] if in_kwargs else args[2]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        rows = states.shape[0]
        t = torch.as_tensor(timestep, device=states.device).reshape(-1)
        if rows == 2 * batch:
            t_neg, t_pos = (t[:batch], t[batch:]) if t.numel() == rows else (t, t)
            uncond, cond = conditioning.apply_negative(negative, t_neg), conditioning.apply(features, t_pos)
            if uncond.shape[1:] != cond.shape[1:]:
                raise ValueError(
                    f"negative={getattr(conditioning, 'negative', '?')}: the negative branch has {uncond.shape[1]} tokens and "
                    f"the prompt {cond.shape[1]}; negative=base needs a connector with CLIP's token count (SUR)"
                )
            new = torch.cat([uncond, cond])
        elif rows == batch:
            new = conditioning.apply(features, t)
        else:
            raise RuntimeError(f"UNet called with {rows} rows; expected {batch} prompts or {2 * batch} under CFG")
        new = new.to(states.device, states.dtype)
        if in_kwargs:
            kwargs["encoder_hidden_states"] = new
        else:
            args = (*args[:2], new, *args[3:])
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def render(
    pipeline,
    conditioning: ClipConditioning,
    prompts: Sequence[str],
    seeds: Sequence[int],
    negative_prompt: str = "",
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per prompt, prompt i seeded with ``seeds[i]``, conditioned by ``conditioning`` at every step."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    device = pipeline.unet.device
    dtype = pipeline.unet.dtype
    features = conditioning.features(prompts)
    negative = conditioning.features([negative_prompt] * len(prompts))
    # The hook computes the real conditioning at every UNet call; the pipeline only needs the batch size,
    # device and dtype from these, so one zero token each is enough (running the connector here would
    # cost two calls whose output is thrown away).
    placeholder = torch.zeros(len(prompts), 1, pipeline.unet.config.cross_attention_dim)
    prompt_embeds, negative_embeds = placeholder, placeholder.clone()
    # Draw the initial latents on the CPU so a seed gives the same image on every device.
    size = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or size
    shape = (pipeline.unet.config.in_channels, size // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor)
    latents = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    ).to(device, dtype)
    with conditioning_hook(pipeline.unet, conditioning, features, negative):
        return pipeline(
            prompt_embeds=prompt_embeds.to(device, dtype),
            negative_prompt_embeds=negative_embeds.to(device, dtype),
            latents=latents,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=size,
            width=width,
            output_type="pil",
        ).images


@torch.no_grad()
def render_base_and_adapter(
    module,
    prompts: list[str],
    seeds: list[int],
    scheduler: str = "ddim",
    mode: str = "replace",
    adapter: bool = True,
    **kwargs,
):
    """Images of ``prompts`` (one seed each) from the base model and through ``module.connector``.

    Returns (base_images, adapter_images); adapter_images is None with ``adapter=False``. The adapter
    path uses ``module.text_features``, so what the connector reads at sampling time is what it read
    in training.
    """
    pipeline = build_pipeline(module.backbone, scheduler)
    base = render(pipeline, ClipConditioning(frozen_text_features(module.backbone)), prompts, seeds, **kwargs)
    if not adapter:
        return base, None
    was_training = module.connector.training
    module.connector.eval()
    try:
        adapted = render(pipeline, ConnectorConditioning(module.connector, module.text_features, mode), prompts, seeds, **kwargs)
    finally:
        module.connector.train(was_training)
    return base, adapted


# ------------------------------------------------------------------------------------ grids


def labelled_grid(columns: dict[str, list[Image.Image]], row_labels: list[str], cell: int = 128) -> Image.Image:
    """A grid with one column per entry of ``columns`` and one row per label, titles drawn in."""
    header, label_width = 16, 160
    names = list(columns)
    grid = Image.new("RGB", (label_width + cell * len(names), header + cell * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((label_width + j * cell + 4, 2), name[:22], fill="black")
        for i, image in enumerate(columns[name]):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + j * cell, header + i * cell))
    for i, label in enumerate(row_labels):
        lines = textwrap.wrap(label, 24)[:5]  # whole prompts, wrapped: the row's prompt must be readable
        top = header + i * cell + cell // 2 - 6 * len(lines)
        for k, line in enumerate(lines):
            draw.text((4, top + 12 * k), line, fill="black")
    return grid


def save_grid(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ------------------------------------------------------------------------------------ prompts and columns


def load_prompt_list(source, num_prompts: int | None = None) -> list[Prompt]:
    """Prompts from a list of strings, a built-in suite name (counting/color/action), a .txt/.jsonl file,
    a DPG-Bench folder, a dataset folder in the SURD layout (its ``metadata.jsonl`` simple prompts), or
    a dataset config (``_target_`` returning such a folder). ``num_prompts`` keeps the first N."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, ListConfig

    from sur_lightning.data.prompt_suites import load_prompts

    if isinstance(source, dict | DictConfig):
        source = instantiate(source)
    if isinstance(source, list | tuple) and source and all(isinstance(p, Prompt) for p in source):
        prompts = list(source)
    elif isinstance(source, list | tuple | ListConfig):
        prompts = [Prompt(f"prompt-{i:03d}", str(text), "custom") for i, text in enumerate(source)]
    elif Path(str(source), "metadata.jsonl").is_file():
        folder = Path(str(source))
        prompts = []
        for number, line in enumerate((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line) if line.strip() else None
            if row is not None and not isinstance(row.get("text"), str):
                raise ValueError(f"{folder / 'metadata.jsonl'}:{number}: no simple prompt in key 'text'")
            if row is not None:
                prompts.append(Prompt(Path(row.get("file_name", f"{number:06d}")).stem, row["text"], folder.parent.name))
    else:
        prompts = load_prompts(str(source))
    if not prompts:
        raise ValueError(f"prompts: nothing to render from {source!r}")
    return prompts[:num_prompts] if num_prompts else prompts


@dataclass
class Column:
    """One column of images: a label, a folder-safe slug, its conditioning, and what it came from."""

    name: str
    conditioning: ClipConditioning
    source: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.replace("eta=", "eta")).strip("_")


def needs_llm(connector: nn.Module) -> bool:
    """SUR reads the LLM only as a distillation target in training; a connector that reads its token states
    (ELLA; unknown connectors are assumed to) needs it to condition."""
    return getattr(connector, "reads_token_states", True)


def adapter_entries(adapters) -> list[tuple[str, dict]]:
    """``adapters``: a list of paths, or a mapping name -> path or name -> {path, mode, eta, format}.
    Returns (name, {path, mode?, eta?, format?}) pairs. A mapping's keys are the names; a list's names come
    from each adapter (``adapter_label``: ``sur-demo``), with the run folder added only to tell two apart."""
    from omegaconf import DictConfig, OmegaConf

    from sur_lightning.models.connectors import adapter_label

    if isinstance(adapters, DictConfig):
        adapters = OmegaConf.to_container(adapters, resolve=True)
    if not adapters:
        return []
    if isinstance(adapters, dict):
        items = [(str(k), v if isinstance(v, dict) else {"path": v}) for k, v in adapters.items()]
    else:
        items = [(adapter_label(entry), {"path": str(entry)}) for entry in adapters]
        labels = [name for name, _ in items]
        items = [
            (name if labels.count(name) == 1 else f"{name} ({Path(spec['path']).parent.name})", spec) for name, spec in items
        ]
    names = [name for name, _ in items]
    return [(name if names.count(name) == 1 else f"{name}-{i}", spec) for i, (name, spec) in enumerate(items)]


ADAPTER_FORMATS = ("sur_lightning", "official")


def load_adapter(path, file_format: str = "sur_lightning") -> nn.Module:
    """A connector from a file this project wrote (``adapter.safetensors`` + config), or from the SUR
    authors' ``adapter_checkpoint*.pt`` (``format: official``: their released module, η = 0.1)."""
    from sur_lightning.models.connectors import load_connector
    from sur_lightning.models.connectors.sur import official_adapter

    if file_format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter {path}: format must be one of {ADAPTER_FORMATS}, got {file_format!r}")
    return official_adapter(path) if file_format == "official" else load_connector(path)


def build_columns(
    backbone,
    adapters=None,
    llm: nn.Module | Callable[[], nn.Module] | None = None,
    mode: str = "replace",
    eta: float | None = None,
    eta_sweep: Sequence[float] = (),
    include_base: bool = True,
    negative: str = "connector",
) -> list[Column]:
    """The base column, then per adapter one column (η overridden by ``eta`` when set) or one per η of
    ``eta_sweep``. ``llm``: the LLM module, or a zero-argument function loading it only when a connector
    needs it (ELLA), on the backbone's device. Each adapter is checked against the backbone and LLM on
    an empty prompt, so a mismatch fails here naming the adapter file."""

    columns = [Column("base", ClipConditioning(frozen_text_features(backbone)), {"kind": "base"})] if include_base else []
    loaded_llm = llm if isinstance(llm, nn.Module) or llm is None else None
    for name, spec in adapter_entries(adapters):
        path = spec["path"]
        connector = load_adapter(path, spec.get("format", "sur_lightning")).to(backbone.device)
        uses_llm = needs_llm(connector)
        if uses_llm and loaded_llm is None:
            if llm is None:
                raise ValueError(f"adapter {path} ({type(connector).__name__}) needs LLM features: set llm=<its LLM>")
            loaded_llm = llm().to(backbone.device)
        text_features = frozen_text_features(backbone, loaded_llm if uses_llm else None)
        adapter_mode = spec.get("mode", mode)
        etas = list(eta_sweep) if eta_sweep else [spec.get("eta", eta)]
        for value in etas:
            label = name if value is None else f"{name} eta={value:g}"
            conditioning = ConnectorConditioning(connector, text_features, adapter_mode, value, spec.get("negative", negative))
            check_conditioning(conditioning, backbone, path)
            columns.append(Column(label, conditioning, {"adapter": str(path), **conditioning.describe()}))
    return columns


def complex_prompt_column(backbone, prompts: Sequence[Prompt]) -> Column | None:
    """"base+complex": the base model given each prompt's ``complex`` prompt instead (the upper bound a
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


# ------------------------------------------------------------------------------------ rendering many columns


@dataclass
class Rendered:
    """One generated image and what produced it."""

    column: str
    prompt: Prompt
    seed: int
    image: Image.Image
    file: str | None = None


def render_columns(
    backbone,
    columns: Sequence[Column],
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    out_dir: str | Path | None = None,
    scheduler: str = "ddim",
    batch_size: int = 4,
    negative_prompt: str = "",
    progress: bool = True,
    **kwargs,
) -> list[Rendered]:
    """Every (prompt, seed) through every column, same seeds for all; writes
    ``<out_dir>/images/<column slug>/<prompt id>_seed<seed>.png`` when ``out_dir`` is given."""
    from tqdm.auto import tqdm

    pipeline = build_pipeline(backbone, scheduler)
    jobs = [(prompt, int(seed)) for prompt in prompts for seed in seeds]
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    results = []
    with tqdm(total=len(columns) * len(jobs), desc="generating", unit="img", disable=not progress) as bar:
        for column in columns:
            for batch in batches:
                images = render(
                    pipeline,
                    column.conditioning,
                    [p.prompt for p, _ in batch],
                    [s for _, s in batch],
                    negative_prompt=negative_prompt,
                    **kwargs,
                )
                for (prompt, seed), image in zip(batch, images):
                    item = Rendered(column.name, prompt, seed, image)
                    if out_dir is not None:
                        relative = Path("images") / column.slug / f"{prompt.id}_seed{seed}.png"
                        (Path(out_dir) / relative).parent.mkdir(parents=True, exist_ok=True)
                        image.save(Path(out_dir) / relative)
                        item.file = str(relative)
                    results.append(item)
                bar.update(len(batch))
    return results


def write_grids(rendered: Sequence[Rendered], columns: Sequence[Column], out_dir: str | Path, strips: bool) -> dict:
    """``grid.png`` (columns × (prompt, seed) rows) and, when ``strips``, one strip per adapter, prompt and
    seed (base plus every η of that adapter) under ``strips/<adapter>/``. Returns the written paths."""
    out_dir = Path(out_dir)
    by_key = {(r.column, r.prompt.id, r.seed): r.image for r in rendered}
    rows = list(dict.fromkeys((r.prompt.id, r.prompt.prompt, r.seed) for r in rendered))
    several_seeds = len({seed for _, _, seed in rows}) > 1
    labels = [f"{text} ({seed})" if several_seeds else text for _, text, seed in rows]
    grid = {c.name: [by_key[(c.name, pid, seed)] for pid, _, seed in rows] for c in columns}
    written = {"grid": str(save_grid(labelled_grid(grid, labels), out_dir / "grid.png"))}
    if strips:
        adapters: dict[str, list[Column]] = {}
        for column in columns:
            if "adapter" in column.source:
                adapters.setdefault(column.name.rsplit(" eta=", 1)[0], []).append(column)
        base = [c for c in columns if c.name == "base"]
        written["strips"] = []
        for adapter, adapter_columns in adapters.items():
            folder = out_dir / "strips" / re.sub(r"[^A-Za-z0-9._-]+", "_", adapter)
            for (pid, text, seed), label in zip(rows, labels):
                strip = {c.name.replace(adapter + " ", ""): [by_key[(c.name, pid, seed)]] for c in base + adapter_columns}
                written["strips"].append(str(save_grid(labelled_grid(strip, [label]), folder / f"{pid}_seed{seed}.png")))
    return written


# ------------------------------------------------------------------------------------ the command


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sampler_kwargs(sampler) -> dict:
    """The pipeline knobs of the ``sampler`` config node."""
    return {
        "scheduler": sampler.scheduler,
        "num_inference_steps": int(sampler.num_inference_steps),
        "guidance_scale": float(sampler.guidance_scale),
        "height": sampler.resolution,
        "width": sampler.resolution,
        "batch_size": int(sampler.batch_size),
    }


def prepare(cfg):
    """Backbone, prompts and columns from a generate/evaluate config (the LLM loads only when needed)."""
    from hydra.utils import instantiate

    device = pick_device(cfg.device)
    backbone = instantiate(cfg.backbone).to(device)
    prompts = load_prompt_list(cfg.prompts, cfg.get("num_prompts"))
    llm_cfg = cfg.get("llm")
    columns = build_columns(
        backbone,
        adapters=cfg.adapters,
        # Only connectors that read token states (ELLA) load the LLM here; SUR does not use it at inference.
        llm=(lambda: instantiate(llm_cfg, **({"pooling": "none"} if "pooling" in llm_cfg else {}))) if llm_cfg is not None else None,
        mode=cfg.mode,
        eta=cfg.eta,
        eta_sweep=list(cfg.eta_sweep or []),
        include_base=cfg.include_base,
        negative=cfg.get("negative", "connector"),
    )
    complex_column = complex_prompt_column(backbone, prompts) if cfg.include_base else None
    if complex_column is not None:
        columns.insert(1, complex_column)
    if not columns:
        raise ValueError("nothing to render: include_base=false and no adapters given")
    return backbone, prompts, columns


def generate(cfg) -> dict:
    """Render ``cfg.prompts`` × ``cfg.seeds`` through the base model and every adapter; write images, grid,
    η strips and ``manifest.json`` into ``cfg.paths.output_dir``. Returns the written paths."""
    resolved = check_config(cfg)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    backbone, prompts, columns = prepare(cfg)
    kwargs = sampler_kwargs(cfg.sampler)
    rendered = render_columns(
        backbone, columns, prompts, list(cfg.seeds), out_dir, negative_prompt=cfg.negative_prompt, **kwargs
    )
    written = write_grids(rendered, columns, out_dir, strips=bool(cfg.eta_sweep))
    written["manifest"] = str(write_manifest(out_dir, rendered, columns, resolved))
    print(f"\nWrote {len(rendered)} images to {out_dir / 'images'}\n  grid:     {written['grid']}")
    if written.get("strips"):
        print(f"  η strips: {Path(written['strips'][0]).parent}")
    print(f"  manifest: {written['manifest']}")
    return written


def write_manifest(out_dir: Path, rendered: Sequence[Rendered], columns: Sequence[Column], config: dict) -> Path:
    sources = {c.name: c.source for c in columns}
    images = [
        {
            "file": r.file,
            "column": r.column,
            "prompt_id": r.prompt.id,
            "prompt": r.prompt.prompt,
            "category": r.prompt.category,
            "complex": r.prompt.complex,
            "target": r.prompt.target,
            "seed": r.seed,
            **sources[r.column],
        }
        for r in rendered
    ]
    settings = {k: config.get(k) for k in ("backbone", "llm", "sampler", "negative_prompt", "mode", "device")}
    path = out_dir / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "columns": sources, "images": images}, indent=2, default=str))
    return path


def read_manifest(folder: str | Path) -> list[Rendered]:
    """The images a ``generate`` run wrote, with their prompts and seeds, from its ``manifest.json``."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: images_dir must be the output folder of a generate run")
    rows = json.loads(manifest.read_text())["images"]
    return [
        Rendered(
            row["column"],
            Prompt(
                row["prompt_id"],
                row["prompt"],
                row["category"],
                row.get("complex"),
                tuple(row["target"]) if row.get("target") else None,
            ),
            int(row["seed"]),
            Image.open(folder / row["file"]).convert("RGB"),
            row["file"],
        )
        for row in rows
    ]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
