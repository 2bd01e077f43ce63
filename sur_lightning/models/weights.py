"""Checks on weights as they load, so a broken file stops at load naming the file and the tensor instead of
becoming NaN conditioning and black images (or a header error that names no file) later.

- ``read_safetensors(path)``: a safetensors file's tensors; a malformed file or a NaN/inf tensor is a
  ``WeightsError`` naming the file (and the tensor).
- ``safetensors_metadata(path)``: its header's metadata, with the same error for a malformed file.
- ``check_finite(tensors, source)``: a NaN/inf tensor of a state dict is a ``WeightsError`` naming ``source``
  and the tensor.
- ``check_model_finite(model, pretrained, subfolder)``: the same over a loaded model's state dict, naming the
  weights file it was read from (``weights_files``). One pass of ``torch.isfinite`` over every tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError


class WeightsError(ValueError):
    """A weights file that cannot be used: malformed, or holding NaN/inf values. The message names the file."""


# Float types torch.aminmax reads (float8 weights are skipped: aminmax has no kernel for them).
CHECKED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite. ``aminmax`` propagates NaN and keeps ±inf, so its two values
    decide it in one pass without a [numel] bool tensor: 1-1.5 ns per value on 2 busy CPU cores, 12x faster
    than ``isfinite(t).all()`` (50 M values: 48 ms against 660 ms), so checking SD1.5's 1.07 B takes about 1.5 s.
    Flattened first: on a 4-D conv weight aminmax takes a slow path (64x64x3x3: 3 ms instead of 10 us)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise ``WeightsError`` naming ``source`` and the first tensor with a NaN or inf value.

    Integer tensors (quantized weights, step counters) cannot hold NaN and are skipped; so are tensors on the
    meta device (offloaded weights, which have no values here)."""
    for name, tensor in tensors:
        if tensor.dtype not in CHECKED_DTYPES or tensor.is_meta:
            continue
        if not is_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(
                f"{source}: tensor {name!r} {tuple(tensor.shape)} has {bad} non-finite value(s) (NaN or inf) of "
                f"{tensor.numel()}: the file is corrupt or was written from a diverged training run"
            )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file ``path`` (on the CPU), checked finite."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error
    check_finite(state.items(), str(path))
    return state


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of the safetensors file ``path``'s header ({} when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error


def weights_files(pretrained: str, subfolder: str | None = None) -> list[Path]:
    """The weight files (``*.safetensors``, else ``*.bin``) of a local model folder (or its ``subfolder``);
    [] for a hub id, whose files live in the Hugging Face cache."""
    folder = Path(pretrained) / (subfolder or "")
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def weights_source(pretrained: str, subfolder: str | None = None) -> str:
    """How an error names where a model's weights came from: its one weights file, else its folder and files."""
    files = weights_files(pretrained, subfolder)
    if len(files) == 1:
        return str(files[0])
    where = f"{pretrained}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    return f"{where}, files {', '.join(f.name for f in files)}" if files else where


def check_model_finite(model: torch.nn.Module, pretrained: str, subfolder: str | None = None) -> None:
    """Raise ``WeightsError`` when a tensor of ``model``'s state dict (what its weights file held) is NaN/inf,
    naming the file (``weights_source``) and the tensor. Run once, right after ``from_pretrained``."""
    check_finite(model.state_dict().items(), weights_source(pretrained, subfolder))
