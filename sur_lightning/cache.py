"""Precompute everything frozen: ``python -m sur_lightning.cache +experiment=demo`` (same conf/ as training).

Three kinds of entries, each in its own ``FeatureStore``:

    latents   per image and crop/flip variant: VAE posterior ``mean``, ``logvar``  [4, R/f, R/f]
              (training still samples mean + std·ε, so caching changes nothing but speed)
    clip      per prompt (simple and complex): CLIP text-encoder ``states``         [77, d]
    llm       per simple prompt: LLM ``states``, pooled [D] or the real tokens'      [T, D]

With name dropout (``llm.rag.name_dropout`` > 0) each training row's simple prompt has K renamed
variants ("a pair of sukebs"); each is one more prompt, with its CLIP states and its LLM states (read
with the original's retrieved fact, renamed the same way), keyed by its text like any prompt.

An entry's key is the sha256 of its content (image bytes or prompt text) together with the fingerprint
of what produced it: the component's resolved config (model id, revision, dtype, layer, pooling,
max length; resolution and crop for latents) plus a hash of its local files. A store lives in a folder
named by its fingerprint, so an entry made by anything else is recomputed, never mixed in.

Entries are written in shards (``shard-*.safetensors``, each written to a temporary name and renamed,
so a killed writer leaves nothing a reader accepts) listed in ``index.json``; a shard the index missed
is found by listing the folder. An interrupted build therefore resumes where it stopped.

``data.cache``: ``auto`` computes what is missing before training and stores it; ``require`` fails on
the first missing entry, naming it; ``off`` encodes every step. With every entry cached, training
constructs no LLM and drops the VAE encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sur_lightning.config import CONFIG_DIR, datamodule_arguments, process_rank
from sur_lightning.data.datamodule import CacheMissError, content_hash, image_variants, preprocess
from sur_lightning.data.images import BadImage, load_rgb
from sur_lightning.models.connectors import TextFeatures, pre_layout_targets

SHARD_ENTRIES = 512


class FeatureStore:
    """Entries ``{name: tensor}`` of one kind from one producer, in sharded safetensors files with an index.

    folder: ``root/kind/<first 16 hex of sha256(fingerprint)>``; ``bad`` maps keys of inputs that
    could not be encoded (a truncated image) to the reason, so every run skips them the same way.
    """

    def __init__(self, root: str | Path, kind: str, fingerprint: dict, names: tuple[str, ...]) -> None:
        self.kind = kind
        self.fingerprint = fingerprint
        self.names = names
        self.fingerprint_hash = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.folder = Path(root) / kind / self.fingerprint_hash[:16]
        self.index: dict[str, str] = {}
        self.bad: dict[str, str] = {}
        self.handles: dict = {}
        self.refresh()

    def __getstate__(self) -> dict:
        # Dataloader workers open their own memory maps.
        return {**self.__dict__, "handles": {}}

    def key(self, content: str, variant: str = "") -> str:
        return hashlib.sha256(f"{self.fingerprint_hash}:{content}:{variant}".encode()).hexdigest()[:40]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def refresh(self) -> None:
        """Read the index, then any shard it does not list yet (written by a run killed before its index update)."""
        from safetensors import safe_open

        index_file = self.folder / "index.json"
        listed: dict[str, list[str]] = {}
        if index_file.exists():
            index = json.loads(index_file.read_text())
            listed = index["shards"]
            self.bad.update(index.get("bad", {}))
        for shard in sorted(self.folder.glob("shard-*.safetensors")) if self.folder.exists() else []:
            if shard.name not in listed:
                with safe_open(str(shard), framework="pt") as f:
                    metadata = f.metadata() or {}
                listed[shard.name] = json.loads(metadata.get("keys", "[]"))
                self.bad.update(json.loads(metadata.get("bad", "{}")))
        self.index = {key: shard for shard, keys in listed.items() for key in keys}

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        shard = self.index.get(key)
        if shard is None:
            return None
        if shard not in self.handles:
            from safetensors import safe_open

            self.handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        handle = self.handles[shard]
        return {name: handle.get_tensor(f"{key}/{name}") for name in self.names}

    def write(self, entries: dict[str, dict[str, torch.Tensor]], bad: dict[str, str] | None = None) -> Path:
        """Write one shard atomically, then the index."""
        from safetensors.torch import save_file

        bad = bad or {}
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{key}/{name}": t.detach().cpu().contiguous() for key, e in entries.items() for name, t in e.items()}
        name = f"shard-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.safetensors"
        tmp = self.folder / f".tmp-{name}"
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(sorted(entries)), "bad": json.dumps(bad)})
        os.replace(tmp, self.folder / name)
        self.index.update({key: name for key in entries})
        self.bad.update(bad)
        self.write_index()
        return self.folder / name

    def write_index(self) -> None:
        shards: dict[str, list[str]] = {}
        for key, shard in self.index.items():
            shards.setdefault(shard, []).append(key)
        tmp = self.folder / f".index-{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": shards, "bad": self.bad}))
        os.replace(tmp, self.folder / "index.json")


# ------------------------------------------------------------------------------------- fingerprints


def files_hash(path: str, subfolders: tuple[str, ...] = ()) -> str | None:
    """Hash of (name, size, mtime) of a local model's files: changes when its weights are rewritten. None for hub ids."""
    root = Path(path)
    if not root.exists():
        return None
    if root.is_file():
        files = [root]
    else:
        folders = [root / s for s in subfolders] if subfolders else [root]
        files = sorted(p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(root) if p != root else p.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolved(node, skip: tuple[str, ...] = ()) -> dict:
    """A component's config with nested builders (the tiny models' ``_target_``) run, so paths are concrete;
    the keys in ``skip`` are left out."""
    config = OmegaConf.to_container(node, resolve=True)
    return {k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in config.items() if k not in skip}


def backbone_fingerprint(backbone_cfg, subfolders: tuple[str, ...]) -> dict:
    config = resolved(backbone_cfg)
    producer = {k: config.get(k) for k in ("_target_", "pretrained", "revision", "variant", "dtype")}
    return pre_layout_targets({**producer, "files": files_hash(str(config["pretrained"]), subfolders)})


# Bumped when what a config's LLM features mean changes (2: ``layer`` is a block index read before the final norm).
LLM_FEATURES_VERSION = 2


def llm_fingerprint(llm_cfg) -> dict:
    """The LLM's resolved config and a hash of its files; with ``llm.rag``, the retriever's fingerprint (its
    knowledge base's content, encoder, top-k, threshold, template) instead of its config, so states computed
    with other facts, or none, are never reused. ``llm=multi``: each teacher's own fingerprint."""
    if llm_cfg.get("teachers"):
        config = OmegaConf.to_container(llm_cfg, resolve=True)
        teachers = {name: llm_fingerprint(llm_cfg.teachers[name]) for name in llm_cfg.teachers}
        return pre_layout_targets({**config, "teachers": teachers})
    rag = llm_cfg.get("rag")
    # Keys that do not change the features stay out, so adding them kept existing caches valid;
    # llm.quantization does change them (int8/nf4 weights) and is in whenever it is set.
    config = {
        k: v
        for k, v in resolved(llm_cfg, skip=("rag",)).items()
        if k != "trust_remote_code" and not (k == "quantization" and v is None)
    }
    source = config.get("pretrained") or config.get("path")
    fingerprint = {**config, "files": files_hash(str(source)) if source else None, "features_version": LLM_FEATURES_VERSION}
    if rag is not None:
        # Building a Retriever reads and hashes the knowledge base; it loads no encoder.
        fingerprint["rag"] = instantiate(rag).fingerprint()
    # Module paths as before the layout move, so caches made before it stay valid.
    return pre_layout_targets(fingerprint)


def llm_entry_names(llm_cfg) -> tuple[str, ...]:
    """What one LLM cache entry holds: ``states``, or one pooled vector per teacher for ``llm=multi``."""
    teachers = llm_cfg.get("teachers")
    return tuple(teachers) if teachers else ("states",)


class FeatureCache:
    """The three stores of one training config, and the lookups training needs.

    text_features(prompts) -> TextFeatures(clip [B,77,d], llm [B,D] or [B,T,D], llm_mask None or [B,T])
    """

    def __init__(self, latents: FeatureStore, clip: FeatureStore, llm: FeatureStore | None) -> None:
        self.latents = latents
        self.clip = clip
        self.llm = llm

    @classmethod
    def from_config(cls, cfg: DictConfig) -> FeatureCache:
        root = cfg.data.cache_dir
        data = cfg.data
        latents = FeatureStore(
            root,
            "latents",
            {
                "vae": backbone_fingerprint(cfg.backbone, ("vae",)),
                "resolution": data.resolution,
                "crop": "center",
                "max_image_pixels": data.get("max_image_pixels"),
            },
            ("mean", "logvar"),
        )
        clip = FeatureStore(root, "clip", {"text_encoder": backbone_fingerprint(cfg.backbone, ("text_encoder", "tokenizer"))}, ("states",))
        llm = FeatureStore(root, "llm", llm_fingerprint(cfg.llm), llm_entry_names(cfg.llm)) if cfg.get("llm") else None
        return cls(latents, clip, llm)

    @property
    def llm_dim(self) -> int | dict[str, int] | None:
        """The cached LLM width, or {teacher: width} for ``llm=multi``."""
        if self.llm is None or not len(self.llm):
            return None
        entry = self.llm.get(next(iter(self.llm.index)))
        if self.llm.names != ("states",):
            return {name: int(t.shape[-1]) for name, t in entry.items()}
        return int(entry["states"].shape[-1])

    def clip_states(self, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.stack([self.lookup(self.clip, p)["states"] for p in prompts]).float().to(device)

    def text_features(self, prompts: list[str], device: torch.device | str = "cpu") -> TextFeatures:
        clip = self.clip_states(prompts, device)
        if self.llm is None:
            return TextFeatures(clip=clip)
        if self.llm.names != ("states",):
            entries = [self.lookup(self.llm, p) for p in prompts]
            teachers = {name: torch.stack([e[name] for e in entries]).float().to(device) for name in self.llm.names}
            return TextFeatures(clip=clip, llm=teachers)
        states = [self.lookup(self.llm, p)["states"].float() for p in prompts]
        if states[0].dim() == 1:
            return TextFeatures(clip=clip, llm=torch.stack(states).to(device))
        # Token states: the real tokens were stored; pad with zeros and mark them in the mask.
        length = max(s.shape[0] for s in states)
        padded = torch.zeros(len(states), length, states[0].shape[-1])
        mask = torch.zeros(len(states), length, dtype=torch.bool)
        for i, s in enumerate(states):
            padded[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return TextFeatures(clip=clip, llm=padded.to(device), llm_mask=mask.to(device))

    @staticmethod
    def lookup(store: FeatureStore, prompt: str) -> dict[str, torch.Tensor]:
        entry = store.get(store.key(content_hash(prompt)))
        if entry is None:
            raise CacheMissError(
                f"no cached {store.kind} features for prompt {prompt[:80]!r} (key {store.key(content_hash(prompt))} "
                f"in {store.folder}); build the cache with it: `python -m sur_lightning.cache ...` lists the "
                "dataset's prompts and callbacks.sample_grid.prompts"
            )
        return entry


# ------------------------------------------------------------------------------------- building


def extra_prompts(cfg: DictConfig) -> list[str]:
    """Prompts training needs beyond the dataset's: the empty prompt of classifier-free guidance, and the
    prompts the sample grid and the evaluation callback render (with their complex prompts, if any)."""
    from sur_lightning.data.prompt_suites import load_prompt_list

    texts = [""]
    for name in ("sample_grid", "evaluation"):
        node = (cfg.get("callbacks") or {}).get(name) or {}
        if node.get("prompts"):
            for prompt in load_prompt_list(node["prompts"], node.get("num_prompts")):
                texts += [prompt.prompt] + ([prompt.complex] if prompt.complex else [])
    return unique(texts)


def unique(items) -> list:
    return list(dict.fromkeys(items))


def missing_entries(cache: FeatureCache, datamodule, prompts_extra: list[str]) -> dict[str, list]:
    """What is not cached yet: {"latents": [(key, row, variant, bytes hash)], "clip": [prompt], "llm": [(prompt, row)]}."""
    # Training rows need every flip variant they may be drawn with; validation rows only the plain one.
    jobs = [(row, image_variants(datamodule.random_flip)) for row in datamodule.train_set.rows]
    if datamodule.val_set is not None:
        jobs += [(row, image_variants(False)) for row in datamodule.val_set.rows]
    missing: dict[str, list] = {"latents": [], "clip": [], "llm": []}
    known_bad = {}
    for row, variants in jobs:
        try:
            data_hash = content_hash(datamodule.train_set.image_bytes(row))
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
    all_rows = datamodule.all_rows()
    # The LLM's rewrites too, when the alignment loss targets them (loss.align_target=rewrite|both).
    rewrites = [r.rewrite for r in all_rows if r.rewrite is not None]
    # Name dropout: every renamed variant a training row may be served with (none without it).
    renamed = datamodule.renamed_prompts() if hasattr(datamodule, "renamed_prompts") else []
    prompts = unique(
        [r.simple for r in all_rows] + [p for p, _ in renamed] + [r.complex for r in all_rows] + rewrites + prompts_extra
    )
    missing["clip"] = [p for p in prompts if cache.clip.key(content_hash(p)) not in cache.clip]
    if cache.llm is not None:
        simple = {}
        for row in all_rows:
            simple.setdefault(row.simple, row)
        for prompt, row in renamed:
            simple.setdefault(prompt, row)
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


def in_batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fill_text(store: FeatureStore, prompts: list[str], encode, batch_size: int, dtype: torch.dtype, desc: str) -> None:
    """Encode prompts in batches and store, per prompt, its states (pooled [D] or its real tokens [T, D])."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for batch in tqdm(list(in_batches(prompts, batch_size)), desc=desc, unit="batch"):
        states, mask = encode(batch)
        for i, prompt in enumerate(batch):
            if isinstance(states, dict):  # llm=multi: {teacher: [B, D]}
                entry = {name: teacher_states[i].to(dtype) for name, teacher_states in states.items()}
            else:
                entry = {"states": (states[i] if mask is None else states[i][mask[i]]).to(dtype)}
            pending[store.key(content_hash(prompt))] = entry
        if len(pending) >= SHARD_ENTRIES:
            store.write(pending)
            pending = {}
    if pending:
        store.write(pending)


def fill_latents(store: FeatureStore, jobs: list, datamodule, backbone, batch_size: int, report) -> None:
    """VAE-encode each (row, variant) and store the posterior mean and log-variance; undecodable images are marked bad."""
    dataset = datamodule.train_set
    pending: dict[str, dict[str, torch.Tensor]] = {}
    bad: dict[str, str] = {}
    for batch in tqdm(list(in_batches(jobs, batch_size)), desc="latents", unit="batch"):
        keys, pixels = [], []
        for key, row, variant in batch:
            try:
                image, _ = load_rgb(dataset.image_bytes(row), dataset.max_image_pixels, dataset.min_image_side)
            except BadImage as error:
                bad[key] = str(error)
                report.skip(row.where, row.id, str(error))
                continue
            keys.append(key)
            pixels.append(preprocess(image, datamodule.resolution, True, variant.endswith("flip")))
        if keys:
            distribution = backbone.encode_images(torch.stack(pixels))
            for i, key in enumerate(keys):
                pending[key] = {"mean": distribution.mean[i], "logvar": distribution.logvar[i]}
        if len(pending) + len(bad) >= SHARD_ENTRIES:
            store.write(pending, bad)
            pending, bad = {}, {}
    if pending or bad:
        store.write(pending, bad)


def check_name_dropout(cfg: DictConfig, datamodule) -> None:
    """The datamodule renames training prompts only if the LLM's retriever undoes the same renaming: its
    ``llm.rag.name_dropout`` on and the same ``name_variants`` (conf/data reads both from llm.rag)."""
    renamer = getattr(datamodule, "renamer", None)
    if renamer is None:
        return
    rag = (cfg.get("llm") or {}).get("rag")
    if rag is None or not rag.get("name_dropout"):
        raise ValueError(
            f"data.name_dropout={datamodule.name_dropout} renames the training prompts, but llm.rag.name_dropout is off "
            "(or there is no llm.rag), so the LLM would read the nonsense word without the renamed fact: set "
            "llm.rag.name_dropout instead (+llm/rag=toyworld llm.rag.name_dropout=0.5)"
        )
    if int(rag.get("name_variants", 4)) != renamer.variants:
        raise ValueError(
            f"data.name_variants={renamer.variants} but llm.rag.name_variants={rag.get('name_variants')}: set llm.rag.name_variants"
        )


def build_cache(cfg: DictConfig, datamodule, mode: str = "auto", backbone=None) -> tuple[FeatureCache, object]:
    """Compute and store what ``cfg`` needs that is not cached yet; returns the cache and the backbone if loaded.

    ``require`` computes nothing and fails naming the first missing entry. The LLM is loaded only when
    LLM entries are missing; the backbone only when latents or CLIP states are (or when given).
    """
    from sur_lightning.models.backbone import resolve_dtype

    check_name_dropout(cfg, datamodule)
    datamodule.setup("fit")
    cache = FeatureCache.from_config(cfg)
    missing = missing_entries(cache, datamodule, extra_prompts(cfg))
    if not count(missing):
        return cache, backbone
    if mode == "require":
        raise CacheMissError(
            f"data.cache=require and {count(missing)} entries are missing; the first: {describe_first_missing(missing)}. "
            "Build them with `python -m sur_lightning.cache` and the same overrides."
        )
    batch_size = int(cfg.data.batch_size)
    if missing["llm"]:
        llm = instantiate(cfg.llm)
        if hasattr(llm, "missing_prompts"):
            # Precomputed features: a dataset row without a vector is skipped and reported; extra prompts just lack one.
            absent = {p for p, _ in missing["llm"] if p not in llm.index}
            datamodule.skip_rows({row.where: f"simple prompt not in {llm.path}" for p, row in missing["llm"] if p in absent and row})
            missing["llm"] = [(p, row) for p, row in missing["llm"] if p not in absent]
        dtype = resolve_dtype(cfg.llm.get("dtype", "float32"))
        fill_text(cache.llm, [p for p, _ in missing["llm"]], llm, batch_size, dtype, "LLM states")
        del llm
    if missing["latents"] or missing["clip"]:
        backbone = backbone if backbone is not None else instantiate(cfg.backbone)
        fill_text(
            cache.clip, missing["clip"], lambda ps: (backbone.encode_prompt(ps), None), batch_size, backbone.dtype, "CLIP states"
        )
        fill_latents(cache.latents, missing["latents"], datamodule, backbone, batch_size, datamodule.report)
        bad = {row.where: cache.latents.bad[key] for key, row, _ in missing["latents"] if key in cache.latents.bad}
        datamodule.skip_rows(bad)
    datamodule.write_report()
    return cache, backbone


def wait_for_cache(cfg: DictConfig, datamodule, rank: int, poll_s: float = 5.0, timeout_s: float = 7200.0):
    """For every rank but 0: wait until rank 0 has filled the cache (computing nothing here), then open it."""
    started = time.monotonic()
    announced = False
    while True:
        try:
            cache, _ = build_cache(cfg, datamodule, "require")
            return cache
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


def prepare_feature_cache(cfg: DictConfig, datamodule, rank: int | None = None, poll_s: float = 5.0) -> dict:
    """For ``train``: with ``data.cache`` on, fill (auto) or check (require) the cache, point the datamodule at it,
    and return the model's constructor arguments that replace the frozen encoders: no LLM, the backbone
    without its VAE encoder, the cache and the LLM width.

    Under multi-GPU training only rank 0 builds; the other ranks wait for it and compute nothing.
    Name dropout's data and LLM settings are checked here, with the cache off too.
    """
    check_name_dropout(cfg, datamodule)
    mode = cfg.data.get("cache", "off")
    if mode == "off":
        return {}
    rank = process_rank() if rank is None else rank
    if rank != 0 and mode == "auto":
        cache, backbone = wait_for_cache(cfg, datamodule, rank, poll_s, float(cfg.get("cache_wait_s") or 7200)), None
    else:
        cache, backbone = build_cache(cfg, datamodule, mode)
    # A fresh backbone when building loaded none. Training and validation read cached latents only,
    # so the VAE encoder is dropped (the decoder stays for sampling).
    backbone = backbone if backbone is not None else instantiate(cfg.backbone)
    datamodule.use_latent_store(cache.latents)
    backbone.vae.encoder = None
    backbone.vae.quant_conv = None
    return {"backbone": backbone, "llm": None, "llm_dim": cache.llm_dim, "feature_cache": cache}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data, **datamodule_arguments(cfg))
    mode = "require" if cfg.data.get("cache") == "require" else "auto"
    started = time.perf_counter()
    cache, _ = build_cache(cfg, datamodule, mode)
    print(datamodule.report)
    print(f"Feature cache complete in {time.perf_counter() - started:.1f} s:")
    for store in (cache.latents, cache.clip, cache.llm):
        if store is not None:
            print(f"  {store.kind:8s} {len(store):7d} entries  {store.folder}")
    if datamodule.report_dir:
        print(f"  report   {Path(datamodule.report_dir) / 'data_report.json'}")


if __name__ == "__main__":
    main()
