"""What a run pins about the process before any work, and what it records about the machine it ran on.

A CPU run's float sums depend on how many threads split them: an exported ``OMP_NUM_THREADS``, a CPU quota
or ``taskset`` changes torch's default thread count, the first step's rounding with it, and after a few
thousand AdamW steps the trained connector by as much as another seed would. So the run chooses its
thread count (``threads``) instead of inheriting it, with MKL's and OpenMP's dynamic adjustment off
(set in ``sur_lightning/__init__.py``, before torch loads them).

- ``pin_threads(threads)``: torch's intra-op threads (OpenMP and MKL) for this process.
- ``pick_device(device)``: ``auto`` (CUDA when present) or the device named.
- ``environment()``: library versions, thread count and CPU model, for ``metrics.json`` and the W&B config.
  Runs are bit-identical only on the same CPU model with the same library versions and thread count.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

RECORDED_PACKAGES = ("torch", "lightning", "diffusers", "transformers", "safetensors", "numpy")


def pin_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (None: keep torch's default); returns the count in force."""
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def pick_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; any other value names the device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """What a run's exact numbers depend on besides its config and seed."""
    return {
        "versions": {
            "python": platform.python_version(),
            **{name: package_version(name) for name in RECORDED_PACKAGES},
        },
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {
            name: os.environ.get(name)
            for name in (
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "MKL_DYNAMIC",
                "OMP_DYNAMIC",
                "OMP_WAIT_POLICY",
                "GOMP_SPINCOUNT",
            )
        },
    }
