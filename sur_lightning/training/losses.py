"""Training objectives.

DenoisingLoss          MSE between the UNet prediction and the ε or v target, optional min-SNR-γ
                       weighting (diffusers' ``compute_snr``) and optional offset noise.
FeatureAlignmentLoss   pulls a student feature toward a teacher feature: SUR's temperature KL
                       (``kl``), ``cosine`` or ``mse``; used for L_prompt (adapter output vs
                       CLIP(complex prompt)) and L_llm (encoder output vs W0·h_LLM), each weighted by λ.
TeacherPredictionLoss  pulls the frozen UNet's prediction under the connector's conditioning toward its
                       prediction under CLIP(complex prompt): alignment in the UNet's output space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, ...] x2 -> [B]: the float32 MSE of each sample, for per-timestep weights (min-SNR, 1/SNR)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))


class DenoisingLoss:
    """loss(pred [B,C,H,W], target [B,C,H,W], timesteps [B], scheduler) -> scalar."""

    def __init__(self, snr_gamma: float | None = None, noise_offset: float = 0.0) -> None:
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"loss.denoising.snr_gamma must be positive or null, got {snr_gamma}")
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def sample_noise(
        self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Noise shaped like ``latents`` [B,C,H,W]; ``generator``: one for the batch, or one per sample
        (diffusers' ``randn_tensor`` then draws row i from generator i, on that generator's device)."""
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.noise_offset:
            # Offset noise (crosslabs.org/blog/diffusion-with-offset-noise): lets the model shift mean brightness.
            offset = randn_tensor(latents.shape[:2] + (1, 1), generator=generator, device=latents.device)
            noise = noise + self.noise_offset * offset.to(latents.dtype)
        return noise

    @staticmethod
    def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r} (epsilon or v_prediction)")

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        from diffusers.training_utils import compute_snr

        # Min-SNR-γ (arXiv 2303.09556): weight = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v.
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=self.snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        return (per_sample_mse(pred, target) * weight).mean()


class FeatureAlignmentLoss:
    """loss(student, teacher) -> scalar, scaled by nothing (``weight`` is λ, applied by the module).

    student [B,N,d]; teacher [B,N,d] or [B,d] (a pooled teacher is broadcast over the N tokens).
      kl:     SUR's official distillation: KL(softmax(student/τ) ‖ softmax(teacher/τ)) over d,
              summed over tokens, averaged over the batch, times τ² — i.e.
              ``F.kl_div(log_softmax(teacher/τ), softmax(student/τ), reduction="batchmean")·τ²``.
      cosine: 1 − cos, averaged over the batch: between the token means (``pooling="mean"``), or
              per token and then averaged over the tokens (``pooling="tokens"``). Prompts that differ in
              one word have nearly the same token mean, so only the per-token form tells them apart.
      mse:    mean squared error, element-wise.
    """

    KINDS = ("kl", "cosine", "mse")
    POOLINGS = ("mean", "tokens")

    def __init__(self, kind: str = "kl", weight: float = 1e-5, temperature: float = 1.0, pooling: str = "mean") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"alignment loss kind must be one of {self.KINDS}, got {kind!r}")
        if pooling not in self.POOLINGS:
            raise ValueError(f"alignment loss pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        if temperature <= 0:
            raise ValueError(f"alignment loss temperature must be positive, got {temperature}")
        self.kind = kind
        self.weight = weight
        self.temperature = temperature

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = student.float(), teacher.float()
        if teacher.ndim == student.ndim - 1:
            teacher = teacher.unsqueeze(-2).expand_as(student)
        if teacher.shape != student.shape:
            raise ValueError(f"alignment: teacher shape {tuple(teacher.shape)} != student {tuple(student.shape)}")
        if self.kind == "kl":
            tau = self.temperature
            kl = F.kl_div(F.log_softmax(teacher / tau, dim=-1), F.softmax(student / tau, dim=-1), reduction="batchmean")
            return kl * tau * tau
        if self.kind == "cosine" and self.pooling == "tokens":
            return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        if self.kind == "cosine":
            s = F.normalize(student.reshape(student.shape[0], -1, student.shape[-1]).mean(1), dim=-1)
            t = F.normalize(teacher.reshape(teacher.shape[0], -1, teacher.shape[-1]).mean(1), dim=-1)
            return (1.0 - (s * t).sum(-1)).mean()
        return F.mse_loss(student, teacher)


class TeacherPredictionLoss:
    """loss(student [B,C,H,W], teacher [B,C,H,W], timesteps [B], scheduler) -> scalar; ``weight`` is λ, applied by the module.

    student: the frozen UNet's prediction from x_t at t under the connector's conditioning of the simple
    prompt (the prediction the denoising loss reads); teacher: the same UNet, same x_t and t, under
    CLIP(complex prompt), without gradient. The base model already draws complex prompts right, so this
    distils what it does with them, whatever the token positions: the token-wise prompt term asks the
    adapter to reproduce CLIP(complex) position by position, although "a trio of tomatoes" and "three red
    circles" put their words at different positions. It works for any connector (ELLA's 64 tokens too).
    It costs one more UNet forward, without backward.

    space="prediction": MSE of the UNet's output (ε or v) itself. An ε error at small t is a tiny image error
    amplified by 1/σ_t, so this MSE is dominated by the low-noise steps, where the prompt no longer decides
    the picture. space="x0": the MSE of the clean latents the two predictions imply, i.e. the prediction MSE
    per sample times 1/SNR(t) (ε) or 1/(SNR(t)+1) (v), from diffusers' ``compute_snr``: weighted toward the
    high-noise steps, where colour, shape and count are laid down.
    """

    SPACES = ("prediction", "x0")

    def __init__(self, weight: float = 1.0, space: str = "prediction") -> None:
        if weight <= 0:
            raise ValueError(f"loss.teacher_prediction.weight must be positive, got {weight}")
        if space not in self.SPACES:
            raise ValueError(f"loss.teacher_prediction.space must be one of {self.SPACES}, got {space!r}")
        self.weight = weight
        self.space = space

    def __call__(
        self, student: torch.Tensor, teacher: torch.Tensor, timesteps: torch.Tensor, scheduler
    ) -> torch.Tensor:
        if teacher.shape != student.shape:
            raise ValueError(f"teacher prediction shape {tuple(teacher.shape)} != student {tuple(student.shape)}")
        if self.space == "prediction":
            return F.mse_loss(student.float(), teacher.float())
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps).float()
        to_x0 = 1.0 / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else 1.0 / snr
        return (per_sample_mse(student, teacher) * to_x0).mean()


class TeacherWeights(nn.Module):
    """The weight of each teacher's distillation term (``llm=multi``): fixed, or a softmax over learned logits.

    forward() -> {name: weight [] (0-d)}, summing to 1.

    Learned weights minimise the weighted sum, so they drift toward the teacher whose term is smallest;
    ``train/teacher_weight/<name>`` shows where they went.
    """

    def __init__(self, weights: dict[str, float], learn: bool = False) -> None:
        super().__init__()
        self.names = list(weights)
        initial = torch.tensor([float(weights[n]) for n in self.names])
        logits = (initial / initial.sum()).log()
        self.learn = learn
        if learn:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.logits.softmax(dim=0)))
