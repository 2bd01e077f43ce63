"""Connectors: trainable modules between frozen text encoders and the frozen UNet.

Every connector has the same call, so the training step and generation treat them alike::

    out = connector(features, timesteps)   # -> ConnectorOutput
    unet(noisy_latents, timesteps, encoder_hidden_states=out.conditioning)

SUR ignores ``timesteps``; ELLA depends on them. ``save_connector`` / ``load_connector`` round-trip a connector
with its constructor config; adapters written before the layout move load through ``MOVED_MODULES``.
May import: ``models`` only (``eta``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TextFeatures:
    """Frozen text features of one batch of prompts.

    clip:        [B, 77, d]  CLIP text-encoder states of the (simple) prompt.
    llm:         [B, D] pooled LLM state, or [B, T, D] token states (ELLA), or {teacher: [B, D_teacher]}
                 (``llm=multi``), or None.
    llm_mask:    [B, T] bool, True on real tokens (None when ``llm`` is pooled).
    pooled:      [B, P] SDXL's pooled text embedding of the prompt (the second CLIP encoder's ``text_embeds``),
                 None for SD1.x/2.x backbones.
    """

    clip: torch.Tensor | None = None
    llm: torch.Tensor | None = None
    llm_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


@dataclass
class ConnectorOutput:
    """What a connector returns.

    conditioning: [B, N, d] the UNet's ``encoder_hidden_states`` (SUR: N=77, ELLA: N=64).
    eta:          [B] the mixing weight used per prompt (SUR), else None.
    internals:    named intermediate tensors the auxiliary losses read
                  (SUR: ``encoder`` [B,77,d] transformer-encoder output, ``llm_projected`` [B,d]).
    pooled:       [B, P] the SDXL UNet's ``added_cond_kwargs["text_embeds"]`` (None for SD1.x/2.x).
    """

    conditioning: torch.Tensor
    pooled: torch.Tensor | None = None
    eta: torch.Tensor | None = None
    internals: dict[str, torch.Tensor] = field(default_factory=dict)



def save_connector(connector: torch.nn.Module, path: str | Path) -> tuple[Path, Path]:
    """Write the connector's weights to ``path`` (.safetensors) and its constructor config beside it (.json).

    The config is Hydra-instantiable (``_target_`` plus arguments) and is also stored in the
    safetensors header, so either file alone is enough to rebuild the connector.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps(connector.config)
    state = {k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}
    save_file(state, str(path), metadata={"config": config})
    config_path = path.with_suffix(".json")
    config_path.write_text(json.dumps(connector.config, indent=2))
    return path, config_path


def connector_config(path: str | Path) -> dict:
    """The constructor config of an adapter written by ``save_connector``: from its .json, else its header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file not found: {path}")
    config_path = path.with_suffix(".json")
    if config_path.exists():
        return json.loads(config_path.read_text())
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} has no connector config: expected {config_path} or a 'config' header entry")
    return json.loads(metadata["config"])


# What a reader calls each connector class, for labels.
CONNECTOR_NAMES = {"SURAdapter": "sur", "TimestepAwareSemanticConnector": "ella"}


def connector_name(target: str | None) -> str:
    """``sur_lightning.models.connectors.sur.SURAdapter`` -> ``sur``; ``...ella.TimestepAwareSemanticConnector`` -> ``ella``."""
    cls = str(target or "").rpartition(".")[2]
    return CONNECTOR_NAMES.get(cls, cls.lower() or "none")


def reads_token_states(target: str | None) -> bool:
    """Whether the connector class named by ``target`` reads LLM token states [B, T, D] (the ``reads_token_states``
    class attribute: ELLA) rather than one pooled state [B, D] (SUR)."""
    from hydra.utils import get_class

    if not target:
        return False
    return bool(getattr(get_class(str(target)), "reads_token_states", False))


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


# Where modules lived before the layout move (issue 20) -> where they live now. Adapters written before it name
# the old ``_target_``s (``current_targets`` maps them on load); the feature cache's fingerprints keep naming the
# old ones (``pre_layout_targets``), so the caches made before the move stay valid.
MOVED_MODULES = {
    "sur_lightning.connectors.": "sur_lightning.models.connectors.",
    "sur_lightning.eta.": "sur_lightning.models.eta.",
    "sur_lightning.backbone.": "sur_lightning.models.backbone.",
    "sur_lightning.llm.": "sur_lightning.models.llm.",
    "sur_lightning.sentence.": "sur_lightning.models.sentence.",
}


def _map_targets(config, moves: dict[str, str]):
    if isinstance(config, dict):
        out = {k: _map_targets(v, moves) for k, v in config.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            old = next((o for o in moves if target.startswith(o)), None)
            if old is not None:
                out["_target_"] = moves[old] + target[len(old) :]
        return out
    if isinstance(config, list):
        return [_map_targets(v, moves) for v in config]
    return config


def current_targets(config: dict) -> dict:
    """``config`` with every ``_target_`` under a pre-move module path renamed to where that module is now."""
    return _map_targets(config, MOVED_MODULES)


def pre_layout_targets(config: dict) -> dict:
    """``config`` with every ``_target_`` named as before the layout move (what fingerprints hash)."""
    return _map_targets(config, {new: old for old, new in MOVED_MODULES.items()})


def load_connector(path: str | Path) -> torch.nn.Module:
    """Rebuild a connector written by ``save_connector`` and load its weights strictly (eval mode).
    An adapter written before the layout move (``sur_lightning.connectors.sur.SURAdapter``) loads too."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    path = Path(path)
    connector = instantiate(current_targets(connector_config(path)))
    connector.load_state_dict(load_file(str(path)), strict=True)
    return connector.eval()
