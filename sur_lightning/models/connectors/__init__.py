"""Connectors: trainable modules between frozen text encoders and the frozen UNet.

Every connector has the same call, so the training step and generation treat them alike::

    out = connector(features, timesteps)   # -> ConnectorOutput
    unet(noisy_latents, timesteps, encoder_hidden_states=out.conditioning)

SUR ignores ``timesteps``; ELLA depends on them. ``save_pretrained`` writes a connector folder (``config.json``:
its kind, constructor config and what it was trained for, ``trained_with``; ``model.safetensors``);
``save_connector`` writes the older single file (``adapter.safetensors`` + ``.json``). ``load_connector`` reads
either, and adapters written before the layout move load through ``MOVED_MODULES``.
May import: ``models`` only (``eta``, ``weights``).

The files: ``features.py`` (``TextFeatures``, ``ConnectorOutput``), ``saving.py`` (both save formats and
``load_connector``), ``records.py`` (``trained_with``), ``names.py`` (connector names, pre-move module paths),
``sur.py`` and ``ella.py`` (the connectors). This file re-exports them.
"""

from __future__ import annotations

from sur_lightning.models.connectors.features import ConnectorOutput, TextFeatures
from sur_lightning.models.connectors.names import (
    CONNECTOR_NAMES,
    MOVED_BUILDERS,
    MOVED_MODULES,
    connector_name,
    current_targets,
    pre_layout_targets,
    reads_token_states,
)
from sur_lightning.models.connectors.records import (
    pretrained_id,
    resolved_run_node,
    run_config_record,
    training_record,
)
from sur_lightning.models.connectors.saving import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ConnectorFiles,
    ConnectorMismatchError,
    check_widths,
    connector_config,
    connector_record,
    load_connector,
    read_folder_config,
    save_connector,
    save_pretrained,
)

__all__ = [
    "CONFIG_NAME",
    "CONNECTOR_NAMES",
    "MOVED_BUILDERS",
    "MOVED_MODULES",
    "WEIGHTS_NAME",
    "ConnectorFiles",
    "ConnectorMismatchError",
    "ConnectorOutput",
    "TextFeatures",
    "check_widths",
    "connector_config",
    "connector_name",
    "connector_record",
    "current_targets",
    "load_connector",
    "pre_layout_targets",
    "pretrained_id",
    "read_folder_config",
    "reads_token_states",
    "resolved_run_node",
    "run_config_record",
    "save_connector",
    "save_pretrained",
    "training_record",
]
