"""What the embedding map computes: each method's conditioning of a suite, one vector per prompt, distances to
CLIP(complex), and 2-D projections (PCA, t-SNE) drawn one panel per method (``python -m sur_lightning.embedding_map``).

Representation (``tokens``)
---------------------------
A conditioning is [T, d] per prompt, and T differs between methods: CLIP and SUR give CLIP's 77 token
positions, ELLA 64 learned latents that correspond to no CLIP position ("ELLA + CLIP": 141), and ELLA's
depends on the timestep (read at ``timestep``). ``tokens=mean`` (default) averages each conditioning
over its tokens, one d-vector per prompt: it exists for every token count, and it is the value a
cross-attention with uniform weights would read. It cannot see which token carries what.
``tokens=flatten`` keeps the positions ([T·d]; the distance is then √(T·d·MSE), the MSE alignment
against CLIP(complex)), and needs every method to have the same token count (base, SUR, complex).

Distance
--------
Euclidean between representation vectors (in the representation space, never in the 2-D map). Not a
cosine: in the toy CLIP space any two prompts' states have cosine ≈ 0.94, because what all prompts share
dominates them (experiments/toyworld_benchmark/README.md). A Euclidean distance does not change when that shared part is subtracted
(centring every feature over the suite), so it sees only what differs, as a cosine of centred features
would, without a centre to choose; for the same reason the points are not centred here (PCA centres,
t-SNE reads distances). t-SNE keeps neighbourhoods, not distances: read distances from the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.generation.columns import Column

COMPLEX = "base+complex"


TOKENS = ("mean", "flatten")


PROJECTIONS = ("pca", "tsne")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@torch.no_grad()
def suite_states(column: Column, prompts: Sequence[Prompt], timestep: int, batch_size: int = 64) -> torch.Tensor:
    """The column's conditioning of every prompt's simple text at ``timestep``: [N, T, d], float32 on the CPU."""
    texts = [p.prompt for p in prompts]
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    return torch.cat([column.conditioning.conditioning(batch, timestep).float().cpu() for batch in batches])


def represent(states: dict[str, torch.Tensor], tokens: str = "mean") -> dict[str, np.ndarray]:
    """{method: [N, T, d]} -> {method: [N, D]}: the mean over tokens (D = d), or the tokens flattened
    (D = T·d, every method with the same T). See the module docstring for why."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    if tokens == "mean":
        return {name: s.mean(dim=1).numpy() for name, s in states.items()}
    counts = {name: s.shape[1] for name, s in states.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise ValueError(f"tokens=flatten needs one token count for every method, got {listed}: use tokens=mean")
    return {name: s.flatten(start_dim=1).numpy() for name, s in states.items()}


def distances_to(vectors: dict[str, np.ndarray], reference: str = COMPLEX) -> dict[str, np.ndarray]:
    """{method: [N]}: Euclidean distance of each prompt's vector to the same prompt's ``reference`` vector,
    for every method but the reference."""
    target = vectors[reference]
    return {name: np.linalg.norm(v - target, axis=1) for name, v in vectors.items() if name != reference}


def mean_by_split(distances: dict[str, np.ndarray], prompts: Sequence[Prompt]) -> dict[str, dict[str, float]]:
    """{method: {split: mean distance, ..., "all": mean over the suite}}; the split is the prompt's category."""
    splits = list(dict.fromkeys(p.category for p in prompts))
    categories = np.array([p.category for p in prompts])
    return {
        name: {**{s: float(d[categories == s].mean()) for s in splits}, "all": float(d.mean())}
        for name, d in distances.items()
    }


def tsne_perplexity(n: int) -> float:
    """min(30, (n − 1) / 3): scikit-learn's default of 30, or a third of n − 1 for small suites."""
    return min(30.0, (n - 1) / 3)


def project(points: np.ndarray, method: str, random_state: int = 0, perplexity: float | None = None) -> np.ndarray:
    """[n, D] -> [n, 2] with PCA or t-SNE (``perplexity`` None: ``tsne_perplexity(n)``)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=random_state).fit_transform(points)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = tsne_perplexity(len(points)) if perplexity is None else float(perplexity)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state).fit_transform(points)
    raise ValueError(f"projections: unknown method {method!r}; choose from {list(PROJECTIONS)}")


def point_colour(prompt: Prompt):
    """The prompt's target colour: the toy world's RGB for its palette names, matplotlib's for other colour
    names, grey without one."""
    from matplotlib.colors import is_color_like

    from sur_lightning.data.synthetic import COLORS

    name = prompt.target[1] if prompt.target else None
    if name in COLORS:
        return tuple(c / 255 for c in COLORS[name])
    return name if name and is_color_like(name) else (0.5, 0.5, 0.5)


def plot_map(
    path: Path, coords: np.ndarray, methods: Sequence[str], prompts: Sequence[Prompt], titles: dict, title: str
) -> Path:
    """One panel per method (rows ``coords[k·N:(k+1)·N]`` are method k's), on shared axes: every point in
    grey, the method's own coloured by target colour and marked by split."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(prompts)
    splits = list(dict.fromkeys(p.category for p in prompts))
    markers = {split: MARKERS[i % len(MARKERS)] for i, split in enumerate(splits)}
    colours = [point_colour(p) for p in prompts]
    figure = Figure(figsize=(max(3.6 * len(methods), 9.0), 4.2))  # one panel still needs room for its legend
    axes = figure.subplots(1, len(methods), sharex=True, sharey=True, squeeze=False)[0]
    for k, (axis, method) in enumerate(zip(axes, methods)):
        axis.scatter(coords[:, 0], coords[:, 1], s=5, color="0.85", linewidths=0)
        own = coords[k * n : (k + 1) * n]
        for split in splits:
            rows = [i for i, p in enumerate(prompts) if p.category == split]
            axis.scatter(
                own[rows, 0],
                own[rows, 1],
                s=24,
                c=[colours[i] for i in rows],
                marker=markers[split],
                edgecolors="black",
                linewidths=0.3,
            )
        axis.set_title(titles[method], fontsize=9)
        axis.tick_params(labelsize=7)
    handles = [Line2D([], [], ls="", marker=markers[s], mfc="white", mec="black", label=s) for s in splits]
    named = dict.fromkeys((p.target[1], c) for p, c in zip(prompts, colours) if p.target)
    handles += [Line2D([], [], ls="", marker="o", mfc=c, mec="black", mew=0.3, label=name) for name, c in named]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(bottom=0.2, top=0.85)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def distance_table(means: dict[str, dict[str, float]], prompts: Sequence[Prompt]) -> str:
    """Plain text: one row per method, one column per split (its prompt count in brackets) and "all"."""
    splits = [*dict.fromkeys(p.category for p in prompts), "all"]
    headers = [f"{s} ({len(prompts) if s == 'all' else sum(p.category == s for p in prompts)})" for s in splits]
    width = max(len(name) for name in ["method", *means]) + 2
    lines = ["method".ljust(width) + "  ".join(headers)]
    for name, by_split in means.items():
        cells = [f"{by_split[s]:.4f}".rjust(len(h)) for s, h in zip(splits, headers)]
        lines.append(name.ljust(width) + "  ".join(cells))
    return "\n".join(lines)
