"""unCLIP's two trained stages as LightningModules (arXiv 2204.06125): the decoder's projection and the diffusion prior.

Both read the rows the connectors read (``data=toyworld``: adapter-train images with their simple and complex
prompts) and the feature cache's VAE latents and text states; the image side is the toy image tower's embedding
of each row's image, computed once at ``setup`` (``image_embedding_table``: ~1 s for the toy world's rows).

Decoder step (``UnclipDecoderModule``), the connector's step with an image embedding in place of the text::

    batch {cached VAE latent, id} -> image tower embedding e [B, E] (zeros with probability embedding_dropout)
      -> projection(e) -> context tokens [B, K, d], time offset [B, T]
      -> noise + timestep -> frozen UNet(noisy, t, tokens) with the offset added to its time embedding
      -> denoising loss; only the projection is trained.

Prior step (``UnclipPriorModule``)::

    batch {simple prompt, id} -> the cached text features the connectors read: LLM token states [B, L, D] with
      their mask, CLIP's pooled state [B, d] (the final-norm state at the end token); the empty prompt's with
      probability caption_dropout (for classifier-free guidance)
      -> DiffusionPrior.training_loss(image tower embedding e [B, E], text) (MSE on the clean embedding)

With ``text_encoder`` (``+experiment=unclip_sd21_clip``: ``models/prior_text.py`` ``StableUnclipPriorText``) the text
is instead what a stock ``StableUnCLIPPipeline`` feeds its prior: its prior text encoder's token states [B, 77, D],
their mask and its ``text_embeds`` [B, P], computed in the module at every step.

The prior's ``clip_mean`` / ``clip_std`` are fitted from the training rows' embeddings at ``setup`` before the
first step (a resumed run restores the same values from its checkpoint).
Exports (``ModelExport`` in callbacks.py calls ``export_pretrained``): the decoder's folder (``config.json``,
``diffusion_pytorch_model.safetensors``, ``unclip_decoder.json``) and the prior's (``prior/`` the same way and
``unclip.json``, which names the decoder it is sampled with); ``generation/unclip.py`` loads either. A prior that
reads a stock pipeline's text also exports ``prior_transformer/``, a plain ``PriorTransformer`` that pipeline takes
as its ``prior`` (``DiffusionPrior.stock_transformer``); ``unclip.json`` says why when it is not written.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from sur_lightning.generation.unclip import DECODER_RECORD, PRIOR_RECORD, STOCK_PRIOR, clip_pooled
from sur_lightning.models.backbone import StableDiffusionBackbone
from sur_lightning.models.image_tower import ClipVisionTower, ImageTower
from sur_lightning.models.llm import CausalLMFeatures
from sur_lightning.models.prior import DiffusionPrior
from sur_lightning.models.prior_text import StableUnclipPriorText
from sur_lightning.models.unclip_decoder import ImageEmbeddingProjection, added_time_embedding
from sur_lightning.training.losses import DenoisingLoss
from sur_lightning.training.module import blank, keyed_seed, sample_generators

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ shared parts


@torch.no_grad()
def image_embedding_table(tower: ImageTower, datamodule, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{row id: the tower's embedding [E]} of every training and validation row's image, as the VAE reads it
    (``cache_pixels``: centre crop, no flip; the toy world trains without flips)."""
    rows = datamodule.all_rows()
    table = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pixels = torch.stack([datamodule.cache_pixels(row, "center")[0] for row in chunk])
        for row, embedding in zip(chunk, tower.embed_images(pixels.to(tower.device)).cpu()):
            table[row.id] = embedding
    return table


def load_tower(image_tower: str | ImageTower | ClipVisionTower) -> ImageTower | ClipVisionTower:
    """A frozen tower: one given (the toy ``ImageTower``, or a CLIP vision model as ``ClipVisionTower``), or the
    ``ImageTower`` saved in folder ``image_tower``."""
    is_tower = isinstance(image_tower, (ImageTower, ClipVisionTower))
    tower = image_tower if is_tower else ImageTower.from_pretrained(str(image_tower))
    return tower.eval().requires_grad_(False)


