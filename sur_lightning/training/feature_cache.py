"""Filling the feature cache for a training config, and opening it for training (``data.cache``).

``data.cache``: ``auto`` computes what is missing before training and stores it; ``require`` fails on
the first missing entry, naming it; ``off`` encodes every step. With every entry cached, training
constructs no LLM and drops the VAE encoder. What is stored, and how: ``feature_store.py``.

The cache meets the datamodule at its cache methods only (``sur_lightning.data.datamodule``): it asks
which image variants and prompts the rows need (``cache_images``, ``cache_prompts``), reads an image's
content hash and VAE input (``image_content``, ``cache_pixels``), and hands back the rows it could not
encode (``skip_rows``) and the latent store (``use_latent_store``). The entry point opens the cache
(``FeatureCache.open``) from the backbone's and LLM's configs; no config goes into the datamodule, and no
function here reads the whole config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from tqdm.auto import tqdm

from sur_lightning.config import process_rank
from sur_lightning.data.datasets import CacheMissError, content_hash
from sur_lightning.data.images import BadImage
from sur_lightning.data.prompt_suites import load_prompt_list
from sur_lightning.data.surd import PrecomputedLLMFeatures
from sur_lightning.models.backbone import resolve_dtype
from sur_lightning.training.feature_store import FeatureCache, FeatureStore

SHARD_ENTRIES = 512
log = logging.getLogger(__name__)


def extra_prompts(callbacks) -> list[str]:
    """Prompts training needs beyond the dataset's: the empty prompt of classifier-free guidance, and the
    prompts the sample grid and the evaluation callback render (with their complex prompts, if any); when the
    evaluation reads the connector as the mean over renamed variants (its ``retriever`` says ``variant_mean``),
    each evaluation prompt's renamed variants too. ``callbacks``: the callbacks' configs by name
    (``cfg.callbacks``), or None."""
    texts = [""]
    for name in ("sample_grid", "evaluation"):
        node = (callbacks or {}).get(name) or {}
        if node.get("prompts"):
            prompts = load_prompt_list(node["prompts"], node.get("num_prompts"))
            for prompt in prompts:
                texts += [prompt.prompt] + ([prompt.complex] if prompt.complex else [])
            texts += renamed_variants(node.get("retriever"), [p.prompt for p in prompts])
    return unique(texts)


def renamed_variants(retriever_cfg, prompts: list[str]) -> list[str]:
    """Variants 1 .. K-1 of each prompt that names an object, when ``retriever_cfg`` (an ``llm.rag`` node) says
    ``variant_mean``; variant 0 is the prompt itself (``VariantMeanConditioning``)."""
    if not retriever_cfg or not retriever_cfg.get("variant_mean"):
        return []
    # Building a Retriever reads the knowledge base; it loads no encoder.
    renamer = instantiate(retriever_cfg).renamer
    return [v for k in range(1, renamer.variants) for p in prompts if (v := renamer.variant(p, k)) is not None]


def unique(items) -> list:
    return list(dict.fromkeys(items))


def missing_entries(cache: FeatureCache, datamodule, prompts_extra: list[str]) -> dict[str, list]:
    """What is not cached yet: {"latents": [(key, row, variant, bytes hash)], "clip": [prompt], "llm": [(prompt, row)]}."""
    # Every image variant the rows are read with (training rows in each flip, validation rows plain).
    missing: dict[str, list] = {"latents": [], "clip": [], "llm": []}
    known_bad = {}
    for row, variants in datamodule.cache_images():
        try:
            data_hash = datamodule.image_content(row)
        except BadImage as error:  # deleted since the scan
            known_bad[row.where] = str(error)
            continue
        for variant in variants:
            key = cache.latents.key(data_hash, variant)
            if key in cache.latents.bad:
                known_bad[row.where] = cache.latents.bad[key]
            elif key not in cache.latents:
                missing["latents"].append((key, row, variant))
    # Images an earlier build could not decode: skipped up front, with the reason it recorded.
    datamodule.skip_rows(known_bad)
    missing["latents"] = [job for job in missing["latents"] if job[1].where not in known_bad]
    # The rows' prompts (with name dropout, every renamed variant a training row may be served with).
    clip_prompts, llm_prompts = datamodule.cache_prompts()
    prompts = unique(clip_prompts + prompts_extra)
    missing["clip"] = [p for p in prompts if cache.clip.key(content_hash(p)) not in cache.clip]
    if cache.llm is not None:
        simple = dict(llm_prompts)
        for prompt in prompts_extra:
            simple.setdefault(prompt, None)
        missing["llm"] = [(p, row) for p, row in simple.items() if cache.llm.key(content_hash(p)) not in cache.llm]
    return missing


def describe_first_missing(missing: dict[str, list]) -> str:
    if missing["latents"]:
        key, row, variant = missing["latents"][0]
        return f"latents of {row.where} ({row.id}, {variant}): key {key}"
    if missing["clip"]:
        return f"CLIP states of prompt {missing['clip'][0][:80]!r}"
    prompt, row = missing["llm"][0]
    return f"LLM states of prompt {prompt[:80]!r}" + (f" ({row.where})" if row else "")


def count(missing: dict[str, list]) -> int:
    return sum(len(v) for v in missing.values())


def fill_text(store: FeatureStore, prompts: list[str], encode, dtype: torch.dtype, desc: str) -> None:
    """Encode each prompt alone and store its states (pooled [D] or its real tokens [T, D]).

    One prompt at a time: in a padded batch an LLM's states depend on the batch's longest prompt (SmolLM2's
    differ by up to 0.03), so a batched entry would depend on which prompts happened to be missing together,
    that is on the cache's history. Text encoders are cheap next to training (SmolLM2: ~30 ms a prompt on a CPU).
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for prompt in tqdm(prompts, desc=desc, unit="prompt"):
        states, mask = encode([prompt])
        if isinstance(states, dict):  # llm=multi: {teacher: [1, D]}; SDXL CLIP: {"states", "pooled"}
            entry = {name: teacher_states[0].to(dtype) for name, teacher_states in states.items()}
        else:
            entry = {"states": (states[0] if mask is None else states[0][mask[0]]).to(dtype)}
        pending[store.key(content_hash(prompt))] = entry
        if len(pending) >= SHARD_ENTRIES:
            store.write(pending)
            pending = {}
    if pending:
        store.write(pending)


