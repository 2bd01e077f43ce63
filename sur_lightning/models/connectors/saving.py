"""Saving and loading connectors, in two formats.

- A **connector folder** (``save_pretrained``, ``ConnectorFiles``): ``config.json`` (``kind``, the
  Hydra-instantiable constructor config under ``connector``, ``trained_with``) and ``model.safetensors``.
- An **adapter file** (``save_connector``, the older format): ``adapter.safetensors`` with the constructor config
  (and ``trained_with``) in its header, and the config again beside it as ``adapter.json``.

``load_connector`` reads either, checks widths first (``check_widths``), and maps the ``_target_``s of adapters
written before the layout move (``names.current_targets``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sur_lightning.models.connectors.names import connector_name, current_targets
from sur_lightning.models.connectors.records import run_config_record
from sur_lightning.models.weights import read_safetensors, safetensors_metadata


def save_connector(connector: torch.nn.Module, path: str | Path, trained_with: dict | None = None) -> tuple[Path, Path]:
    """Write the connector's weights to ``path`` (.safetensors) and its constructor config beside it (.json).

    The config is Hydra-instantiable (``_target_`` plus arguments) and is also stored in the
    safetensors header, so either file alone is enough to rebuild the connector. ``trained_with``
    (``training_record``, resolved: no ``${...}`` left) goes into the header too, so the file alone also says
    which backbone and LLM to load it with, as a folder's config.json does.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(connector.config)}
    if trained_with is not None:
        metadata["trained_with"] = json.dumps(trained_with)
    state = {k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    config_path = path.with_suffix(".json")
    config_path.write_text(json.dumps(connector.config, indent=2))
    return path, config_path


def connector_config(path: str | Path) -> dict:
    """The constructor config of a connector: a folder's ``config.json`` (``save_pretrained``), or for an
    adapter file written by ``save_connector`` its .json, else its safetensors header."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.is_dir():
        return read_folder_config(path)["connector"]
    config_path = path.with_suffix(".json")
    if config_path.exists():
        try:
            return json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} (the config of {path.name}) is not valid JSON: {error}") from error
    metadata = safetensors_metadata(path)
    if "config" not in metadata:
        raise ValueError(f"{path} has no connector config: expected {config_path} or a 'config' header entry")
    return json.loads(metadata["config"])


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ConnectorMismatchError(ValueError):
    """A connector loaded for a pipeline or LLM of another width; the message names both widths."""


class ConnectorFiles:
    """``save_pretrained`` / ``from_pretrained`` on every connector class, as diffusers' models have them::

    connector.save_pretrained("my-connector", trained_with=record)   # config.json + model.safetensors
    SURAdapter.from_pretrained("my-connector", dim=768)               # checks widths, loads strictly
    """

    def save_pretrained(self, folder: str | Path, trained_with: dict | None = None) -> Path:
        return save_pretrained(self, folder, trained_with)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dim: int | None = None, llm_dim: int | dict | None = None):
        connector = load_connector(folder, dim=dim, llm_dim=llm_dim)
        if not isinstance(connector, cls):
            raise TypeError(f"{folder} holds a {type(connector).__name__}, not a {cls.__name__}")
        return connector


def save_pretrained(connector: torch.nn.Module, folder: str | Path, trained_with: dict | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``; return the folder.

    ``config.json``: ``{"kind": "sur"|"ella", "connector": <the Hydra-instantiable constructor config>,
    "trained_with": <what it was trained for (``training_record``) or null>}``. The constructor config is a node
    of its own, not merged with ``kind``/``trained_with``, so ``hydra.utils.instantiate(config["connector"])``
    builds the connector as it is.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "kind": connector_name(connector.config.get("_target_")),
        "connector": connector.config,
        "trained_with": trained_with,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"config": json.dumps(connector.config)})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def read_folder_config(folder: str | Path) -> dict:
    """A connector folder's ``config.json``, checked: it must hold a ``connector`` node with a ``_target_``."""
    config_path = Path(folder) / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(
            f"{folder} is not a connector folder: it has no {CONFIG_NAME} (save_pretrained writes one)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config.get("connector"), dict) or "_target_" not in config["connector"]:
        raise ValueError(f"{config_path}: key 'connector' must be the connector's config with a '_target_'")
    return config


def connector_record(path: str | Path) -> dict | None:
    """What the connector at ``path`` was trained for (``training_record``'s layout): a folder's ``trained_with``,
    or an adapter file's ``trained_with`` header entry (``save_connector``); else, for a folder or file without
    one, its run's ``.hydra/config.yaml``; None if none of them says."""
    path = Path(path)
    if path.is_dir():
        recorded = read_folder_config(path).get("trained_with")
    else:
        header = safetensors_metadata(path).get("trained_with")
        try:
            recorded = json.loads(header) if header else None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: header entry 'trained_with' is not valid JSON: {error}") from error
    # A record made before a move names the old ``_target_``s (a tiny model's builder): renamed to where they are now.
    return current_targets(recorded or run_config_record(path))


def check_widths(
    config: dict,
    where: str,
    dim: int | None = None,
    llm_dim=None,
    dim_source: str = "the UNet",
    llm_source: str = "the LLM",
) -> None:
    """Raise ``ConnectorMismatchError`` naming both widths when ``dim`` (cross-attention) or ``llm_dim`` differ
    from the connector config's (``None``: not checked)."""
    trained_dim, trained_llm = config.get("dim"), config.get("llm_dim")
    wrong_dim = dim is not None and trained_dim is not None and int(dim) != int(trained_dim)
    wrong_llm = llm_dim is not None and trained_llm is not None and llm_dim != trained_llm
    if not (wrong_dim or wrong_llm):
        return
    have = []
    if wrong_dim:
        have.append(f"{dim_source} cross-attends to width {dim}")
    if wrong_llm:
        have.append(f"{llm_source} has width {llm_dim}")
    raise ConnectorMismatchError(
        f"connector {where} was trained for cross-attention width {trained_dim} and LLM width {trained_llm}; "
        f"{' and '.join(have)}. Use the backbone and LLM it was trained with (its config.json 'trained_with')"
    )


def load_connector(path: str | Path, dim: int | None = None, llm_dim: int | dict | None = None) -> torch.nn.Module:
    """Rebuild a connector and load its weights strictly (eval mode): a folder written by ``save_pretrained``, or an
    adapter file written by ``save_connector`` (``adapter.safetensors`` + .json or header; one written before
    the layout move, ``sur_lightning.connectors.sur.SURAdapter``, loads too).

    ``dim`` / ``llm_dim``: the cross-attention width of the UNet and the LLM's hidden width it is meant for;
    when given and different from the connector's, ``ConnectorMismatchError`` names both before anything loads.
    The returned module carries ``trained_with`` (``connector_record``, or None).
    """
    from hydra.utils import instantiate

    path = Path(path)
    config = current_targets(connector_config(path))
    check_widths(config, str(path), dim, llm_dim)
    connector = instantiate(config)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise FileNotFoundError(f"connector folder {path} has no {WEIGHTS_NAME}")
    # A malformed file or NaN/inf weights stop here, naming the file and the tensor (not as black images later).
    connector.load_state_dict(read_safetensors(weights), strict=True)
    connector.trained_with = connector_record(path)
    return connector.eval()
