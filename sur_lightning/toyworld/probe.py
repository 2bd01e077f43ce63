"""How much does an LLM know about the toy world's objects? A linear probe on its pooled hidden state.

SUR distils an LLM's pooled hidden state into the adapter. If that state does not say what colour a
tomato is, the distillation cannot teach it. The probe: for every object, the LLM's features of its
narrative prompts (every quantity × template) are classified by a multinomial logistic regression
trained on the *other* objects' prompts (leave-one-object-out), so an object's colour must be
read from what the LLM knows about the word, not memorised from its own examples.

    python -m sur_lightning.toyworld.probe                         # SmolLM2-135M-Instruct, offline
    python -m sur_lightning.toyworld.probe +llm/rag=toyworld       # the same, with retrieved facts in its input
    python -m sur_lightning.toyworld.probe +llm/rag=toyworld llm.rag_pooling=all   # pooled over the facts too

Arguments are Hydra overrides of the training config (``llm=smollm2`` unless one names another ``llm``).

Returns per object the share of its prompts given the right colour, the mean over objects, and
the leave-one-object-out majority-colour baseline (what a probe that ignores the features gets).

``--spans`` (with RAG) probes where the colour is: the same leave-one-object-out probe on the token
states pooled over the retrieved *fact's* tokens and, separately, over the *prompt's* own tokens (read
after the fact; special tokens left out). ``--renamed`` first renames every prompt's object, in the
prompt and in its fact, as name dropout does in training (variant 0), so the prompt's tokens can know
the colour only from the fact:

    python -m sur_lightning.toyworld.probe --spans +llm/rag=toyworld
    python -m sur_lightning.toyworld.probe --spans --renamed +llm/rag=toyworld
"""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.nn.functional as F

from sur_lightning.toyworld.world import COUNTS, OBJECTS, TEMPLATES, narrative_prompt

FLAGS = ("--spans", "--renamed")


def object_prompts() -> list[tuple[str, str]]:
    """(object name, prompt) for every object × quantity × template."""
    return [
        (obj.name, narrative_prompt(obj, count, t))
        for obj in OBJECTS
        for count in COUNTS
        for t in range(len(TEMPLATES))
    ]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-2, steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features, L-BFGS, deterministic."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + l2 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def linear_probe(features: torch.Tensor, names: list[str], colors: dict[str, str]) -> dict:
    """Leave-one-object-out colour probe. ``features`` [N, D] of prompts naming ``names[i]``."""
    palette = sorted(set(colors.values()))
    labels = torch.tensor([palette.index(colors[n]) for n in names])
    per_object, baseline = {}, {}
    for held in dict.fromkeys(names):
        test = torch.tensor([n == held for n in names])
        train = ~test
        mean, std = features[train].mean(0), features[train].std(0) + 1e-6
        model = fit_logistic((features[train] - mean) / std, labels[train], len(palette))
        with torch.no_grad():
            predicted = model((features[test] - mean) / std).argmax(-1)
        per_object[held] = float((predicted == labels[test]).float().mean())
        majority = Counter(colors[n] for n in dict.fromkeys(names) if n != held).most_common(1)[0][0]
        baseline[held] = float(colors[held] == majority)
    return {
        "accuracy": sum(per_object.values()) / len(per_object),
        "majority_baseline": sum(baseline.values()) / len(baseline),
        "chance": 1 / len(palette),
        "per_object": per_object,
    }


@torch.no_grad()
def probe_llm(llm, batch_size: int = 32) -> dict:
    """The colour probe on ``llm``'s pooled features (a ``CausalLMFeatures`` with ``pooling="mean"``)."""
    pairs = object_prompts()
    states = []
    for i in range(0, len(pairs), batch_size):
        out, _ = llm([p for _, p in pairs[i : i + batch_size]])
        states.append(out.float())
    names = [n for n, _ in pairs]
    return linear_probe(torch.cat(states), names, {obj.name: obj.color for obj in OBJECTS})


def span_prompts(renamer=None) -> tuple[list[str], list[str]]:
    """(object names, prompts) of ``object_prompts``; with ``renamer`` (a ``NameDropout``) each prompt's variant 0."""
    pairs = object_prompts()
    names, prompts = [n for n, _ in pairs], [p for _, p in pairs]
    if renamer is not None:
        prompts = [renamer.variant(p, 0) or p for p in prompts]
    return names, prompts


@torch.no_grad()
def span_features(llm, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{"facts": [N, D], "prompt": [N, D]}: ``llm``'s token states mean-pooled over the retrieved fact's
    tokens and over the prompt's own tokens (``CausalLMFeatures.token_states``), and ``has_facts`` [N]."""
    from sur_lightning.models.llm import masked_mean

    pooled = {"facts": [], "prompt": [], "has_facts": []}
    for i in range(0, len(prompts), batch_size):
        tokens = llm.token_states(prompts[i : i + batch_size], spans=True)
        facts = tokens.facts if tokens.facts is not None else torch.zeros_like(tokens.mask)
        pooled["facts"].append(masked_mean(tokens.states, facts).float().cpu())
        pooled["prompt"].append(masked_mean(tokens.states, tokens.prompt).float().cpu())
        pooled["has_facts"].append(facts.any(1).cpu())
    return {key: torch.cat(parts) for key, parts in pooled.items()}


def probe_spans(llm, renamed: bool = False, batch_size: int = 32) -> dict:
    """The colour probe on the fact's tokens and on the prompt's tokens (a ``CausalLMFeatures`` with RAG)."""
    if getattr(llm, "rag", None) is None:
        raise ValueError("--spans probes the retrieved facts' tokens: add +llm/rag=toyworld")
    previous = llm.rag.renamer
    if renamed and previous is None:
        # The retriever must undo the renaming to retrieve: name dropout's renamer, for this probe only.
        from sur_lightning.knowledge.name_dropout import NameDropout

        llm.rag.renamer = NameDropout.for_knowledge_base(llm.rag.knowledge_base, variants=1)
    try:
        names, prompts = span_prompts(llm.rag.renamer if renamed else None)
        features = span_features(llm, prompts, batch_size)
    finally:
        llm.rag.renamer = previous
    colors = {obj.name: obj.color for obj in OBJECTS}
    return {
        "renamed": renamed,
        "example": prompts[0],
        "prompts_without_facts": int((~features["has_facts"]).sum()),
        "facts": linear_probe(features["facts"], names, colors),
        "prompt": linear_probe(features["prompt"], names, colors),
    }


def main(overrides: list[str] | None = None) -> dict:
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sur_lightning.config import CONFIG_DIR

    overrides = sys.argv[1:] if overrides is None else overrides
    flags = {o for o in overrides if o in FLAGS}
    overrides = [o for o in overrides if o not in FLAGS]
    if "--renamed" in flags and "--spans" not in flags:
        raise ValueError("--renamed is an option of the --spans probe: add --spans")
    defaults = ["paths.root_dir=."] + ([] if any(o.startswith("llm=") for o in overrides) else ["llm=smollm2"])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*defaults, *overrides])
    if "--spans" in flags:
        result = probe_spans(instantiate(cfg.llm), renamed="--renamed" in flags)
        print(json.dumps({"overrides": overrides, "flags": sorted(flags), **result}, indent=2))
        return result
    result = probe_llm(instantiate(cfg.llm))
    print(json.dumps({"overrides": overrides, **result}, indent=2))
    return result


if __name__ == "__main__":
    main()
