"""Connectors: trainable modules between frozen text encoders and the frozen UNet.

Every connector has the same call, so the training step and generation treat them alike::

    out = connector(features, timesteps)   # -> ConnectorOutput
    unet(noisy_latents, timesteps, encoder_hidden_states=out.conditioning)

SUR ignores ``timesteps``; ELLA depends on them. ``save_pretrained`` writes a connector folder (``config.json``:
its kind, constructor config and what it was trained for, ``trained_with``; ``model.safetensors``);
``save_connector`` writes the older single file (``adapter.safetensors`` + ``.json``). ``load_connector`` reads
either, and adapters written before the layout move load through ``MOVED_MODULES``.
May import: ``models`` only (``eta``, ``weights``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sur_lightning.models.weights import read_safetensors, safetensors_metadata


@dataclass
class TextFeatures:
    """Frozen text features of one batch of prompts.

    clip:        [B, 77, d]  CLIP text-encoder states of the (simple) prompt.
    llm:         [B, D] pooled LLM state, or [B, T, D] token states (ELLA), or {teacher: [B, D_teacher]}
                 (``llm=multi``), or None.
    llm_mask:    [B, T] bool, True on real tokens (None when ``llm`` is pooled).
    pooled:      [B, P] SDXL's pooled text embedding of the prompt (the second CLIP encoder's ``text_embeds``),
                 None for SD1.x/2.x backbones.
    prompts:     the B texts these are features of, where generation knows them (so an error can name the
                 prompt), else None.
    """

    clip: torch.Tensor | None = None
    llm: torch.Tensor | None = None
    llm_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    prompts: list[str] | None = None


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


# ------------------------------------------------------------------------------------ connector folders

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
    config = {"kind": connector_name(connector.config.get("_target_")), "connector": connector.config, "trained_with": trained_with}
    state = {k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"config": json.dumps(connector.config)})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def read_folder_config(folder: str | Path) -> dict:
    """A connector folder's ``config.json``, checked: it must hold a ``connector`` node with a ``_target_``."""
    config_path = Path(folder) / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} is not a connector folder: it has no {CONFIG_NAME} (save_pretrained writes one)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config.get("connector"), dict) or "_target_" not in config["connector"]:
        raise ValueError(f"{config_path}: key 'connector' must be the connector's config with a '_target_'")
    return config


def pretrained_id(node) -> str | None:
    """A readable name for a component's ``pretrained``: a hub id or folder as given, or for a builder node
    (the tiny and toy models) ``build_tiny_stable_diffusion(root=..., width=32, ...)``."""
    if node is None or isinstance(node, str):
        return node
    if isinstance(node, dict) and "_target_" in node:
        arguments = ", ".join(f"{k}={v}" for k, v in node.items() if not k.startswith("_"))
        return f"{str(node['_target_']).rpartition('.')[2]}({arguments})"
    return str(node)


def training_record(
    backbone: dict | None,
    llm: dict | None,
    cross_attention_dim: int | None = None,
    llm_hidden_size: int | dict | None = None,
    cache_fingerprint: dict | None = None,
) -> dict:
    """What a connector was trained for, as ``save_pretrained`` records it under ``trained_with``.

    ``backbone`` / ``llm``: the run's resolved config nodes (plain dicts; ``llm`` None when the run had none).
    Each is kept whole under ``config`` (so ``generate``/``evaluate`` can instantiate it again, builders of
    the tiny models included) beside a readable ``id``; the LLM also gets its ``layer`` and ``pooling``.
    ``cache_fingerprint``: the feature-cache stores' fingerprint hashes ({"clip": ..., "llm": ...}), or None.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        # The installed distribution's version; importing the package root here would close a circle through config.
        package_version = version("sur_lightning")
    except PackageNotFoundError:  # run from a checkout that was never installed
        package_version = None
    record = {
        "backbone": None,
        "llm": None,
        "cache_fingerprint": cache_fingerprint,
        "sur_lightning_version": package_version,
    }
    if backbone is not None:
        record["backbone"] = {
            "id": pretrained_id(backbone.get("pretrained")),
            "cross_attention_dim": cross_attention_dim,
            "config": backbone,
        }
    if llm is not None:
        record["llm"] = {
            "id": pretrained_id(llm.get("pretrained")),
            "layer": llm.get("layer"),
            "pooling": llm.get("pooling"),
            "hidden_size": llm_hidden_size,
            "config": llm,
        }
    return record


def resolved_run_node(config: dict, group: str, run_dir: Path):
    """``config[group]`` of a run's saved ``.hydra/config.yaml`` with its ``${...}`` resolved against the whole run
    config (``${paths.cache_dir}`` -> the run's cache folder), so it can be built outside any Hydra config
    (``attach``). Hydra's ``${hydra:...}`` resolver exists only inside a Hydra run; the run saved those values in
    ``.hydra/hydra.yaml``, so they are read from there. The node as saved (unresolved) when that fails: generate
    and evaluate still resolve it inside their own config."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    hydra_file = run_dir / "hydra.yaml"
    try:
        hydra_node = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}) if hydra_file.exists() else {}
        # `${hydra:runtime.cwd}` -> `${hydra.runtime.cwd}`: a plain interpolation into the saved values.
        text = yaml.safe_dump(config).replace("${hydra:", "${hydra.")
        run = OmegaConf.create(yaml.safe_load(text))
        run.hydra = {key: hydra_node.get(key, {}) for key in ("runtime", "job")}
        return OmegaConf.to_container(run[group], resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, AttributeError):
        return config[group]


def run_config_record(path: str | Path) -> dict | None:
    """For an adapter file or folder inside a training run, ``training_record`` of the backbone and LLM nodes of the
    run's ``.hydra/config.yaml``, resolved (``resolved_run_node``); None without such a file or without a
    ``backbone`` in it. Adapter files written before their header held ``trained_with`` are read this way."""
    import yaml

    run_config = Path(path).parent / ".hydra" / "config.yaml"
    if not run_config.exists():
        return None
    try:
        config = yaml.safe_load(run_config.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{run_config} (the run config of {path}) is not valid YAML: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("backbone"), dict):
        return None
    backbone = resolved_run_node(config, "backbone", run_config.parent)
    llm = resolved_run_node(config, "llm", run_config.parent) if isinstance(config.get("llm"), dict) else None
    return training_record(backbone, llm)


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


def check_widths(config: dict, where: str, dim: int | None = None, llm_dim=None, dim_source: str = "the UNet",
                 llm_source: str = "the LLM") -> None:
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