def clip_encoder(backbone, store: FeatureStore):
    """prompts -> (states [B,77,d], None), or for an SDXL store ({"states", "pooled" [B,P]}, None): what ``fill_text`` stores."""
    if "pooled" not in store.names:
        return lambda prompts: (backbone.encode_prompt(prompts), None)

    def encode(prompts):
        states, pooled = backbone.encode_text(prompts)
        return {"states": states, "pooled": pooled}, None

    return encode


def fill_latents(store: FeatureStore, jobs: list, datamodule, backbone, report) -> None:
    """VAE-encode each (row, variant) alone and store the posterior mean and log-variance; undecodable images are
    marked bad. One image at a time, like ``fill_text``: an entry must not depend on which images shared its batch."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    bad: dict[str, str] = {}
    for key, row, variant in tqdm(jobs, desc="latents", unit="image"):
        try:
            image, geometry = datamodule.cache_pixels(row, variant)
        except BadImage as error:
            bad[key] = str(error)
            report.skip(row.where, row.id, str(error))
            continue
        distribution = backbone.encode_images(image.unsqueeze(0))
        entry = {"mean": distribution.mean[0], "logvar": distribution.logvar[0]}
        # SDXL stores keep each image's size and crop; SD1.x/2.x stores keep their old entries.
        pending[key] = {**entry, **{name: geometry[name] for name in store.names if name in geometry}}
        if len(pending) + len(bad) >= SHARD_ENTRIES:
            store.write(pending, bad)
            pending, bad = {}, {}
    if pending or bad:
        store.write(pending, bad)


def check_name_dropout(datamodule, rag) -> None:
    """The datamodule renames training prompts only if the LLM's retriever undoes the same renaming: ``rag`` (the
    LLM's retriever config, ``llm.rag``, or None) has ``name_dropout`` on and the same ``name_variants`` (conf/data
    reads both from llm.rag)."""
    if not datamodule.name_dropout:
        return
    if rag is None or not rag.get("name_dropout"):
        raise ValueError(
            f"data.name_dropout={datamodule.name_dropout} renames the training prompts, but llm.rag.name_dropout is off "
            "(or there is no llm.rag), so the LLM would read the nonsense word without the renamed fact: set "
            "llm.rag.name_dropout instead (+llm/rag=toyworld llm.rag.name_dropout=0.5)"
        )
    if int(rag.get("name_variants", 4)) != datamodule.name_variants:
        raise ValueError(
            f"data.name_variants={datamodule.name_variants} but llm.rag.name_variants={rag.get('name_variants')}: set llm.rag.name_variants"
        )


def build_cache(datamodule, cache: FeatureCache, prompts_extra: list[str], mode: str = "auto", backbone=None):
    """Compute and store what the datamodule's rows and ``prompts_extra`` (``extra_prompts``) need that ``cache`` does
    not hold yet; returns the backbone if one was loaded (or given).

    ``require`` computes nothing and fails naming the first missing entry. The LLM is built (from
    ``cache.llm_config``) only when LLM entries are missing; the backbone (from ``cache.backbone_config``) only
    when latents or CLIP states are, unless one is given.
    """
    check_name_dropout(datamodule, (cache.llm_config or {}).get("rag"))
    datamodule.setup("fit")
    if mode == "require":
        # Reading needs no lock: shards and the index are written to temporary names and renamed.
        cache.refresh()
        missing = missing_entries(cache, datamodule, prompts_extra)
        if count(missing):
            raise CacheMissError(
                f"data.cache=require and {count(missing)} entries are missing; the first: {describe_first_missing(missing)}. "
                "Build them with `python -m sur_lightning.cache` and the same overrides."
            )
        return backbone
    with build_lock(cache.cache_dir):
        # Read the stores only now: a job that held the lock before this one may have written what this one needs.
        cache.refresh()
        missing = missing_entries(cache, datamodule, prompts_extra)
        if count(missing):
            backbone = fill(cache, missing, datamodule, backbone)
            datamodule.write_report()
    return backbone


def build_lock(cache_dir) -> FileLock:
    """One builder at a time per cache folder (a sweep's jobs, the demo beside a benchmark): a second job waits,
    then computes only what the first left missing, so every entry is written once."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".build.lock")
    try:
        lock.acquire(timeout=0)
        lock.release()
    except Timeout:
        log.info(f"Waiting for another job that is building the feature cache in {folder} ({lock.lock_file}) ...")
    return lock


def fill(cache: FeatureCache, missing: dict[str, list], datamodule, backbone):
    """Compute and store the missing entries; returns the backbone if one was loaded."""
    if missing["llm"]:
        llm = instantiate(cache.llm_config)
        if isinstance(llm, PrecomputedLLMFeatures):
            # Precomputed features: a dataset row without a vector is skipped and reported; extra prompts just lack one.
            absent = {p for p, _ in missing["llm"] if p not in llm.index}
            datamodule.skip_rows(
                {row.where: f"simple prompt not in {llm.path}" for p, row in missing["llm"] if p in absent and row}
            )
            missing["llm"] = [(p, row) for p, row in missing["llm"] if p not in absent]
        dtype = resolve_dtype(cache.llm_config.get("dtype", "float32"))
        fill_text(cache.llm, [p for p, _ in missing["llm"]], llm, dtype, "LLM states")
        del llm
    if missing["latents"] or missing["clip"]:
        backbone = backbone if backbone is not None else instantiate(cache.backbone_config)
        fill_text(cache.clip, missing["clip"], clip_encoder(backbone, cache.clip), backbone.dtype, "CLIP states")
        fill_latents(cache.latents, missing["latents"], datamodule, backbone, datamodule.report)
        bad = {row.where: cache.latents.bad[key] for key, row, _ in missing["latents"] if key in cache.latents.bad}
        datamodule.skip_rows(bad)
    return backbone


def wait_for_cache(
    datamodule, cache: FeatureCache, prompts_extra: list[str], rank: int, poll_s: float = 5.0, timeout_s: float = 7200.0
) -> None:
    """For every rank but 0: wait until rank 0 has filled the cache (computing nothing here)."""
    started = time.monotonic()
    announced = False
    while True:
        try:
            build_cache(datamodule, cache, prompts_extra, "require")
            return
        except CacheMissError as error:
            if time.monotonic() - started > timeout_s:
                raise CacheMissError(
                    f"rank {rank}: the feature cache is still incomplete after {timeout_s:.0f} s of waiting for rank 0 "
                    f"(cache_wait_s): {error}"
                ) from None
            if not announced:
                print(f"rank {rank}: waiting for rank 0 to build the feature cache ...", flush=True)
                announced = True
            time.sleep(poll_s)


def prepare_feature_cache(
    datamodule,
    cache: FeatureCache,
    prompts_extra: list[str],
    rank: int | None = None,
    poll_s: float = 5.0,
    wait_s: float | None = None,
) -> dict:
    """For ``train``, with the datamodule's ``cache`` (``data.cache``) auto or require: fill (auto) or check
    (require) ``cache``, point the datamodule at it, and return the model's constructor arguments that replace
    the frozen encoders: no LLM, the backbone without its VAE encoder, the cache and the LLM width.

    Under multi-GPU training only rank 0 builds; the other ranks wait for it up to ``wait_s`` seconds
    (``cache_wait_s``; None: 7200) and compute nothing.
    """
    mode = datamodule.cache
    if mode == "off":
        raise ValueError("prepare_feature_cache: data.cache=off reads no cache (build the frozen encoders instead)")
    rank = process_rank() if rank is None else rank
    if rank != 0 and mode == "auto":
        wait_for_cache(datamodule, cache, prompts_extra, rank, poll_s, float(wait_s or 7200))
        backbone = None
    else:
        backbone = build_cache(datamodule, cache, prompts_extra, mode)
    # A fresh backbone when building loaded none. Training and validation read cached latents only,
    # so the VAE encoder is dropped (the decoder stays for sampling).
    backbone = backbone if backbone is not None else instantiate(cache.backbone_config)
    datamodule.use_latent_store(cache.latents)
    backbone.drop_vae_encoder("training reads cached latents: data.cache=" + str(mode))
    return {"backbone": backbone, "llm": None, "llm_dim": cache.llm_dim, "feature_cache": cache}
