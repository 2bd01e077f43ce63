"""The feature cache's storage: everything frozen, precomputed once, in sharded stores named by their producer.

Three kinds of entries, each in its own ``FeatureStore``:

    latents   per image and crop/flip variant: VAE posterior ``mean``, ``logvar``  [4, R/f, R/f]
              (training still samples mean + std·ε, so caching changes nothing but speed);
              for SDXL also the image's ``original_size`` and ``crop_top_left``     [2]
    clip      per prompt (simple and complex): CLIP text-encoder ``states``         [77, d]
              (SDXL: both encoders' states [77, d1+d2] and the ``pooled`` embedding [P])
    llm       per simple prompt: LLM ``states``, pooled [D] or the real tokens'      [T, D]

With name dropout (``llm.rag.name_dropout`` > 0) each training row's simple prompt has K renamed
variants ("a pair of sukebs"); each is one more prompt, with its CLIP states and its LLM states (read
with the original's retrieved fact, renamed the same way), keyed by its text like any prompt.

An entry's key is the sha256 of its content (image bytes or prompt text) together with the fingerprint
of what produced it: the component's resolved config (model id, revision, dtype, layer, pooling,
max length; resolution and crop for latents) plus a hash of its local files. A store lives in a folder
named by its fingerprint, so an entry made by anything else is recomputed, never mixed in. Fingerprints
name components by their module paths before the layout move (``pre_layout_targets``), so caches built
before it stay valid.

Entries are written in shards (``shard-*.safetensors``, each written to a temporary name and renamed,
so a killed writer leaves nothing a reader accepts) listed in ``index.json``; a shard the index missed
is found by listing the folder. An interrupted build therefore resumes where it stopped.
``FeatureCache`` holds one training config's three stores and serves ``text_features(prompts)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from sur_lightning.data.datasets import CacheMissError, content_hash
from sur_lightning.models.backbone import files_hash
from sur_lightning.models.connectors import TextFeatures, pre_layout_targets


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
        tensors = {
            f"{key}/{name}": t.detach().cpu().contiguous() for key, e in entries.items() for name, t in e.items()
        }
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


def resolved(node, skip: tuple[str, ...] = ()) -> dict:
    """A component's config with nested builders (the tiny models' ``_target_``) run, so paths are concrete;
    the keys in ``skip`` are left out."""
    config = OmegaConf.to_container(node, resolve=True)
    return {
        k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in config.items() if k not in skip
    }


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
    fingerprint = {
        **config,
        "files": files_hash(str(source)) if source else None,
        "features_version": LLM_FEATURES_VERSION,
    }
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

    def __init__(
        self, latents: FeatureStore, clip: FeatureStore, llm: FeatureStore | None, backbone_config=None, llm_config=None
    ) -> None:
        self.latents = latents
        self.clip = clip
        self.llm = llm
        # What produces the entries (the backbone's and the LLM's config nodes): built to fill what is missing.
        self.backbone_config = backbone_config
        self.llm_config = llm_config
        # The folder all three stores live under (``data.cache_dir``).
        self.cache_dir = Path(latents.folder).parent.parent

    @classmethod
    def open(cls, cache_dir, backbone, llm, resolution: int, max_image_pixels: int | None = None) -> FeatureCache:
        """The stores in ``cache_dir`` of what ``backbone`` and ``llm`` (their config nodes; ``llm`` None: no LLM
        store) produce, for images read at ``resolution`` (center crop) under the ``max_image_pixels`` limit as
        configured (None when the config leaves the default). Each store is named by its producer's fingerprint."""
        # SDXL's UNet also reads a pooled embedding and each image's size and crop: its stores hold them too.
        sdxl = bool(getattr(get_class(backbone["_target_"]), "micro_conditioning", False))
        geometry = ("original_size", "crop_top_left") if sdxl else ()
        latents = FeatureStore(
            cache_dir,
            "latents",
            {
                "vae": backbone_fingerprint(backbone, ("vae",)),
                "resolution": resolution,
                "crop": "center",
                "max_image_pixels": max_image_pixels,
            },
            ("mean", "logvar", *geometry),
        )
        text_parts = (
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if sdxl else ("text_encoder", "tokenizer")
        )
        clip = FeatureStore(
            cache_dir,
            "clip",
            {"text_encoder": backbone_fingerprint(backbone, text_parts)},
            ("states", "pooled") if sdxl else ("states",),
        )
        llm_store = FeatureStore(cache_dir, "llm", llm_fingerprint(llm), llm_entry_names(llm)) if llm else None
        return cls(latents, clip, llm_store, backbone, llm or None)

    def stores(self) -> list[FeatureStore]:
        return [store for store in (self.latents, self.clip, self.llm) if store is not None]

    def refresh(self) -> None:
        """Read every store's index again: another job may have written entries since this one opened them."""
        for store in self.stores():
            store.refresh()

    @property
    def llm_dim(self) -> int | dict[str, int] | None:
        """The cached LLM width, or {teacher: width} for ``llm=multi``."""
        if self.llm is None or not len(self.llm):
            return None
        entry = self.llm.get(next(iter(self.llm.index)))
        if self.llm.names != ("states",):
            return {name: int(t.shape[-1]) for name, t in entry.items()}
        return int(entry["states"].shape[-1])

    def clip_features(self, prompts: list[str], device: torch.device | str = "cpu") -> TextFeatures:
        """TextFeatures(clip [B,77,d], pooled [B,P] for SDXL stores, else None)."""
        entries = [self.lookup(self.clip, p) for p in prompts]
        clip = torch.stack([e["states"] for e in entries]).float().to(device)
        pooled = torch.stack([e["pooled"] for e in entries]).float().to(device) if "pooled" in self.clip.names else None
        return TextFeatures(clip=clip, pooled=pooled)

    def text_features(self, prompts: list[str], device: torch.device | str = "cpu") -> TextFeatures:
        features = self.clip_features(prompts, device)
        clip, pooled = features.clip, features.pooled
        if self.llm is None:
            return features
        if self.llm.names != ("states",):
            entries = [self.lookup(self.llm, p) for p in prompts]
            teachers = {name: torch.stack([e[name] for e in entries]).float().to(device) for name in self.llm.names}
            return TextFeatures(clip=clip, llm=teachers, pooled=pooled)
        states = [self.lookup(self.llm, p)["states"].float() for p in prompts]
        if states[0].dim() == 1:
            return TextFeatures(clip=clip, llm=torch.stack(states).to(device), pooled=pooled)
        # Token states: the real tokens were stored; pad with zeros and mark them in the mask.
        length = max(s.shape[0] for s in states)
        padded = torch.zeros(len(states), length, states[0].shape[-1])
        mask = torch.zeros(len(states), length, dtype=torch.bool)
        for i, s in enumerate(states):
            padded[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return TextFeatures(clip=clip, llm=padded.to(device), llm_mask=mask.to(device), pooled=pooled)

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
