"""The LightningModule: one training step, read top to bottom, in the order of the data flow in docs/architecture.md.

batch → frozen encoders (VAE latent, CLIP(simple), CLIP(complex), LLM(simple))
      → connector → conditioning
      → noise + timestep → frozen UNet (SDXL: + pooled embedding and size/crop time ids) → denoising loss
      → + λ_prompt · align(conditioning, CLIP(complex) and/or CLIP(LLM rewrite)) + λ_llm · align(encoder output, W0·h_LLM)
      → + λ_teacher · MSE(UNet prediction, the frozen UNet's prediction under CLIP(complex))   (optional)
Only the connector's parameters (SUR: adapter, η net, W0) are trained.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import lightning as L
import torch
from diffusers.utils.torch_utils import randn_tensor
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import nn

from sur_lightning.models.backbone import StableDiffusionBackbone
from sur_lightning.models.connectors import ConnectorOutput, TextFeatures
from sur_lightning.models.llm import CausalLMFeatures
from sur_lightning.models.llm import teacher_weights as normalised_teacher_weights
from sur_lightning.models.weights import check_finite
from sur_lightning.training.losses import DenoisingLoss, FeatureAlignmentLoss, TeacherPredictionLoss, TeacherWeights

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sur_lightning.training.feature_store import FeatureCache


def sample_generators(seed: int, epoch: int, step: int, sample_ids: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from sha256 of (seed, epoch, step, sample id).

    A training sample's random draws (caption dropout, VAE latent sample, noise, timestep) then depend only
    on which sample it is and when it is seen, not on the batch it shares, the number of processes, or
    the global RNG's state: two gloo ranks draw exactly what one process with their union draws, and a
    resumed run draws what the uninterrupted run drew. The epoch is in the key so that with gradient
    accumulation across an epoch boundary a sample seen twice in one optimizer step gets fresh draws.
    """
    return [torch.Generator().manual_seed(keyed_seed(seed, epoch, step, sample_id)) for sample_id in sample_ids]


