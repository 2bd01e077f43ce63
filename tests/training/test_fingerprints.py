"""Cache fingerprints are frozen: the layout move (issue 20) and later refactors must not change a store's
fingerprint, or every existing feature cache would silently be rebuilt.

The expected values were recorded with the code before the move. Local paths and file hashes differ per
machine and per checkout, so they are replaced by placeholders (``<root>``, ``<cache>``, ``<repo>``,
``files_hash`` → ``"<files>"``) before hashing; everything else (``_target_`` strings, settings,
versions, the retriever's knowledge-base hash) is compared exactly.
"""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import open_cache, tiny_overrides

import sur_lightning.models.backbone as backbone_module
import sur_lightning.models.llm as llm_module
import sur_lightning.training.feature_store as store_module

REPO = str(Path(__file__).resolve().parents[2])

TINY_RAG = ("+experiment=sur_demo", "+llm/rag=toyworld", "llm.rag.name_dropout=0.5", "llm.rag.encoder=minilm-path")

# config name -> (overrides, tiny overrides?)
CONFIGS = {
    "tiny_sur_demo": (("+experiment=sur_demo",), True),
    "tiny_ella_demo": (("+experiment=ella_demo", "llm=tiny"), True),
    "tiny_sur_demo_rag": (TINY_RAG, True),
    "demo": (("+experiment=demo",), False),
    "sur_demo": (("+experiment=sur_demo",), False),
}

# Recorded before the move (commit aa1bcca), {config: {store kind: sha256[:16] of its normalised fingerprint}}.
EXPECTED = {
    "demo": {"latents": "8d04b2e643257887", "clip": "45c2a210815dc4b9", "llm": "6b115f0a21353f3b"},
    "sur_demo": {"latents": "8d04b2e643257887", "clip": "45c2a210815dc4b9", "llm": "a273cd284e10f8b8"},
    "tiny_ella_demo": {"latents": "1607e69eea8246da", "clip": "2b7106c9b85eca26", "llm": "270a7e45713c40ee"},
    "tiny_sur_demo": {"latents": "1607e69eea8246da", "clip": "2b7106c9b85eca26", "llm": "5df03f8379cb8524"},
    # The fingerprint holds toyworld.jsonl's sha256; adding each object's fact wordings (issue 36) changed the file,
    # so RAG caches keyed on it were rebuilt once (98e9d847198d227d before). Nothing else in it changed.
    "tiny_sur_demo_rag": {"latents": "1607e69eea8246da", "clip": "2b7106c9b85eca26", "llm": "6bf6d50fb0168dc3"},
}


def normalised(fingerprint: dict, root: Path, cache: Path) -> str:
    text = json.dumps(fingerprint, sort_keys=True)
    for path, name in ((str(cache), "<cache>"), (str(root), "<root>"), (REPO, "<repo>")):
        text = text.replace(path, name)
    return text


@pytest.fixture
def stable_files(monkeypatch):
    """File hashes (names, sizes, mtimes) depend on the checkout; SmolLM2's conversion is not needed for its path."""
    for module in (store_module, backbone_module):  # the stores', and the retriever's encoder identity
        monkeypatch.setattr(module, "files_hash", lambda *args, **kwargs: "<files>")
    monkeypatch.setattr(llm_module, "convert_smollm2_gguf", lambda out_dir: str(out_dir))


def store_fingerprints(compose, tmp_path, cache_dir, name: str) -> dict[str, str]:
    overrides, tiny = CONFIGS[name]
    # The tiny overrides without SUR's connector sizes (connectors do not enter a fingerprint).
    small = [o for o in tiny_overrides(tmp_path, cache_dir) if not o.startswith("connector.")] if tiny else []
    paths = [] if tiny else [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    cfg = compose(*small, *paths, *overrides, tiny=False)
    cache = open_cache(cfg)
    out = {}
    for store in (cache.latents, cache.clip, cache.llm):
        # The folder is named by the hash of the raw fingerprint (with this machine's paths).
        assert (
            store.fingerprint_hash == hashlib.sha256(json.dumps(store.fingerprint, sort_keys=True).encode()).hexdigest()
        )
        assert store.folder.name == store.fingerprint_hash[:16]
        text = normalised(store.fingerprint, tmp_path, cache_dir)
        out[store.kind] = hashlib.sha256(text.encode()).hexdigest()[:16]
        print(name, store.kind, out[store.kind], text)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_store_fingerprints_are_unchanged(compose, tmp_path, cache_dir, stable_files, name):
    assert store_fingerprints(compose, tmp_path, cache_dir, name) == EXPECTED[name]