def sampled_latents(backbone, batch: dict, generators: list[torch.Generator]) -> torch.Tensor:
    """Scaled VAE latents [B, 4, h, w], sample i drawn from generator i: from the cached posterior
    (``latent_mean``/``latent_logvar``) or by encoding ``pixel_values``."""
    if "latent_mean" in batch:
        distribution = DiagonalGaussianDistribution(torch.cat([batch["latent_mean"], batch["latent_logvar"]], dim=1))
    else:
        distribution = backbone.encode_images(batch["pixel_values"])
    noise = randn_tensor(
        distribution.mean.shape, generator=generators, device=distribution.mean.device, dtype=distribution.mean.dtype
    )
    return backbone.scale_latents(distribution.mean + distribution.std * noise)


def tower_record(image_tower) -> dict:
    """The image tower's folder and the SHA-256s its own record holds (``image_tower.json``), when it has one."""
    folder = Path(str(image_tower))
    if not folder.exists():  # a hub id (a CLIP vision model): recorded as it is
        return {"path": str(image_tower), "sha256": None}
    record_file = folder / "image_tower.json"
    hashes = json.loads(record_file.read_text()).get("sha256") if record_file.exists() else None
    return {"path": str(folder.resolve()), "sha256": hashes}


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


class _StageModule(L.LightningModule):
    """What both stages share: seeding, the embedding table, the optimizer, trainable-only checkpoints."""

    trained_prefix = ""

    @classmethod
    def takes_frozen_encoders(cls, config) -> bool:
        """train() builds the frozen backbone and LLM, or opens their feature cache, and hands them in."""
        return True

    def __init__(self, image_tower, optimizer, lr_scheduler, seed: int) -> None:
        super().__init__()
        self.image_tower_path = (
            image_tower if isinstance(image_tower, str) else getattr(image_tower, "pretrained", None)
        )
        self.tower = load_tower(image_tower)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.embeddings: dict[str, torch.Tensor] = {}
        # Checkpoints hold only the trained weights; the frozen models come back from their configs.
        self.strict_loading = False

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and not self.embeddings:
            self.embeddings = image_embedding_table(self.tower, datamodule)

    def image_embeddings(self, ids: Sequence[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self.embeddings]
        if missing:
            raise KeyError(
                f"no image embedding for row {missing[0]!r}: setup() computes them from the datamodule's rows"
            )
        return torch.stack([self.embeddings[i] for i in ids]).to(self.device)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(self.trained_prefix)
        }


# ------------------------------------------------------------------------------------------ the decoder


