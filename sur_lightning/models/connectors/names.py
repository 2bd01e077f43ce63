"""What connectors are called: a reader's short name for each class (``sur``, ``ella``), whether a class reads LLM
token states, and the module paths connectors and frozen parts had before the layout move (issue 20)."""

from __future__ import annotations

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
