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


# The tiny and random models' builders, moved since from the modules of the models they build into one module of
# their own (issue 33): old ``_target_`` -> new. Runs recorded before the move name the old ones.
MOVED_BUILDERS = {
    f"sur_lightning.models.{module}.{name}": f"sur_lightning.models.random_models.{name}"
    for module, names in {
        "backbone": ("build_tiny_stable_diffusion", "build_random_stable_diffusion"),
        "sdxl": ("build_tiny_sdxl", "build_random_sdxl"),
        "llm": ("build_tiny_causal_lm", "build_tiny_t5_encoder"),
        "sentence": ("build_tiny_bert",),
    }.items()
    for name in names
}


def current_targets(config: dict) -> dict:
    """``config`` with every ``_target_`` renamed to where it is now: under a pre-move module path, then a moved
    builder."""
    return _map_targets(_map_targets(config, MOVED_MODULES), MOVED_BUILDERS)


def pre_layout_targets(config: dict) -> dict:
    """``config`` with every ``_target_`` named as before the layout move (what fingerprints hash): a moved builder
    by its module before issue 33, then that module by its path before issue 20."""
    builders = _map_targets(config, {new: old for old, new in MOVED_BUILDERS.items()})
    return _map_targets(builders, {new: old for old, new in MOVED_MODULES.items()})