class UnclipDecoderModule(_StageModule):
    """Trains ``ImageEmbeddingProjection`` so that the frozen UNet draws the image an embedding came from.

    backbone:          the frozen SD parts (the toy base); its VAE encoder may be dropped (cached latents).
    image_tower:       the folder of the image tower (``sur_lightning.toyworld.shipped_image_tower``) or the tower.
    projection:        a partial of ``ImageEmbeddingProjection`` (the UNet's widths and E are filled in here).
    embedding_dropout: probability that a row's embedding is zeroed (unCLIP: 0.1), for classifier-free guidance.
    llm, llm_dim, feature_cache: what ``prepare_feature_cache`` hands every model; the decoder reads no text.
    """

    trained_prefix = "projection."

    def __init__(
        self,
        backbone: StableDiffusionBackbone,
        image_tower,
        projection: Callable[..., ImageEmbeddingProjection],
        denoising_loss: DenoisingLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable | None = None,
        embedding_dropout: float = 0.1,
        seed: int = 0,
        llm=None,
        llm_dim: int | None = None,
        feature_cache=None,
    ) -> None:
        super().__init__(image_tower, optimizer, lr_scheduler, seed)
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projection = projection(
                embedding_dim=self.tower.config.embedding_dim, **ImageEmbeddingProjection.widths_of(backbone.unet)
            )
        self.denoising_loss = denoising_loss
        self.embedding_dropout = embedding_dropout

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The frozen UNet's prediction [B, 4, h, w] conditioned on image embeddings [B, E] through the projection."""
        tokens, offset = self.projection(embeds)
        with added_time_embedding(self.backbone.unet, offset):
            return self.backbone.predict(noisy, timesteps, tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scheduler = self.backbone.noise_scheduler
        generators = sample_generators(self.seed, self.current_epoch, self.global_step, batch["id"])
        # 1. The image's latent and embedding; the embedding dropped (zeros) for classifier-free guidance.
        latents = sampled_latents(self.backbone, batch, generators)
        embeds = self.image_embeddings(batch["id"])
        dropped = torch.tensor([torch.rand((), generator=g).item() < self.embedding_dropout for g in generators])
        embeds = embeds * (~dropped).to(embeds.dtype)[:, None].to(self.device)
        # 2. Noise and timestep.
        noise = self.denoising_loss.sample_noise(latents, generator=generators)
        timesteps = torch.stack(
            [torch.randint(0, scheduler.config.num_train_timesteps, (), generator=g) for g in generators]
        ).to(self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # 3. Projection -> frozen UNet -> denoising loss.
        prediction = self.predict(noisy, timesteps, embeds)
        target = self.denoising_loss.target(scheduler, latents, noise, timesteps)
        loss = self.denoising_loss(prediction, target, timesteps, scheduler)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scheduler = self.backbone.noise_scheduler
        generators = [torch.Generator().manual_seed(keyed_seed("val", batch_idx, i)) for i in batch["id"]]
        latents = sampled_latents(self.backbone, batch, generators)
        noise = self.denoising_loss.sample_noise(latents, generator=generators)
        timesteps = torch.stack(
            [torch.randint(0, scheduler.config.num_train_timesteps, (), generator=g) for g in generators]
        ).to(self.device)
        prediction = self.predict(
            scheduler.add_noise(latents, noise, timesteps), timesteps, self.image_embeddings(batch["id"])
        )
        loss = self.denoising_loss(
            prediction, self.denoising_loss.target(scheduler, latents, noise, timesteps), timesteps, scheduler
        )
        self.log("val/denoising", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def export_pretrained(self, folder: Path, trained_with: dict | None = None) -> Path:
        """``folder``: the projection (``save_pretrained``) and ``unclip_decoder.json`` (what it decodes with)."""
        folder = Path(folder)
        self.projection.save_pretrained(folder)
        write_json(
            folder / DECODER_RECORD,
            {
                "kind": "unclip_decoder",
                "step": self.global_step,
                "embedding_dropout": self.embedding_dropout,
                "image_tower": tower_record(self.image_tower_path),
                "trained_with": trained_with,
            },
        )
        return folder


# ------------------------------------------------------------------------------------------ the prior


class UnclipPriorModule(_StageModule):
    """Trains a ``DiffusionPrior`` from the simple prompt's text features to the image's embedding.

    prior:           a partial of ``DiffusionPrior`` (``text_dim``, ``pooled_dim``, ``embedding_dim`` filled in here:
                     the LLM's width, CLIP's width, the tower's width).
    caption_dropout: probability that a row's prompt becomes the empty prompt (classifier-free guidance).
    decoder:         the decoder folder the prior is sampled with (recorded in the export; not needed to train).
    text_encoder:    a ``StableUnclipPriorText``: read a stock ``StableUnCLIPPipeline``'s prior text (its token states
                     and ``text_embeds``) instead of the LLM's states and the backbone's pooled CLIP state (llm=null).
    llm, llm_dim, feature_cache: the LLM and its width, or the feature cache that replaces them (``prepare_feature_cache``).
    """

    trained_prefix = "prior."

    @classmethod
    def takes_frozen_encoders(cls, config) -> bool:
        """Not with ``text_encoder``: the prior then reads no LLM and nothing of the backbone (train() builds neither)."""
        return config.get("text_encoder") is None

    def __init__(
        self,
        backbone: StableDiffusionBackbone | None,
        image_tower,
        prior: Callable[..., DiffusionPrior],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable | None = None,
        caption_dropout: float = 0.1,
        decoder: str | None = None,
        seed: int = 0,
        text_encoder: StableUnclipPriorText | None = None,
        llm: CausalLMFeatures | None = None,
        llm_dim: int | None = None,
        feature_cache=None,
    ) -> None:
        super().__init__(image_tower, optimizer, lr_scheduler, seed)
        self.backbone = backbone
        self.llm = llm
        self.feature_cache = feature_cache
        self.text_encoder = text_encoder
        if text_encoder is not None:
            if llm is not None:
                raise ValueError("model.text_encoder replaces the LLM: set llm=null (none is read)")
            text_dim, pooled_dim = text_encoder.hidden_size, text_encoder.pooled_dim
        else:
            if backbone is None:
                raise ValueError("the unCLIP prior reads the backbone's pooled CLIP state: it needs the backbone")
            text_dim, pooled_dim = llm.hidden_size if llm is not None else llm_dim, backbone.cross_attention_dim
            if not isinstance(text_dim, int):
                raise TypeError(
                    f"the unCLIP prior reads one LLM's token states (llm=smollm2_tokens); got width {text_dim!r}"
                )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.prior = prior(text_dim=text_dim, pooled_dim=pooled_dim, embedding_dim=self.tower.config.embedding_dim)
        self.caption_dropout = caption_dropout
        self.decoder = None if decoder is None else str(decoder)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.embeddings and not bool((self.prior.transformer.clip_std != 0).any()):
            # Before the first step: PriorTransformer starts clip_mean/clip_std at zero (models/prior.py).
            train_ids = [row.id for row in self.trainer.datamodule.train_set.rows]
            self.prior.fit_embedding_stats(torch.stack([self.embeddings[i] for i in train_ids]).to(self.device))

    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(LLM token states [B, L, D], their mask [B, L], CLIP's pooled state [B, d]) of the prompts; with
        ``text_encoder``, (its token states [B, 77, D], their mask, its ``text_embeds`` [B, P])."""
        if self.text_encoder is not None:
            # Computed here at every step, the feature cache on or off: the cache holds the backbone's CLIP states
            # and the LLM's, not this tower's, and the tower is frozen and small (CLIP ViT-L/14's text side, 123 M).
            states, mask, pooled = self.text_encoder(prompts)
            return states.to(self.device), mask.to(self.device), pooled.to(self.device)
        if self.feature_cache is not None:
            features = self.feature_cache.text_features(prompts, device=self.device)
            clip, states, mask = features.clip, features.llm, features.llm_mask
        else:
            clip = self.backbone.encode_prompt(prompts)
            states, mask = self.llm(prompts)
        if states is None or states.ndim != 3:
            raise ValueError("the unCLIP prior reads token states [B, L, D]: use llm=smollm2_tokens (pooling: none)")
        return (
            states.to(self.device),
            None if mask is None else mask.to(self.device),
            clip_pooled(self.backbone, clip, prompts),
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = sample_generators(self.seed, self.current_epoch, self.global_step, batch["id"])
        dropped = [torch.rand((), generator=g).item() < self.caption_dropout for g in generators]
        states, mask, pooled = self.text(blank(batch["simple_prompt"], dropped))
        # One generator for the batch's noise and timesteps, keyed by its rows and the step.
        generator = torch.Generator().manual_seed(
            keyed_seed(self.seed, self.current_epoch, self.global_step, *batch["id"])
        )
        loss = self.prior.training_loss(self.image_embeddings(batch["id"]), states, mask, pooled, generator=generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        states, mask, pooled = self.text(list(batch["simple_prompt"]))
        generator = torch.Generator().manual_seed(keyed_seed("val", batch_idx))
        loss = self.prior.training_loss(self.image_embeddings(batch["id"]), states, mask, pooled, generator=generator)
        self.log("val/prior", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def export_pretrained(self, folder: Path, trained_with: dict | None = None) -> Path:
        """``folder``: ``prior/`` (``save_pretrained``, fitted statistics included) and ``unclip.json``: the decoder
        it is sampled with, the image tower, and the backbone and LLM whose features it reads. With a stock pipeline's
        text, also ``prior_transformer/``: ``DiffusionPrior.stock_transformer``, the ``prior`` of that pipeline;
        ``unclip.json``'s ``prior_transformer`` names it, or says why it is not written."""
        folder = Path(folder)
        self.prior.save_pretrained(folder / "prior")
        blocker = self.stock_blocker()
        if blocker is None:
            self.prior.stock_transformer().save_pretrained(folder / STOCK_PRIOR)
            stock = {"folder": STOCK_PRIOR, "pipeline": self.text_encoder.pipeline}
        else:
            shutil.rmtree(folder / STOCK_PRIOR, ignore_errors=True)  # none from an earlier export in this folder
            stock = {"folder": None, "skipped": blocker}
        if self.text_encoder is not None:
            text = {
                "states": "prior_text_encoder last_hidden_state",
                "pooled": "prior_text_encoder text_embeds",
                "pipeline": self.text_encoder.pipeline,
            }
        else:
            text = {"states": "llm token states", "pooled": "CLIP pooled state"}
        write_json(
            folder / PRIOR_RECORD,
            {
                "kind": "unclip",
                "step": self.global_step,
                "caption_dropout": self.caption_dropout,
                "decoder": None if self.decoder is None else str(Path(self.decoder).resolve()),
                "image_tower": tower_record(self.image_tower_path),
                "text": text,
                "prior_transformer": stock,
                "trained_with": trained_with,
            },
        )
        return folder

    def stock_blocker(self) -> str | None:
        """Why ``StableUnCLIPPipeline`` cannot take this prior as its ``prior``; None when it can."""
        config = self.prior.config
        if self.text_encoder is None:
            return (
                "the prior reads an LLM's token states and the backbone's pooled CLIP state, while "
                "StableUnCLIPPipeline feeds its prior its prior_text_encoder's last_hidden_state and text_embeds: "
                "train with +experiment=unclip_sd21_clip for a drop-in prior"
            )
        if config.text_dim != config.embedding_dim:
            return (
                f"the prior text encoder is {config.text_dim} wide but the image embedding {config.embedding_dim}: "
                "PriorTransformer's encoder_hidden_states_proj reads embedding_dim-wide states, so text_proj cannot "
                "be folded into it (choose an image tower of the text encoder's width, as CLIP ViT-L/14's 768)"
            )
        if config.num_embeddings != self.text_encoder.max_length:
            return (
                f"the pipeline pads its prior text to {self.text_encoder.max_length} tokens but the prior reads "
                f"num_embeddings={config.num_embeddings}: set model.prior.num_embeddings={self.text_encoder.max_length}"
            )
        return None


def newest_decoder(path: str | Path) -> str:
    """A decoder folder: ``path`` itself when it is one (it holds ``unclip_decoder.json``), else the newest
    ``runs/*/decoder`` under ``path`` (a task's folder, ``outputs/unclip_decoder_toy``)."""
    path = Path(path)
    if (path / DECODER_RECORD).exists():
        return str(path)
    found = [p for p in path.glob("runs/*/decoder") if (p / DECODER_RECORD).exists()]
    if not found:
        raise FileNotFoundError(
            f"no unCLIP decoder in {path} (a folder with {DECODER_RECORD}, or runs/*/decoder under it): train one "
            "first with `python -m sur_lightning.train +experiment=unclip_decoder_toy`, or set model.decoder=<its folder>"
        )
    return str(max(found, key=lambda p: (p / DECODER_RECORD).stat().st_mtime))
