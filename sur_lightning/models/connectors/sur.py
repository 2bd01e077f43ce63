"""SUR-adapter (Zhong et al., "SUR-adapter: Enhancing Text-to-Image Pre-trained Diffusion Models with
Large Language Models", arXiv 2305.05189), as in the authors' released module, with its defects as switches.

    V   = CLIP(simple prompt)                      [B, 77, d]
    E   = TransformerEncoder(V)                    [B, 77, d]   2 layers, 8 heads, ff 2048
    w   = softmax(q(E) k(V)^T / sqrt(d)) V + V     [B, 77, d]
    o   = MLP(w) + w                               [B, 77, d]
    c'  = η · fc(o) + (1 − η) · V                  [B, 77, d]   fc's weight starts at zero
    W0·h_LLM                                       [B, d]       the LLM state projected for distillation
                                                                (llm=multi: one W0 per teacher)

On SDXL (``pooled_dim`` set, ``features.pooled`` [B, P] the second CLIP encoder's pooled output):
    pooled' = pooled + η · g(mean_tokens(o))     [B, P]       g's weight and bias start at zero  (pooled="adapted")
    pooled' = pooled                                                                      (pooled="clip")
SDXL adds the pooled vector to the timestep embedding of every ResNet block, so with pooled="clip" the
simple prompt's global meaning would keep steering every block while only the tokens learn the narrative;
"adapted" starts exactly at CLIP's (g is zero) and the prompt loss aligns it to the complex prompt's pooled
output, as it aligns the tokens: the default.

``batch_first=False`` reproduces the released code, whose encoder attends over the batch axis.
``train_llm_projection=False`` reproduces its frozen random W0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sur_lightning.models.connectors import ConnectorFiles, ConnectorOutput, TextFeatures
from sur_lightning.models.weights import check_finite


class SURAdapter(ConnectorFiles, nn.Module):
    """forward(TextFeatures(clip [B,77,d], llm [B,D] pooled, pooled [B,P] on SDXL), timesteps ignored) -> ConnectorOutput:
    conditioning [B,77,d], eta [B], internals {"encoder": [B,77,d], "llm_projected": [B,d] (when llm given)},
    pooled [B,P] on SDXL (see the module docstring; ``adapts_pooled`` says whether the prompt loss covers it).

    ``llm_dim`` a dict {teacher: width} (``llm=multi``): one W0 per teacher, ``features.llm`` and
    ``llm_projected`` are then dicts {teacher: [B, ·]}.
    """

    # Distils one pooled LLM state in training and never reads the LLM at inference; the output does not
    # depend on the diffusion timestep, so generation computes it once per prompt batch.
    reads_token_states = False
    timestep_aware = False

    def __init__(
        self,
        dim: int,
        llm_dim: int | dict[str, int],
        eta: nn.Module,
        num_layers: int = 2,
        num_heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
        batch_first: bool = True,
        zero_init_output: bool = True,
        train_llm_projection: bool = True,
        pooled_dim: int | None = None,
        pooled: str = "adapted",
    ) -> None:
        super().__init__()
        if pooled not in ("adapted", "clip"):
            raise ValueError(f"connector.pooled must be 'adapted' or 'clip' for SUR, got {pooled!r}")
        if dim % num_heads:
            raise ValueError(f"connector.num_heads={num_heads} must divide the CLIP width {dim}")
        self.dim = dim
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.fc = nn.Linear(dim, dim)
        if zero_init_output:
            nn.init.zeros_(self.fc.weight)
        if hasattr(eta, "build") and getattr(eta, "mlp", None) is None:
            eta.build(dim)
        self.eta = eta
        if isinstance(llm_dim, Mapping):  # a dict, or an OmegaConf node when Hydra passes it on
            llm_dim = {str(name): int(width) for name, width in llm_dim.items()}
            self.llm_projection = nn.ModuleDict({name: nn.Linear(width, dim) for name, width in llm_dim.items()})
        else:
            self.llm_projection = nn.Linear(llm_dim, dim)
        self.llm_projection.requires_grad_(train_llm_projection)
        # SDXL only: a correction to CLIP's pooled embedding, zero at the start.
        self.pooled_head = None
        if pooled_dim is not None and pooled == "adapted":
            self.pooled_head = nn.Linear(dim, pooled_dim)
            nn.init.zeros_(self.pooled_head.weight)
            nn.init.zeros_(self.pooled_head.bias)
        self.config = {
            "_target_": f"{__name__}.SURAdapter",
            "dim": dim,
            "llm_dim": llm_dim,
            "eta": eta.config,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "ff_dim": ff_dim,
            "dropout": dropout,
            "batch_first": batch_first,
            "zero_init_output": zero_init_output,
            "train_llm_projection": train_llm_projection,
            "pooled_dim": pooled_dim,
            "pooled": pooled,
        }

    @property
    def adapts_pooled(self) -> bool:
        return self.pooled_head is not None

    def forward(self, features: TextFeatures, timesteps: torch.Tensor | None = None) -> ConnectorOutput:
        clip = features.clip
        encoded = self.encoder(clip)
        scores = self.query(encoded) @ self.key(clip).transpose(-2, -1) / math.sqrt(self.dim)
        weighted = scores.softmax(dim=-1) @ clip + clip
        out = self.mlp(weighted) + weighted
        eta = self.eta(clip.mean(dim=1))
        conditioning = eta[:, None, None] * self.fc(out) + (1.0 - eta[:, None, None]) * clip
        pooled = features.pooled
        if pooled is not None and self.pooled_head is not None:
            pooled = pooled + eta[:, None] * self.pooled_head(out.mean(dim=1))
        internals = {"encoder": encoded}
        if isinstance(features.llm, dict):
            internals["llm_projected"] = {name: self.llm_projection[name](h) for name, h in features.llm.items()}
        elif features.llm is not None:
            internals["llm_projected"] = self.llm_projection(features.llm)
        return ConnectorOutput(conditioning=conditioning, eta=eta, internals=internals, pooled=pooled)


# The authors' adapter_checkpoint*.pt names -> ours. Our encoder is the same nn.TransformerEncoder, so
# everything after the prefix is identical.
OFFICIAL_KEY_PREFIXES = (
    ("transformer_encoder.", "encoder."),
    ("attention.query_layer.", "query."),
    ("attention.key_layer.", "key."),
    ("attention.output_layer.0.", "mlp.0."),
    ("attention.output_layer.2.", "mlp.2."),
    ("fc.", "fc."),
)
# In the released module these exist but never touch the output: ``encoder_layer`` is the template layer
# handed to nn.TransformerEncoder (which trains deep copies of it), and the value of the attention is V
# itself, so ``value_layer`` is unused.
OFFICIAL_UNUSED_PREFIXES = ("encoder_layer.", "attention.value_layer.")
# Not in the released checkpoint: W0 lives in the training script (a frozen random matrix) and η is fixed.
NOT_IN_OFFICIAL = ("llm_projection.",)


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_checkpoint*.pt`` (``torch.load(weights_only=True)``: no code runs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"official SUR checkpoint not found: {path}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (expected the authors' adapter_checkpoint*.pt)")
    check_finite(state.items(), str(path))
    return state


def load_official_state_dict(
    adapter: SURAdapter, state_dict: dict[str, torch.Tensor] | str | Path, source: str | None = None
) -> SURAdapter:
    """Load the authors' weights (a state dict, or the path of an ``adapter_checkpoint*.pt``) into ``adapter``.

    Keys are renamed by ``OFFICIAL_KEY_PREFIXES``; the unused ``encoder_layer.*`` and
    ``attention.value_layer.*`` are skipped (and reported); anything else unknown, missing or of another
    shape is an error. The released checkpoint has no W0 and no η parameters: build ``adapter`` with
    ``eta=FixedEta(0.1)`` (what the authors trained) and ``batch_first=False`` to reproduce their module.
    """
    if not isinstance(state_dict, dict):
        source = str(state_dict)
        state_dict = read_official_state_dict(state_dict)
    source = source or "the state dict"
    mapped, unused, unknown = {}, [], []
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_UNUSED_PREFIXES):
            unused.append(key)
            continue
        prefix = next((p for p in OFFICIAL_KEY_PREFIXES if key.startswith(p[0])), None)
        if prefix is None:
            unknown.append(key)
            continue
        mapped[prefix[1] + key[len(prefix[0]) :]] = value
    expected = {k: v for k, v in adapter.state_dict().items() if not k.startswith(NOT_IN_OFFICIAL)}
    missing = sorted(set(expected) - set(mapped))
    unknown += sorted(k for k in mapped if k not in expected)
    if unknown or missing:
        raise KeyError(
            f"{source} does not match the official SUR-adapter: unknown keys {unknown[:8]}, missing {missing[:8]}"
            + (
                " (η has parameters: build the adapter with eta=fixed)"
                if any(k.startswith("eta.") for k in missing)
                else ""
            )
        )
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if v.shape != expected[k].shape
    ]
    if shapes:
        raise ValueError(f"{source}: shapes differ from the adapter built here: {shapes[:4]}")
    adapter.load_state_dict(mapped, strict=False)
    if unused:
        print(f"{source}: skipped {len(unused)} unused official tensors (encoder_layer.*, attention.value_layer.*)")
    return adapter


def official_adapter(path: str | Path, eta: float = 0.1, num_heads: int = 8, llm_dim: int = 5120) -> SURAdapter:
    """The authors' released module rebuilt around their checkpoint: widths and depth read from the tensors
    (the head count is not stored: 8, as released),
    ``batch_first=False``, fixed η (0.1), frozen W0 (not in the file; never used at inference). Eval mode."""
    from sur_lightning.models.eta import FixedEta

    state = read_official_state_dict(path)
    try:
        dim = state["fc.weight"].shape[0]
        ff_dim = state["transformer_encoder.layers.0.linear1.weight"].shape[0]
    except KeyError as err:
        raise KeyError(f"{path} is not an official SUR-adapter checkpoint: no {err.args[0]}") from None
    num_layers = len({k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")})
    adapter = SURAdapter(
        dim=dim,
        llm_dim=llm_dim,
        eta=FixedEta(eta),
        num_layers=num_layers,
        num_heads=num_heads,
        ff_dim=ff_dim,
        batch_first=False,
        train_llm_projection=False,
    )
    return load_official_state_dict(adapter, state, source=str(path)).eval()
