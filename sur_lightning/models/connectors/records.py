"""What a connector was trained for (``trained_with``): the record ``save_pretrained`` and ``save_connector`` write,
and, for an adapter file or folder written without one, the same record read from its training run's
``.hydra/config.yaml``.

The run-folder reading stays in ``models`` because ``load_connector`` (``saving.connector_record``) gives every
loaded connector its ``trained_with`` from it when its files hold none (``attach`` builds an ELLA connector's
LLM from that, outside any Hydra run); ``config.py`` sits above ``models`` and cannot be imported from here.
"""

from __future__ import annotations

from pathlib import Path


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
