"""unCLIP's diffusion prior: text features -> an image embedding, by diffusion over the embedding.

Ramesh et al., "Hierarchical Text-Conditional Image Generation with CLIP Latents" (DALL·E 2 / unCLIP),
arXiv 2204.06125, §2.1: a decoder-only transformer with a causal attention mask reads, in order, the encoded text
tokens, the pooled text embedding, the timestep, the noised image embedding and a final query token, whose output
predicts the *clean* image embedding (an MSE loss on it, not on the noise). The transformer is diffusers'
``PriorTransformer`` (the prior of Karlo and of ``StableUnCLIPPipeline``); this class puts around it what that
model leaves to its caller, each a known trap:

- **the causal mask applies only when an attention mask is passed**: ``forward`` always passes one (True for the
  real text tokens), so the transformer is causal as in the paper, and padded tokens are never attended;
- **the text must then be exactly ``num_embeddings`` tokens**: shorter text is padded with zeros and masked,
  longer text is refused with an error naming ``num_embeddings``;
- **``clip_mean`` / ``clip_std`` start at zero**: the diffusion runs on standardised embeddings
  ``(e - clip_mean) / clip_std``, so they must be fitted from the data (``fit_embedding_stats``, from the image
  tower's embeddings of the training images) before training or sampling; both refuse to run on unfitted stats,
  and the stats are buffers in all but name (no gradient, never changed by the optimiser);
- **``encoder_hidden_states`` must be ``embedding_dim`` wide**: ``text_proj`` projects the token states (SmolLM2:
  576, the toy CLIP: 128) to it; the pooled embedding enters through ``PriorTransformer``'s ``embedding_proj``,
  which takes any width (``pooled_dim``).

Shapes (B batch, L text tokens <= N = ``num_embeddings``, T ``text_dim``, P ``pooled_dim``, E ``embedding_dim``)::

    text_states  [B, L, T]   token states (an LLM's or CLIP's last hidden states)
    text_mask    [B, L] bool True for real tokens (None: all L are real)
    text_pooled  [B, P]      one vector per caption (CLIP's pooled state, an LLM's mean-pooled state)
    image_embeds [B, E]      the image tower's embedding of the image (the target)

    [text_proj(text_states) padded to N, text_pooled, t, x_t, query] -> causal transformer -> query -> x_0 [B, E]

``stock_transformer`` gives the ``PriorTransformer`` alone, ``text_proj`` folded in, for diffusers'
``StableUnCLIPPipeline``, which passes CLIP's token states straight to ``encoder_hidden_states``.

Noise schedule: ``PRIOR_SCHEDULER``, a squared-cosine DDPM schedule with ``prediction_type="sample"`` (the model
predicts x_0), as unCLIP's prior; ``clip_sample`` is off, because the standardised embedding is not bounded by 1.
``sample`` draws embeddings from a seeded generator (optionally with classifier-free guidance against given
unconditional text features) and returns them in the tower's units (un-standardised, not renormalised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PriorTransformer
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from sur_lightning.models.rng import keeps_global_rng

# unCLIP's prior noise schedule; built from this config (not the library's defaults, which clip x_0 to [-1, 1]).
PRIOR_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
    "clip_sample": False,
}


class DiffusionPrior(ModelMixin, ConfigMixin):
    """A ``PriorTransformer`` with its text projection, its fitted embedding statistics and its sampler.

    text_dim:        width of the token states it reads.
    pooled_dim:      width of the pooled text embedding.
    embedding_dim:   width of the image embedding (the image tower's ``embedding_dim``).
    num_embeddings:  text tokens the transformer reads (shorter text is padded and masked).
    num_layers, num_attention_heads, attention_head_dim, dropout: the transformer's size.
    """

    @register_to_config
    def __init__(
        self,
        text_dim: int,
        pooled_dim: int,
        embedding_dim: int = 128,
        num_embeddings: int = 77,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # PriorTransformer's encoder_hidden_states_proj is Linear(embedding_dim, inner): the text must arrive E wide.
        self.text_proj = nn.Linear(text_dim, embedding_dim)
        self.transformer = PriorTransformer(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            embedding_dim=embedding_dim,
            num_embeddings=num_embeddings,
            additional_embeddings=4,  # pooled text, timestep, noised embedding, query ("prd") token
            dropout=dropout,
            embedding_proj_dim=pooled_dim,
            added_emb_type="prd",
            encoder_hid_proj_type="linear",
        )
        # Statistics of the data, not weights: fitted by fit_embedding_stats, never trained.
        self.transformer.clip_mean.requires_grad_(False)
        self.transformer.clip_std.requires_grad_(False)

    # ------------------------------------------------------------------ the embedding's statistics

    @torch.no_grad()
    def fit_embedding_stats(self, image_embeds: torch.Tensor, min_std: float = 1e-4) -> None:
        """Set ``clip_mean`` / ``clip_std`` to the per-dimension mean and std of ``image_embeds`` [N, E] (the tower's
        embeddings of the training images); ``min_std`` keeps a constant dimension from dividing by zero."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.embedding_dim or len(image_embeds) < 2:
            raise ValueError(
                f"DiffusionPrior.fit_embedding_stats: expected [N >= 2, {self.config.embedding_dim}] "
                f"embeddings, got {tuple(image_embeds.shape)}"
            )
        embeds = image_embeds.float()
        self.transformer.clip_mean.copy_(embeds.mean(dim=0, keepdim=True))
        self.transformer.clip_std.copy_(embeds.std(dim=0, keepdim=True).clamp(min=min_std))

    def check_fitted(self) -> None:
        if not bool((self.transformer.clip_std != 0).any()):
            raise ValueError(
                "DiffusionPrior: clip_std is zero (PriorTransformer starts it so): call "
                "fit_embedding_stats(<the image tower's embeddings of the training images>) first"
            )

    def standardise(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, E] in the tower's units -> the diffusion's space."""
        return (image_embeds - self.transformer.clip_mean) / self.transformer.clip_std

    def unstandardise(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] in the diffusion's space -> the tower's units."""
        return x * self.transformer.clip_std + self.transformer.clip_mean

    # ------------------------------------------------------------------ the text

    def prepare_text(
        self, text_states: torch.Tensor, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, T] states and [B, L] mask -> ([B, N, E] projected states, zero where padded; [B, N] bool mask)."""
        batch, length, _ = text_states.shape
        n = self.config.num_embeddings
        if length > n:
            raise ValueError(
                f"DiffusionPrior: the text has {length} tokens but the prior reads num_embeddings={n}; "
                "truncate the text or build the prior with a larger num_embeddings"
            )
        if text_mask is None:
            text_mask = torch.ones(batch, length, dtype=torch.bool, device=text_states.device)
        mask = F.pad(text_mask.bool(), (0, n - length), value=False)
        states = F.pad(self.text_proj(text_states.to(self.dtype)), (0, 0, 0, n - length))
        return states * mask[..., None].to(states.dtype), mask

    @keeps_global_rng  # building the copy draws its (overwritten) initial weights
    @torch.no_grad()
    def stock_transformer(self) -> PriorTransformer:
        """A plain ``PriorTransformer`` that computes ``forward`` from the token states themselves: ``text_proj``
        folded into its ``encoder_hidden_states_proj``, the fitted ``clip_mean``/``clip_std`` carried (its
        ``post_process_latents`` is ``unstandardise``). The form diffusers' ``StableUnCLIPPipeline`` calls: it passes
        its prior text encoder's ``last_hidden_state`` [B, N, T], ``attention_mask`` and ``text_embeds``.

        Two affine maps in a row are one: W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2), folded in float64.
        ``encoder_hidden_states_proj`` reads ``embedding_dim``-wide states, so the fold needs ``text_dim ==
        embedding_dim`` (else a ValueError). The other thing ``prepare_text`` does, zeroing the padded positions,
        changes nothing: PriorTransformer adds -10000 to a masked key's attention score, and every row keeps its
        first key unmasked (a real token: CLIP's start token), so a masked key's softmax weight underflows to
        exactly 0 in float32 (for scores less than ~9,900 apart) and its state never reaches a real position.
        """
        config = self.config
        if config.text_dim != config.embedding_dim:
            raise ValueError(
                f"DiffusionPrior.stock_transformer: text_proj maps text_dim={config.text_dim} to "
                f"embedding_dim={config.embedding_dim}, but PriorTransformer's encoder_hidden_states_proj reads "
                f"embedding_dim-wide states: the fold needs text_dim == embedding_dim"
            )
        stock = PriorTransformer.from_config(self.transformer.config)
        stock.load_state_dict(self.transformer.state_dict())
        inner = self.transformer.encoder_hidden_states_proj
        w1, b1 = self.text_proj.weight.double(), self.text_proj.bias.double()
        w2, b2 = inner.weight.double(), inner.bias.double()
        stock.encoder_hidden_states_proj.weight.copy_(w2 @ w1)
        stock.encoder_hidden_states_proj.bias.copy_(w2 @ b1 + b2)
        return stock.to(self.device, self.dtype).eval()

    # ------------------------------------------------------------------ the model

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_pooled: torch.Tensor,
    ) -> torch.Tensor:
        """The predicted clean embedding [B, E], in the diffusion's (standardised) space, from the noised one
        ``noisy`` [B, E] at ``timesteps`` [B]."""
        states, mask = self.prepare_text(text_states, text_mask)
        # The mask is always passed: without it PriorTransformer runs without its causal mask.
        return self.transformer(
            noisy.to(self.dtype),
            timesteps,
            proj_embedding=text_pooled.to(self.dtype),
            encoder_hidden_states=states,
            attention_mask=mask,
        ).predicted_image_embedding

    def training_loss(
        self,
        image_embeds: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_pooled: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """unCLIP's prior loss: MSE between the clean standardised embedding and its prediction from a noised copy
        at a uniformly drawn timestep. ``generator`` draws the noise and timesteps (None: the global one)."""
        self.check_fitted()
        scheduler = DDPMScheduler.from_config(PRIOR_SCHEDULER)
        clean = self.standardise(image_embeds.to(self.dtype))
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        timesteps = timesteps.to(clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        return F.mse_loss(self(noisy, timesteps, text_states, text_mask, text_pooled), clean)

    @torch.no_grad()
    def sample(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_pooled: torch.Tensor,
        generator: torch.Generator | int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Image embeddings [B, E] in the tower's units, drawn by ``num_inference_steps`` DDPM steps from noise.

        generator:       a ``torch.Generator`` or a seed: the same seed gives the same embeddings.
        guidance_scale:  classifier-free guidance, ``uncond + scale * (cond - uncond)``, when ``negative`` gives
                         the unconditional text features ``(states, mask, pooled)`` (e.g. the empty prompt's,
                         batch 1 or B); 1.0 reads the text alone.
        """
        self.check_fitted()
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        batch = len(text_pooled)
        guided = negative is not None and guidance_scale != 1.0
        if guided:  # one batch: the unconditional rows first, then the conditional ones
            neg_states, neg_mask, neg_pooled = negative
            length = max(text_states.shape[1], neg_states.shape[1])  # both halves share one token length
            text_states, text_mask = pad_tokens(text_states, text_mask, length)
            neg_states, neg_mask = pad_tokens(neg_states, neg_mask, length)
            text_states = torch.cat([neg_states.expand(batch, -1, -1), text_states])
            text_mask = torch.cat([neg_mask.expand(batch, -1), text_mask])
            text_pooled = torch.cat([neg_pooled.expand(batch, -1), text_pooled])
        scheduler = DDPMScheduler.from_config(PRIOR_SCHEDULER)
        scheduler.set_timesteps(num_inference_steps)
        x = torch.randn(batch, self.config.embedding_dim, generator=generator, dtype=self.dtype).to(self.device)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([x, x]) if guided else x
            timesteps = torch.full((len(model_input),), int(t), dtype=torch.long, device=self.device)
            predicted = self(model_input, timesteps, text_states, text_mask, text_pooled)
            if guided:
                uncond, cond = predicted.chunk(2)
                predicted = uncond + guidance_scale * (cond - uncond)
            # The step's added noise comes from the same generator: a seed fixes the whole chain.
            x = scheduler.step(predicted, t, x, generator=generator).prev_sample
        return self.unstandardise(x)


def all_real(states: torch.Tensor) -> torch.Tensor:
    """A mask [B, L] that marks every token real."""
    return torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)


def pad_tokens(states: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [B, L, T] states with zeros and their mask with False to ``length`` tokens."""
    mask = all_real(states) if mask is None else mask.bool()
    extra = length - states.shape[1]
    return F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)
