"""sur_lightning: train SUR-adapter and ELLA connectors between frozen LLMs and a frozen Stable Diffusion.

Entry points (``python -m sur_lightning.X``): ``train``, ``generate``, ``evaluate``, ``cache``, ``rewrite``, ``bench``,
``sweep_report``, ``embedding_map``, ``toyworld.pretrain``, ``toyworld.probe`` — short Hydra mains that compose the
library; none imports another, and no library module imports one (tests/test_layout.py).

The library, imported downward only: ``training`` → ``evaluation`` → ``generation`` → ``models``, ``data``,
``knowledge`` (and ``config``, the run's configuration, beside them); ``toyworld`` is the offline proving ground.

The public API for generating with a trained connector in a stock diffusers pipeline (README "Use a trained
connector in diffusers")::

    connector = sur_lightning.load_connector("outputs/demo/runs/<time>/adapter")   # folder or adapter.safetensors
    with sur_lightning.attach(pipe, connector):
        images = pipe(prompt).images
"""

__version__ = "0.1.0"

import os as _os

# MKL and OpenMP may otherwise pick fewer threads than asked from one call to the next, and a run's float sums
# would depend on the machine's load. Read when they first start, so set before anything imports torch.
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")
_os.environ.setdefault("OMP_DYNAMIC", "FALSE")
# torch's OpenMP (libgomp) spins 300,000 rounds before a waiting thread sleeps. Beside another busy process that
# made the demo's steps ~10x slower than spinning briefly (docs/performance.md); speed only, the numbers are the same.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from sur_lightning.config import register_resolvers as _register_resolvers

# Config interpolations (${llm_pooling:...}, ${wandb_run_name:...}): registered before any config is composed.
_register_resolvers()


# Imported on first use, so `import sur_lightning` stays light (no torch, diffusers) for the entry points.
_API = {"load_connector": "sur_lightning.models.connectors", "attach": "sur_lightning.generation.attach"}
__all__ = ["attach", "load_connector"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sur_lightning' has no attribute {name!r}")
