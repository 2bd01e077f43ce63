"""EMA of the connector weights (callbacks/ema=on): what it averages, what uses it, and that it survives a resume."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from sur_lightning.train import train
from sur_lightning.training.callbacks import AdapterExport, ConnectorEMA


class Snapshots(L.Callback):
    """The connector's raw trainable weights before training and after every step."""

    def __init__(self):
        self.weights = []

    def take(self, pl_module):
        self.weights.append({n: p.detach().clone() for n, p in ConnectorEMA.parameters(pl_module).items()})

    def on_fit_start(self, trainer, pl_module):
        self.take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.take(pl_module)


def test_exported_adapter_and_sample_grid_use_the_ema_average_not_the_raw_weights(compose, tmp_path, monkeypatch):
    from PIL import Image

    from sur_lightning.training import callbacks

    rendered_with = []

    def render(pl_module, prompts, seeds, **kwargs):
        rendered_with.append({n: p.detach().clone() for n, p in ConnectorEMA.parameters(pl_module).items()})
        return [Image.new("RGB", (8, 8))] * len(prompts), [Image.new("RGB", (8, 8))] * len(prompts)

    monkeypatch.setattr(callbacks, "render_base_and_adapter", render)
    cfg = compose("+experiment=sur_demo", "model.lr_scheduler.num_warmup_steps=0")
    torch.manual_seed(0)
    model, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    snapshots = Snapshots()
    grid = callbacks.SampleGrid(tmp_path / "samples", prompts=["a", "b"], seeds=[0, 1])
    ema = ConnectorEMA(decay=0.5, warmup=False)
    validated_with_average = []

    class Validation(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            params = ConnectorEMA.parameters(pl_module)
            validated_with_average.append(all(torch.equal(p, ema.averages[n]) for n, p in params.items()))

    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ema, AdapterExport(tmp_path), grid, snapshots, Validation()],
    )
    trainer.fit(model, datamodule=datamodule)
    assert validated_with_average == [True]

    exported = load_file(tmp_path / "adapter.safetensors")
    theta0, theta1, theta2 = snapshots.weights
    for name, raw in theta2.items():
        # ema1 = ½θ0 + ½θ1, ema2 = ½ema1 + ½θ2
        expected = 0.25 * theta0[name] + 0.25 * theta1[name] + 0.5 * raw
        torch.testing.assert_close(exported[name], expected, rtol=1e-6, atol=1e-7)
    # ... and not the raw weights: they are ¼(θ2 − θ0) + ¼(θ2 − θ1) away, far above the tolerance.
    assert max((exported[n] - theta2[n]).abs().max().item() for n in theta2) > 1e-4
    (sampled,) = rendered_with  # the grid at the end of training
    assert all(torch.equal(sampled[n], exported[n]) for n in exported)
    # Training goes on with the raw weights: the export and the grid swapped them back.
    assert all(torch.equal(p, theta2[n]) for n, p in ConnectorEMA.parameters(model).items())


def test_diffusers_warmup_decay_and_bad_decay_named():
    ema = ConnectorEMA(decay=0.99)
    assert [ema.decay_at(t) for t in (0, 1, 2)] == [1 / 10, 2 / 11, 3 / 12]
    assert ema.decay_at(10_000) == 0.99
    assert ConnectorEMA(decay=0.99, warmup=False).decay_at(0) == 0.99
    with pytest.raises(ValueError, match="callbacks.ema.decay"):
        ConnectorEMA(decay=1.0)


@pytest.mark.slow
def test_ema_state_survives_ckpt_path_resume(compose, tmp_path):
    common = (
        "+experiment=sur_demo",
        "callbacks/ema=on",
        "callbacks.ema.decay=0.5",
        "callbacks.sample_grid=null",
        "trainer.val_check_interval=100000",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    whole = compose(*common, "trainer.max_steps=3", f"paths.output_dir={tmp_path / 'whole'}")
    train(whole)
    first = compose(*common, "trainer.max_steps=2", f"paths.output_dir={tmp_path / 'parts'}")
    train(first)
    saved = torch.load(tmp_path / "parts" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["ConnectorEMA"]["updates"] == 2
    rest = compose(*common, "trainer.max_steps=3", f"paths.output_dir={tmp_path / 'parts'}", "ckpt_path=last")
    train(rest)
    assert json.loads((tmp_path / "parts" / "metrics.json").read_text())["global_step"] == 3
    a, b = (load_file(Path(tmp_path / d / "adapter.safetensors")) for d in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)
