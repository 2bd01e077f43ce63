"""Where a connector puts a prompt: CLIP(simple), connector(simple) and CLIP(complex) of a suite in 2-D.

    python -m sur_lightning.embedding_map adapters=[outputs/demo/runs/<time>/adapter.safetensors]
    python -m sur_lightning.embedding_map llm=smollm2_tokens adapters={ella:<an ELLA adapter>} timestep=900
    python -m sur_lightning.embedding_map adapters=[<a>,<b>] toyworld_suite.per_split=16 projections=[pca]

For every prompt of the suite (default: the toy world's three splits) it computes the UNet conditioning
of three kinds of point: ``base`` (CLIP of the simple prompt, the base model's conditioning), each
adapter's output on the simple prompt (its ``ConnectorConditioning``, as ``generate`` renders it), and
``base+complex`` (CLIP of the prompt's complex prompt, the target a connector is trained toward).
All points are mapped together with PCA and with t-SNE (scikit-learn), so every panel shares one map.

Writes, under the run folder: ``pca.png`` and ``tsne.png`` (one panel per method, the method's points
coloured by the prompt's target colour and marked by split, every other point in grey), and
``embedding_map.json`` (the settings, one point per (prompt, method) with its 2-D coordinates and its
distance to the same prompt's CLIP(complex), and each method's mean distance per split). Prints each
method's mean distance to CLIP(complex) per split.

How the points and distances are computed: ``sur_lightning/evaluation/embeddings.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sur_lightning.config import CONFIG_DIR
from sur_lightning.data.prompt_suites import Prompt, load_prompt_list
from sur_lightning.evaluation.embeddings import (
    COMPLEX,
    PROJECTIONS,
    distance_table,
    distances_to,
    mean_by_split,
    plot_map,
    project,
    represent,
    suite_states,
    tsne_perplexity,
)
from sur_lightning.generation.columns import Column, build_columns, complex_prompt_column
from sur_lightning.runtime import pick_device


def load_columns(cfg, backbone, prompts: Sequence[Prompt]) -> list[Column]:
    """base, each adapter (as ``generate`` loads it: the LLM only for connectors that read it), base+complex."""
    from hydra.utils import instantiate

    missing = [p.id for p in prompts if not p.complex]
    if missing:
        raise ValueError(
            f"prompts: {len(missing)} prompt(s) have no complex prompt (e.g. {missing[:3]}); the map needs each "
            "prompt's CLIP(complex): use the toy world's suite or a .jsonl with a 'complex' field"
        )
    llm_cfg = cfg.get("llm")
    # As generate does: only connectors that read token states (ELLA) load the LLM, with its token states.
    token_llm = (
        (lambda: instantiate(llm_cfg, **({"pooling": "none"} if "pooling" in llm_cfg else {}))) if llm_cfg else None
    )
    columns = build_columns(backbone, adapters=cfg.adapters, llm=token_llm)
    columns.append(complex_prompt_column(backbone, prompts))
    names = [c.name for c in columns]
    if len(set(names)) < len(names):
        raise ValueError(f"adapters: the names {names} must differ (and not be 'base' or '{COMPLEX}')")
    return columns


def embedding_map(cfg) -> dict:
    """Compute every method's conditioning of ``cfg.prompts``, its distances to CLIP(complex) and the 2-D maps;
    write the PNGs and ``embedding_map.json`` into ``cfg.paths.output_dir``. Returns the JSON's content."""
    from hydra.utils import instantiate

    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # a malformed value fails first
    torch.manual_seed(cfg.seed)
    unknown = [m for m in cfg.projections if m not in PROJECTIONS]
    if unknown or not cfg.projections:
        raise ValueError(f"projections: choose one or more of {list(PROJECTIONS)}, got {list(cfg.projections)}")
    out_dir = Path(cfg.paths.output_dir)
    backbone = instantiate(cfg.backbone).to(pick_device(cfg.device))
    timesteps = backbone.noise_scheduler.config.num_train_timesteps
    if not 0 <= int(cfg.timestep) < timesteps:
        raise ValueError(f"timestep must be in [0, {timesteps}), got {cfg.timestep}")
    prompts = load_prompt_list(cfg.prompts, cfg.get("num_prompts"))
    columns = load_columns(cfg, backbone, prompts)

    states = {c.name: suite_states(c, prompts, int(cfg.timestep), int(cfg.batch_size)) for c in columns}
    vectors = represent(states, cfg.tokens)
    distances = distances_to(vectors)
    means = mean_by_split(distances, prompts)
    methods = list(vectors)
    stacked = np.concatenate([vectors[m] for m in methods])
    perplexity = tsne_perplexity(len(stacked)) if cfg.tsne_perplexity is None else float(cfg.tsne_perplexity)
    coords = {p: project(stacked, p, int(cfg.random_state), perplexity) for p in cfg.projections}

    kinds = {"base": "CLIP(simple)", COMPLEX: "CLIP(complex)"}
    titles = {
        m: f"{m}: {kinds.get(m, 'connector(simple)')}"
        + (f"\nmean distance {means[m]['all']:.3f}" if m in means else "")
        for m in methods
    }
    files = {
        p: str(
            plot_map(
                out_dir / f"{p}.png",
                coords[p],
                methods,
                prompts,
                titles,
                f"{p.upper() if p == 'pca' else 't-SNE'} of the conditioning (tokens={cfg.tokens})",
            )
        )
        for p in cfg.projections
    }
    n = len(prompts)
    points = [
        {
            "method": method,
            "prompt_id": prompt.id,
            "prompt": prompt.prompt,
            "complex": prompt.complex,
            "split": prompt.category,
            "color": prompt.target[1] if prompt.target else None,
            **{p: [float(x) for x in coords[p][k * n + i]] for p in cfg.projections},
            "distance_to_complex": float(distances[method][i]) if method in distances else 0.0,
        }
        for k, method in enumerate(methods)
        for i, prompt in enumerate(prompts)
    ]
    report = {
        "settings": {
            **{k: resolved.get(k) for k in ("backbone", "llm", "prompts", "num_prompts", "adapters", "timestep")},
            "random_state": cfg.random_state,
            "tokens": cfg.tokens,
            "tsne_perplexity": perplexity if "tsne" in cfg.projections else None,
        },
        "representation": "mean over tokens [d]" if cfg.tokens == "mean" else "tokens flattened [T*d]",
        "distance": "euclidean between representation vectors, to the same prompt's CLIP(complex)",
        "methods": {c.name: {**c.source, "tokens": int(states[c.name].shape[1])} for c in columns},
        "mean_distance": means,
        "points": points,
        "files": files,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "embedding_map.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nMean Euclidean distance to CLIP(complex), tokens={cfg.tokens}, per split (prompts):")
    print(distance_table(means, prompts))
    print(f"\nmaps: {', '.join(files.values())}\njson: {json_path}")
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="embedding_map")
def main(cfg: DictConfig) -> None:
    embedding_map(cfg)


if __name__ == "__main__":
    main()
