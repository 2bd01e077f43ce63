"""Weights are checked as they load: a malformed safetensors file or a NaN/inf tensor (in a connector, a resumed or
official checkpoint, a backbone) is an error naming the file and the tensor, and a non-finite conditioning at
generation stops with the prompt and column named instead of drawing a black image."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sur_lightning
from sur_lightning.models.connectors import save_connector
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta
from sur_lightning.models.weights import WeightsError


def tiny_sur() -> SURAdapter:
    torch.manual_seed(0)
    return SURAdapter(dim=32, llm_dim=32, eta=FixedEta(0.5), num_layers=1, num_heads=2, ff_dim=32).eval()


def overwrite_tensor_bytes(path: Path, name: str) -> None:
    """Overwrite the stored bytes of tensor ``name`` with 0xFF (a float32 NaN), as a bad disk or copy would."""
    raw = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + header_size])[name]["data_offsets"]
    raw[8 + header_size + start : 8 + header_size + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(raw))


def break_header(path: Path) -> None:
    """A header length no file can have: safetensors says "header too large" and names no file."""
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 10**12)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("form", ["file", "folder"])
def test_a_connector_with_overwritten_tensor_bytes_is_named_by_file_and_tensor(form, tmp_path):
    sur = tiny_sur()
    if form == "file":
        path, _ = save_connector(sur, tmp_path / "adapter.safetensors")
        weights = path
    else:
        path = sur.save_pretrained(tmp_path / "adapter")
        weights = path / "model.safetensors"
    overwrite_tensor_bytes(weights, "fc.weight")
    with pytest.raises(WeightsError, match=rf"{weights}: tensor 'fc.weight' \(32, 32\) has 1024 non-finite value"):
        sur_lightning.load_connector(path)


def test_a_connector_with_a_broken_header_is_named(tmp_path):
    path, config = save_connector(tiny_sur(), tmp_path / "adapter.safetensors")
    break_header(path)
    with pytest.raises(WeightsError, match=rf"{path} is not a readable safetensors file .*header too large"):
        sur_lightning.load_connector(path)
    config.unlink()  # the config then comes from the header, which is broken too
    with pytest.raises(WeightsError, match=rf"{path} is not a readable safetensors file"):
        sur_lightning.load_connector(path)


def test_official_and_resumed_checkpoints_with_nan_are_named(tmp_path):
    from sur_lightning.models.connectors.sur import read_official_state_dict
    from sur_lightning.training.module import ConnectorTrainingModule

    official = tmp_path / "adapter_checkpoint1000.pt"
    torch.save({"fc.weight": torch.tensor([[0.0, float("inf")]])}, official)
    with pytest.raises(WeightsError, match=rf"{official}: tensor 'fc.weight' \(1, 2\) has 1 non-finite"):
        read_official_state_dict(official)
    # What Lightning hands the module on ckpt_path=...: the file is the trainer's ckpt_path.
    module = SimpleNamespace(_trainer=SimpleNamespace(ckpt_path=str(tmp_path / "last.ckpt")))
    checkpoint = {"state_dict": {"connector.fc.weight": torch.full((2, 2), float("nan"))}}
    with pytest.raises(WeightsError, match=r"last.ckpt: tensor 'connector.fc.weight'"):
        ConnectorTrainingModule.on_load_checkpoint(module, checkpoint)


def test_a_backbone_with_nan_weights_or_a_broken_file_is_named(tiny_sd, tmp_path):
    from safetensors.torch import load_file, save_file

    from sur_lightning.models.backbone import StableDiffusionBackbone

    bad = Path(shutil.copytree(tiny_sd, tmp_path / "tiny-sd"))
    unet_file = bad / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet_file)
    name = next(k for k in sorted(state) if k.endswith("conv_in.weight"))
    state[name][0, 0, 0, 0] = float("nan")
    save_file(state, unet_file)
    with pytest.raises(WeightsError, match=rf"{unet_file}: tensor '{name}' .* has 1 non-finite value"):
        StableDiffusionBackbone(str(bad))
    shutil.copy(Path(tiny_sd) / "unet" / "diffusion_pytorch_model.safetensors", unet_file)
    text_file = bad / "text_encoder" / "model.safetensors"
    break_header(text_file)  # transformers' loader: safetensors' own error, without the file
    with pytest.raises(WeightsError, match=rf"{text_file} is not a readable safetensors file .*header too large"):
        StableDiffusionBackbone(str(bad))
    shutil.copy(Path(tiny_sd) / "text_encoder" / "model.safetensors", text_file)
    break_header(unet_file)  # diffusers' loader: an OSError around it
    with pytest.raises(WeightsError, match=rf"{unet_file} is not a readable safetensors file .*header too large"):
        StableDiffusionBackbone(str(bad))


def test_non_finite_conditioning_stops_generation_naming_the_prompt_and_column(backbone, tiny_sd, tmp_path):
    """Finite weights, infinite output (a diverged run): the weights load, the images must not be drawn."""
    from diffusers import StableDiffusionPipeline

    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.generation.columns import Column
    from sur_lightning.generation.conditioning import (
        ConnectorConditioning,
        NonFiniteConditioningError,
        frozen_text_features,
    )
    from sur_lightning.generation.pipeline import render_columns

    sur = tiny_sur()
    with torch.no_grad():
        sur.fc.weight.fill_(3e38)  # finite, but fc's sum over 32 inputs overflows float32
    column = Column("sur", ConnectorConditioning(sur, frozen_text_features(backbone)))
    prompts = [Prompt("p0", "two red circles", "a")]
    with pytest.raises(
        NonFiniteConditioningError,
        match=r"column 'sur': SURAdapter gave non-finite conditioning "
        r"\(NaN or inf\) for prompt 'two red circles' at timestep",
    ):
        render_columns(backbone, [column], prompts, [0], tmp_path, num_inference_steps=2, progress=False)
    assert not (tmp_path / "images").exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    with sur_lightning.attach(pipe, sur), pytest.raises(NonFiniteConditioningError, match="'two red circles'"):
        pipe("two red circles", num_inference_steps=2)
