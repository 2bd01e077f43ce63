"""PixelSNAIL: an autoregressive prior over a grid of discrete codes, conditioned on text.

Chen et al., "PixelSNAIL: An Improved Autoregressive Generative Model", arXiv 1712.09763, written here from the
paper's description: causal convolutions in gated residual blocks for local context, interleaved with causal
self-attention so every position can read every earlier one (masked convolutions alone leave a blind spot
above and to the right). The text conditioning follows the conditional PixelCNN (van den Oord et al. 2016,
arXiv 1606.05328): a projected text vector added inside every gated activation, plus, as in text-to-image
transformers, cross-attention from every position to the text's token states.

Raster order: position n = i * G + j for row i, column j. The model factorises p(codes | text) =
prod_n p(code_n | codes_<n, text), so the logits at position n may depend on codes at positions < n only.
That holds by construction: the first convolution's kernel excludes its centre ("mask A"), every later
convolution sees the centre and what lies before it in raster order ("mask B"), and self-attention lets a
position attend to itself and earlier positions, whose keys hold their features (which, by induction, never
read their own code) and the embedding of the code one step earlier. ``tests/models/test_pixelsnail.py`` checks
both directions: no logit reads a code at or after its position, and every logit reads every earlier code.

Shapes (B batch, G grid side, N = G*G, K ``codebook_size``, W ``channels``, T text tokens)::

    codes        [B, G, G] int64 in [0, K)
    text_pooled  [B, P]           one vector per caption (``pooled_dim``), e.g. the LLM's mean-pooled state
    text_tokens  [B, T, D]        token states (``token_dim``), e.g. SmolLM2's or CLIP's last hidden states
    text_mask    [B, T] bool      True for real tokens, False for padding (never attended)

    codes -> embedding [B, W, G, G] -> mask-A conv + learned position embedding
          -> ``num_blocks`` x [ ``res_per_block`` gated residual layers (each + Linear(text_pooled))
                                -> + causal self-attention over the N positions (keys/values also read
                                     the previous code's embedding)
                                -> + cross-attention to text_tokens (key padding mask) ]
          -> ELU -> 1x1 conv -> logits [B, K, G, G]

Classifier-free guidance: in training, each caption is replaced with probability ``caption_dropout`` by a
learned null caption (a null pooled vector and one null token); sampling mixes conditional and null logits,
``null + guidance_scale * (cond - null)``, then draws with ``temperature`` from a seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class CausalConv2d(nn.Conv2d):
    """A k x k convolution (k odd) whose kernel is masked to the raster past of its centre.

    The output at (i, j) reads rows above i (all k columns of the kernel) and, on row i, columns left of j;
    and (i, j) itself unless ``exclude_centre`` (the first layer, which must not read the code it predicts).
    x [B, C_in, G, G] -> [B, C_out, G, G].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, exclude_centre: bool) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"CausalConv2d: kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.zeros(1, 1, kernel_size, kernel_size)
        mask[:, :, :centre, :] = 1  # every row above
        mask[:, :, centre, : centre + (0 if exclude_centre else 1)] = 1  # the centre row, left of (or up to) the centre
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class GatedResidualLayer(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(ELU(conv(ELU(x)))) + Linear(text_pooled), both convolutions causal (mask B).

    x [B, W, G, G], text_pooled [B, P] -> [B, W, G, G].
    """

    def __init__(self, channels: int, pooled_dim: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = CausalConv2d(channels, channels, kernel_size, exclude_centre=False)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = CausalConv2d(channels, 2 * channels, kernel_size, exclude_centre=False)
        # The text enters every gate, as in the conditional PixelCNN: a per-channel bias on both halves.
        self.text = nn.Linear(pooled_dim, 2 * channels)

    def forward(self, x: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.elu(x))
        h = self.conv_out(self.dropout(F.elu(h)))
        h = h + self.text(text_pooled)[:, :, None, None]
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class CausalSelfAttention(nn.Module):
    """Multi-head attention over the raster sequence; position n attends to positions <= n.

    Queries come from the features x; keys and values from [x, previous], where ``previous`` at position m is
    the embedding of the code at m - 1 (a learned start vector at m = 0), as PixelSNAIL feeds the input to its
    attention's keys and values. Key m thus reads codes < m only, and query n reads code n - 1 directly: the
    convolutions alone cannot hand position (i+1, 0) the code at (i, G-1), which ends the row above.

    x [B, W, G, G], previous [B, W, G, G] -> the residual update [B, W, G, G] (pre-LayerNorm, output projection).
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"CausalSelfAttention: channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(2 * channels, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        features = self.norm(x.flatten(2).transpose(1, 2))  # [B, N, W] in raster order
        k, v = self.key_value(torch.cat([features, previous.flatten(2).transpose(1, 2)], dim=-1)).chunk(2, dim=-1)
        heads = [t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (self.query(features), k, v)]
        # is_causal: query n sees keys 0..n. Key n is allowed: it reads codes < n only (mask A upstream, the shift).
        attended = F.scaled_dot_product_attention(*heads, is_causal=True)  # [B, heads, N, W/heads]
        update = self.out(attended.transpose(1, 2).flatten(2))  # [B, N, W]
        return update.transpose(1, 2).reshape(batch, channels, height, width)


class TextCrossAttention(nn.Module):
    """Every grid position attends to the caption's token states; padded tokens are masked out.

    x [B, W, G, G], text_tokens [B, T, D], text_mask [B, T] bool (True = real) -> update [B, W, G, G].
    """

    def __init__(self, channels: int, token_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, kdim=token_dim, vdim=token_dim, batch_first=True)

    def forward(self, x: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        queries = self.norm(x.flatten(2).transpose(1, 2))  # [B, N, W]
        update, _ = self.attention(queries, text_tokens, text_tokens, key_padding_mask=~text_mask, need_weights=False)
        return update.transpose(1, 2).reshape(batch, channels, height, width)


class PixelSNAILBlock(nn.Module):
    """``res_per_block`` gated residual layers, then causal self-attention and text cross-attention (both residual).

    x [B, W, G, G], previous [B, W, G, G] (the code embeddings shifted by one in raster order), the text -> [B, W, G, G].
    """

    def __init__(
        self,
        channels: int,
        pooled_dim: int,
        token_dim: int,
        num_heads: int,
        res_per_block: int,
        kernel_size: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.residuals = nn.ModuleList(
            GatedResidualLayer(channels, pooled_dim, kernel_size, dropout) for _ in range(res_per_block)
        )
        self.self_attention = CausalSelfAttention(channels, num_heads)
        self.cross_attention = TextCrossAttention(channels, token_dim, num_heads)

    def forward(self, x, previous, text_pooled, text_tokens, text_mask) -> torch.Tensor:
        for layer in self.residuals:
            x = layer(x, text_pooled)
        x = x + self.self_attention(x, previous)
        return x + self.cross_attention(x, text_tokens, text_mask)


class PixelSNAIL(ModelMixin, ConfigMixin):
    """Text-conditioned PixelSNAIL over a G x G code grid (see the module docstring for shapes).

    codebook_size:   K, the tokenizer's number of codes.
    grid_size:       G (16 for the toy world's 64 px images through its x4 VAE).
    channels:        W, the width of every layer.
    num_blocks, res_per_block: blocks of gated residual layers, each block closed by the two attentions.
    num_heads:       heads of both attentions.
    kernel_size:     the causal convolutions' kernel (odd); ``first_kernel_size`` the mask-A input convolution's.
    pooled_dim, token_dim: widths of the text's pooled vector and token states.
    dropout:         inside the gated residual layers.
    caption_dropout: probability that a training caption is replaced by the null caption (for guidance).
    """

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 256,
        grid_size: int = 16,
        channels: int = 64,
        num_blocks: int = 2,
        res_per_block: int = 2,
        num_heads: int = 4,
        kernel_size: int = 3,
        first_kernel_size: int = 5,
        pooled_dim: int = 576,
        token_dim: int = 576,
        dropout: float = 0.1,
        caption_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, channels)
        self.first = CausalConv2d(channels, channels, first_kernel_size, exclude_centre=True)
        # Where a position is: the convolutions cannot tell (zero padding aside), self-attention cannot at all.
        self.position = nn.Parameter(0.02 * torch.randn(1, channels, grid_size, grid_size))
        # What position 0 reads as "the previous code" in self-attention (there is none).
        self.start = nn.Parameter(0.02 * torch.randn(channels))
        self.blocks = nn.ModuleList(
            PixelSNAILBlock(channels, pooled_dim, token_dim, num_heads, res_per_block, kernel_size, dropout)
            for _ in range(num_blocks)
        )
        self.head = nn.Conv2d(channels, codebook_size, 1)
        # Near-uniform logits at the start (NLL ~ ln K): with the default init the first batches' NLL reached ~140
        # against ln 256 = 5.5, and training spiked for hundreds of steps. Small, not zero, so every logit still
        # reads its inputs (the causality tests take gradients through it).
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)
        # The null caption of classifier-free guidance: learned, one pooled vector and one always-real token.
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))
        self.null_token = nn.Parameter(torch.zeros(token_dim))

    # ------------------------------------------------------------------ the text condition

    def check_text(self, codes: torch.Tensor, text_pooled, text_tokens, text_mask) -> None:
        config = self.config
        batch = codes.shape[0]
        if codes.ndim != 3 or codes.shape[2] != config.grid_size or not 1 <= codes.shape[1] <= config.grid_size:
            raise ValueError(
                f"PixelSNAIL: codes {tuple(codes.shape)}, expected [B, {config.grid_size}, {config.grid_size}] "
                f"(or its first rows, [B, <= {config.grid_size}, {config.grid_size}])"
            )
        if text_pooled.shape != (batch, config.pooled_dim):
            raise ValueError(
                f"PixelSNAIL: text_pooled {tuple(text_pooled.shape)}, expected [{batch}, {config.pooled_dim}]"
            )
        if text_tokens.ndim != 3 or text_tokens.shape[0] != batch or text_tokens.shape[2] != config.token_dim:
            raise ValueError(
                f"PixelSNAIL: text_tokens {tuple(text_tokens.shape)}, expected [{batch}, T, {config.token_dim}]"
            )
        if text_mask.shape != text_tokens.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(
                f"PixelSNAIL: text_mask must be bool [B, T] = {tuple(text_tokens.shape[:2])}, got "
                f"{text_mask.dtype} {tuple(text_mask.shape)}"
            )
        if not text_mask.any(dim=1).all():
            # Attention over no key is undefined (NaN); an empty caption must still keep one token (BOS, or the null).
            rows = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"PixelSNAIL: rows {rows} of text_mask have no real token")

    def null_caption(self, text_pooled, text_tokens, text_mask, drop: torch.Tensor):
        """Replace the captions of the rows where ``drop`` [B] bool is True by the null caption:
        the null pooled vector, and token states whose only real token is the null token."""
        drop = drop.to(text_pooled.device)
        pooled = torch.where(drop[:, None], self.null_pooled.to(text_pooled.dtype), text_pooled)
        null_tokens = torch.zeros_like(text_tokens)
        null_tokens[:, 0] = self.null_token.to(text_tokens.dtype)
        tokens = torch.where(drop[:, None, None], null_tokens, text_tokens)
        null_mask = torch.zeros_like(text_mask)
        null_mask[:, 0] = True
        mask = torch.where(drop[:, None], null_mask, text_mask)
        return pooled, tokens, mask

    # ------------------------------------------------------------------ the model

    def forward(self, codes, text_pooled, text_tokens, text_mask, drop: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, G, G] (or its first H rows, [B, H, G]), the text (see the module docstring), ``drop`` [B] bool:
        rows read the null caption -> logits [B, K, G, G] ([B, K, H, G]); the logits at position n read the codes
        before n only."""
        self.check_text(codes, text_pooled, text_tokens, text_mask)
        if drop is not None:
            text_pooled, text_tokens, text_mask = self.null_caption(text_pooled, text_tokens, text_mask, drop)
        embedded = self.embedding(codes)  # [B, G, G, W]
        # previous[n] = embedded[n - 1] in raster order; the start vector at n = 0.
        sequence = embedded.flatten(1, 2)  # [B, N, W]
        start = self.start.expand(codes.shape[0], 1, -1)
        previous = torch.cat([start, sequence[:, :-1]], dim=1).transpose(1, 2).unflatten(2, codes.shape[1:])
        # The first H rows of the grid give the same logits there as the whole grid (nothing reads a later row).
        x = self.first(embedded.permute(0, 3, 1, 2)) + self.position[:, :, : codes.shape[1]]  # [B, W, H, G]
        for block in self.blocks:
            x = block(x, previous, text_pooled, text_tokens, text_mask)
        return self.head(F.elu(x))

    def loss(
        self, codes, text_pooled, text_tokens, text_mask, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy (nats per code) of the codes [B, G, G] under the model, each caption dropped with
        probability ``caption_dropout`` in train mode (drawn from ``generator``, else the global one)."""
        drop = None
        if self.training and self.config.caption_dropout > 0:
            draw = torch.rand(
                codes.shape[0], generator=generator, device="cpu" if generator is None else generator.device
            )
            drop = draw < self.config.caption_dropout
        logits = self(codes, text_pooled, text_tokens, text_mask, drop=drop)
        return F.cross_entropy(logits, codes)

    @torch.no_grad()
    def sample(
        self,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        temperature: float = 1.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Draw codes [B, G, G] one position at a time in raster order for the B captions.

        ``guidance_scale`` 1 reads the caption only; s != 1 mixes ``null + s * (cond - null)`` logits (the null
        caption's rows run in the same batch). ``temperature`` > 0 divides the logits. Same ``generator``
        state, same codes. ``generator`` may be a list of B generators, one per row: row b's G*G uniforms are
        drawn from generator b up front and each code is read off the inverse CDF, so a row's codes depend on its
        own seed and caption only, not on which rows share its batch. G*G forward passes: each recomputes the
        grid's rows up to the current one (no cache), which is what a convolutional prior costs."""
        if temperature <= 0:
            raise ValueError(f"PixelSNAIL.sample: temperature must be > 0, got {temperature}")
        uniforms = None
        if isinstance(generator, (list, tuple)):
            if len(generator) != text_pooled.shape[0]:
                raise ValueError(f"PixelSNAIL.sample: {len(generator)} generators for {text_pooled.shape[0]} rows")
            cells = self.config.grid_size**2
            uniforms = torch.stack([torch.rand(cells, generator=g, device=g.device) for g in generator])
        was_training = self.training
        self.eval()
        batch, side = text_pooled.shape[0], self.config.grid_size
        codes = torch.zeros(batch, side, side, dtype=torch.long, device=text_pooled.device)
        guided = guidance_scale != 1.0
        drop = None
        if guided:
            # One batch of 2B rows: the captions, then the same rows with the null caption.
            text_pooled, text_tokens, text_mask = (torch.cat([t, t]) for t in (text_pooled, text_tokens, text_mask))
            drop = torch.arange(2 * batch, device=codes.device) >= batch
        for n in range(side * side):
            i, j = divmod(n, side)
            # Only rows 0..i matter for row i's logits: the grid's first i + 1 rows halve the average cost.
            inputs = torch.cat([codes[:, : i + 1]] * 2) if guided else codes[:, : i + 1]
            logits = self(inputs, text_pooled, text_tokens, text_mask, drop=drop)[:, :, i, j]
            if guided:
                cond, null = logits.chunk(2)
                logits = null + guidance_scale * (cond - null)
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            if uniforms is None:
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                cdf = probs.cumsum(dim=-1)
                draw = uniforms[:, n : n + 1].to(cdf.device) * cdf[:, -1:]
                codes[:, i, j] = torch.searchsorted(cdf, draw).squeeze(1).clamp(max=probs.shape[-1] - 1)
        self.train(was_training)
        return codes


class PromptStates(nn.Module):
    """The text PixelSNAIL reads, from an LLM's token states (``CausalLMFeatures`` with ``pooling: none``).

    Each prompt is encoded alone (in a padded batch an LLM's states depend on the batch's longest prompt) and
    kept by prompt, so a training run encodes each distinct caption once. prompts [B] ->
    ``(text_pooled [B, D], text_tokens [B, T, D], text_mask [B, T] bool)``: the pooled vector is the mean of the
    real tokens' states, T the batch's longest prompt, padding zero and masked out. D = ``llm.hidden_size``.
    """

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm.requires_grad_(False).eval()
        self.memory: dict[str, torch.Tensor] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.llm.hidden_size)

    def train(self, mode: bool = True) -> PromptStates:
        super().train(mode)
        self.llm.eval()  # frozen: no dropout, whatever the training mode
        return self

    @torch.no_grad()
    def states(self, prompt: str) -> torch.Tensor:
        """[T, D] the real tokens' states of one prompt (float32, CPU)."""
        if prompt not in self.memory:
            states, mask = self.llm([prompt])
            tokens = states[0] if mask is None else states[0][mask[0].bool()]
            if tokens.ndim != 2 or tokens.shape[0] == 0:
                raise ValueError(
                    f"PromptStates: the LLM gave no token states for {prompt!r}; it needs llm.pooling=none"
                )
            self.memory[prompt] = tokens.float().cpu()
        return self.memory[prompt]

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        each = [self.states(p) for p in prompts]
        longest = max(t.shape[0] for t in each)
        tokens = torch.zeros(len(each), longest, each[0].shape[1])
        mask = torch.zeros(len(each), longest, dtype=torch.bool)
        for row, states in enumerate(each):
            tokens[row, : states.shape[0]] = states
            mask[row, : states.shape[0]] = True
        pooled = torch.stack([t.mean(dim=0) for t in each])
        return pooled, tokens, mask