def keyed_seed(*key) -> int:
    """A 63-bit seed from sha256 of the key's parts: unrelated seeds for neighbouring keys."""
    digest = hashlib.sha256(":".join(str(part) for part in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def blank(prompts: Sequence[str], dropped: Sequence[bool]) -> list[str]:
    """The prompts with each dropped one replaced by the empty prompt."""
    return ["" if drop else prompt for prompt, drop in zip(prompts, dropped)]


class ConnectorTrainingModule(L.LightningModule):
    """Trains a connector between frozen text encoders and a frozen Stable Diffusion UNet.

    backbone: ``StableDiffusionBackbone`` (SD1.x/2.x) or ``StableDiffusionXLBackbone`` (SDXL: the connector also
    gets ``pooled_dim``, and the UNet the pooled embedding and each image's size/crop time ids).

    connector: an ``nn.Module`` or a partial that takes ``dim`` (the UNet's cross-attention width)
    and ``llm_dim`` (the LLM's hidden width), filled in here from the loaded models.
    seed: initialises the connector built here (a generator seeded by it alone, so a run's starting weights do not
    depend on what was loaded or cached before), and keys each training sample's random draws with
    ``sample_generators`` (with the epoch, the global step and the batch's ``id``).
    """

    @classmethod
    def takes_frozen_encoders(cls, config) -> bool:
        """train() builds the frozen backbone and LLM, or opens their feature cache, and hands them in."""
        return True

    def __init__(
        self,
        backbone: StableDiffusionBackbone,
        connector: nn.Module | Callable[..., nn.Module],
        denoising_loss: DenoisingLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        llm: CausalLMFeatures | None = None,
        prompt_loss: FeatureAlignmentLoss | None = None,
        llm_loss: FeatureAlignmentLoss | None = None,
        teacher_prediction_loss: TeacherPredictionLoss | None = None,
        denoise_grad_to_connector: bool = True,
        caption_dropout: float = 0.0,
        eta_histogram_every_n_steps: int = 50,
        feature_cache: FeatureCache | None = None,
        llm_dim: int | None = None,
        max_nonfinite_in_a_row: int = 10,
        align_target: str = "complex",
        teacher_weights: dict[str, float] | None = None,
        learn_teacher_weights: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.llm = llm
        if not isinstance(connector, nn.Module):
            # With a complete feature cache there is no LLM: its width comes from the cached states.
            widths = {"dim": backbone.cross_attention_dim, "llm_dim": llm.hidden_size if llm else llm_dim}
            if backbone.pooled_dim is not None:  # SDXL: the width of the UNet's pooled text embedding
                widths["pooled_dim"] = backbone.pooled_dim
            # Initial weights from the run's seed alone: whatever loading the frozen parts drew from the global
            # generator (a cold cache builds and converts models, a warm one does not) cannot shift them.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                connector = connector(**widths)
        # Cached CLIP/LLM states by prompt (sur_lightning/training/feature_store.py); None encodes every step.
        self.feature_cache = feature_cache
        self.connector = connector
        self.denoising_loss = denoising_loss
        self.prompt_loss = prompt_loss
        self.llm_loss = llm_loss
        self.teacher_prediction_loss = teacher_prediction_loss
        if teacher_prediction_loss is not None and not denoise_grad_to_connector:
            # The teacher term reaches the connector only through the UNet prediction that this detaches.
            raise ValueError(
                "loss.teacher_prediction needs model.denoise_grad_to_connector=true: with false the UNet's "
                "prediction carries no gradient to the connector"
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # SUR's released code cuts the denoising gradient from the adapter; False reproduces it.
        self.denoise_grad_to_connector = denoise_grad_to_connector
        # Probability that a training prompt becomes the empty prompt, so classifier-free guidance has
        # an unconditional branch to use (ELLA: 0.1). Rows are drawn from their sample's generator.
        # With the alignment losses a dropped caption's targets are CLIP("") and the empty prompt's LLM state,
        # so the connector's output for "" (the negative prompt at generation) is trained too.
        self.caption_dropout = caption_dropout
        if caption_dropout and teacher_prediction_loss is not None:
            # The teacher predicts under the complex prompt of the caption a dropped row replaced.
            raise ValueError(
                f"model.caption_dropout={caption_dropout} cannot be combined with model.teacher_prediction_loss "
                "(+loss/teacher=unet): drop the teacher, or set caption_dropout=0"
            )
        # The prompt loss's target: the complex prompt, the LLM's rewrite of the simple one (batch key
        # rewrite_prompt, sur_lightning/knowledge/rewriter.py), or both, each term weighted ½.
        if align_target not in ("complex", "rewrite", "both"):
            raise ValueError(f"loss.align_target must be complex, rewrite or both, got {align_target!r}")
        self.align_target = align_target
        # llm=multi: the weight of each teacher's distillation term, fixed or learned (a softmax over logits).
        self.teacher_weights = (
            TeacherWeights(normalised_teacher_weights(list(teacher_weights), teacher_weights), learn_teacher_weights)
            if teacher_weights
            else None
        )
        self.eta_histogram_every_n_steps = eta_histogram_every_n_steps
        # A NaN/inf loss skips its step (no backward, no optimizer step); this many in a row stop training.
        if max_nonfinite_in_a_row < 1:
            raise ValueError(f"model.max_nonfinite_in_a_row must be >= 1, got {max_nonfinite_in_a_row}")
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.nonfinite_skipped = 0
        self.nonfinite_in_a_row = 0
        self.seed = seed
        # Checkpoints hold only the connector; the frozen models come back from their configs.
        self.strict_loading = False

    # ---------------------------------------------------------------- frozen encoders

    def text_features(self, prompts: list[str]) -> TextFeatures:
        """CLIP states of the prompts [B,77,d] (SDXL: and the pooled embedding [B,P]) and, when an LLM is
        configured, its features [B,D] or [B,T,D].

        Read from the feature cache when there is one (then no text encoder or LLM runs).
        """
        if self.feature_cache is not None:
            return self.feature_cache.text_features(prompts, device=self.device)
        clip, pooled = self.backbone.encode_text(prompts)
        if self.llm is None:
            return TextFeatures(clip=clip, pooled=pooled)
        llm_states, llm_mask = self.llm(prompts)
        return TextFeatures(clip=clip, llm=llm_states, llm_mask=llm_mask, pooled=pooled)

    def clip_features(self, prompts: list[str]) -> TextFeatures:
        """CLIP states [B,77,d] of the prompts and, for SDXL, their pooled embedding [B,P]; from the cache when there is one."""
        if self.feature_cache is not None:
            return self.feature_cache.clip_features(prompts, device=self.device)
        clip, pooled = self.backbone.encode_text(prompts)
        return TextFeatures(clip=clip, pooled=pooled)

    def latents(self, batch: dict, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Scaled VAE latents [B,4,h,w] sampled from the encoder's distribution: computed from
        ``pixel_values``, or rebuilt from the cached ``latent_mean``/``latent_logvar`` (no encoder runs).
        ``generator``: one for the batch, or one per sample."""
        if "latent_mean" in batch:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            moments = torch.cat([batch["latent_mean"], batch["latent_logvar"]], dim=1)
            distribution = DiagonalGaussianDistribution(moments)
        else:
            distribution = self.backbone.encode_images(batch["pixel_values"])
        # diffusers' randn_tensor draws sample i from generator i (on the generator's device) when given a list.
        sample = distribution.mean + distribution.std * randn_tensor(
            distribution.mean.shape, generator=generator, device=distribution.mean.device, dtype=distribution.mean.dtype
        )
        return self.backbone.scale_latents(sample)

    def condition(self, prompts: list[str], timesteps: torch.Tensor) -> ConnectorOutput:
        return self.connector(self.text_features(prompts), timesteps)

    # ---------------------------------------------------------------- training

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # The connector's dropout draws from the global RNG: fork it and seed it from (seed, epoch, step, rank)
        # for this step's forward pass, so a resumed run draws the same masks without any RNG state in the
        # checkpoint. The global RNG is left as it was; backward needs no random numbers.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(keyed_seed(self.seed, self.current_epoch, self.global_step, f"rank{self.global_rank}"))
            return self.training_forward(batch)

    def training_forward(self, batch: dict) -> torch.Tensor | None:
        scheduler = self.backbone.noise_scheduler

        # Every random draw below comes from its sample's own generator, in this order.
        generators = sample_generators(self.seed, self.current_epoch, self.global_step, batch["id"])

        # 1. Frozen encoders: VAE latent, CLIP(simple) and LLM(simple), after caption dropout.
        dropped = self.dropped_captions(generators)
        prompts = blank(batch["simple_prompt"], dropped)
        latents = self.latents(batch, generators)
        features = self.text_features(prompts)

        # 2. Noise and timestep.
        noise = self.denoising_loss.sample_noise(latents, generator=generators)
        timesteps = self.sample_timesteps(generators, scheduler.config.num_train_timesteps)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)

        # 3. Connector → conditioning c for the UNet.
        out = self.connector(features, timesteps)
        conditioning = out.conditioning if self.denoise_grad_to_connector else out.conditioning.detach()

        # 4. Frozen UNet → denoising loss. SDXL also reads the pooled embedding and each image's size and crop.
        time_ids = self.backbone.batch_time_ids(batch, latents)
        pooled = out.pooled if out.pooled is None or self.denoise_grad_to_connector else out.pooled.detach()
        prediction = self.backbone.predict(noisy_latents, timesteps, conditioning, pooled, time_ids)
        target = self.denoising_loss.target(scheduler, latents, noise, timesteps)
        losses = {"denoising": self.denoising_loss(prediction, target, timesteps, scheduler)}
        loss = losses["denoising"]

        # 5. Alignment to CLIP(complex prompt) and/or CLIP(the LLM's rewrite), and distillation of the LLM
        #    state through W0.
        if self.prompt_loss is not None:
            losses.update(self.prompt_alignment(out, batch, dropped))
            loss = loss + self.prompt_loss.weight * losses["prompt"]
        if self.llm_loss is not None:
            losses.update(self.llm_distillation(out.internals["encoder"], out.internals["llm_projected"]))
            loss = loss + self.llm_loss.weight * losses["llm"]

        # 6. Alignment in the UNet's output space: the same x_t and t under CLIP(complex prompt) is the teacher.
        if self.teacher_prediction_loss is not None:
            with torch.no_grad():
                complex_ = self.clip_features(batch["complex_prompt"])
                teacher = self.backbone.predict(noisy_latents, timesteps, complex_.clip, complex_.pooled, time_ids)
            losses["teacher_prediction"] = self.teacher_prediction_loss(prediction, teacher, timesteps, scheduler)
            loss = loss + self.teacher_prediction_loss.weight * losses["teacher_prediction"]

        if not torch.isfinite(loss):
            return self.skip_nonfinite(losses)
        self.nonfinite_in_a_row = 0
        self.log_training(loss, losses, out, batch_size=latents.shape[0])
        return loss

    def prompt_alignment(self, out: ConnectorOutput, batch: dict, dropped: list[bool]) -> dict[str, torch.Tensor]:
        """{"prompt": the term that enters the loss} plus, for ``both``, its two halves for logging.
        A dropped caption (``dropped[i]``) is aligned to CLIP(""). On SDXL a connector that changes the pooled
        embedding (``adapts_pooled``) has it aligned to the target's pooled embedding too, in the same term."""
        if self.align_target != "complex" and "rewrite_prompt" not in batch:
            raise KeyError(
                f"loss.align_target={self.align_target} needs the LLM's rewrites in the batch (rewrite_prompt): "
                "build the datamodule with sur_lightning.config.datamodule_arguments(cfg), as train.py does"
            )
        terms = {}
        if self.align_target in ("complex", "both"):
            terms["prompt_complex"] = self.align(out, self.clip_features(blank(batch["complex_prompt"], dropped)))
        if self.align_target in ("rewrite", "both"):
            terms["prompt_rewrite"] = self.align(out, self.clip_features(blank(batch["rewrite_prompt"], dropped)))
        if len(terms) == 1:
            return {"prompt": next(iter(terms.values()))}
        return {"prompt": (terms["prompt_complex"] + terms["prompt_rewrite"]) / 2, **terms}

    def align(self, out: ConnectorOutput, target: TextFeatures) -> torch.Tensor:
        """The prompt loss between the connector's output and the target prompt's CLIP features: the tokens, plus
        the pooled embedding (as one more token) when the connector changes it."""
        loss = self.prompt_loss(out.conditioning, target.clip)
        if getattr(self.connector, "adapts_pooled", False) and out.pooled is not None:
            loss = loss + self.prompt_loss(out.pooled[:, None], target.pooled[:, None])
        return loss

    def llm_distillation(self, encoded: torch.Tensor, projected) -> dict[str, torch.Tensor]:
        """{"llm": the term that enters the loss}. With several teachers (``projected`` a dict, ``llm=multi``) it is
        Σ_t w_t · align(encoded, W0_t h_t), logged beside each teacher's term and weight."""
        if not isinstance(projected, dict):
            return {"llm": self.llm_loss(encoded, projected)}
        if self.teacher_weights is None or set(self.teacher_weights.names) != set(projected):
            raise ValueError(
                f"the LLM features come from teachers {sorted(projected)}, but model.teacher_weights is "
                f"{self.teacher_weights.names if self.teacher_weights else None}: set llm.weights for every teacher"
            )
        weights = self.teacher_weights()
        terms = {name: self.llm_loss(encoded, states) for name, states in projected.items()}
        total = sum(weights[name] * term for name, term in terms.items())
        return {
            "llm": total,
            **{f"llm/{name}": term for name, term in terms.items()},
            **{f"teacher_weight/{name}": weight.detach() for name, weight in weights.items()},
        }

    def skip_nonfinite(self, losses: dict[str, torch.Tensor]) -> None:
        """Skip this step: for ``None`` Lightning runs no backward, so the optimizer finds no gradients and changes
        no weight (AdamW's decay included); Lightning still counts the step. Count and log it."""
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        bad = ", ".join(f"{name}={float(value)}" for name, value in losses.items() if not torch.isfinite(value))
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=1)
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (step {self.global_step}: {bad}); stopping. "
                "Lower model.optimizer.lr, check the data, or raise model.max_nonfinite_in_a_row"
            )
        log.warning(
            f"step {self.global_step}: skipped, non-finite loss ({bad}); {self.nonfinite_skipped} skipped so far"
        )

    def dropped_captions(self, generators: list[torch.Generator]) -> list[bool]:
        """Per sample: is its caption replaced by the empty prompt (probability ``caption_dropout``, one draw each)."""
        if not self.caption_dropout:
            return [False] * len(generators)
        return [torch.rand((), generator=g).item() < self.caption_dropout for g in generators]

    def sample_timesteps(self, generators: list[torch.Generator], num_train_timesteps: int) -> torch.Tensor:
        """[B] int64 timesteps, uniform in [0, num_train_timesteps), one draw per sample."""
        return torch.stack([torch.randint(0, num_train_timesteps, (), generator=g) for g in generators]).to(self.device)

    def log_training(self, loss: torch.Tensor, losses: dict, out: ConnectorOutput, batch_size: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=batch_size)
        if out.eta is None:
            return
        self.log("train/eta_mean", out.eta.mean(), batch_size=batch_size)
        if self.global_step % self.eta_histogram_every_n_steps == 0:
            for logger in self.loggers:
                if isinstance(logger, WandbLogger):
                    import wandb

                    logger.experiment.log({"train/eta": wandb.Histogram(out.eta.detach().float().cpu().numpy())})
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram("train/eta", out.eta.detach().float(), self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Denoising loss on held-out rows, with noise and timesteps fixed by the batch index."""
        scheduler = self.backbone.noise_scheduler
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        latents = self.latents(batch, generator=generator)
        noise = self.denoising_loss.sample_noise(latents, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device, generator=generator
        )
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        out = self.condition(batch["simple_prompt"], timesteps)
        time_ids = self.backbone.batch_time_ids(batch, latents)
        prediction = self.backbone.predict(noisy_latents, timesteps, out.conditioning, out.pooled, time_ids)
        target = self.denoising_loss.target(scheduler, latents, noise, timesteps)
        loss = self.denoising_loss(prediction, target, timesteps, scheduler)
        self.log("val/denoising", loss, prog_bar=True, batch_size=latents.shape[0], sync_dist=True)
        return loss

    # ---------------------------------------------------------------- optimisation and checkpoints

    def trainable_parameters(self) -> list[nn.Parameter]:
        trained = list(self.connector.parameters())
        if self.teacher_weights is not None:
            trained += list(self.teacher_weights.parameters())
        return [p for p in trained if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming from NaN/inf weights would go on training and exporting garbage: stop, naming the file and tensor.
        source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        check_finite(checkpoint.get("state_dict", {}).items(), str(source))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("connector.", "teacher_weights."))
        }
