"""The training step: what receives gradients, and what one optimizer step changes."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate


def build(compose, *overrides):
    cfg = compose(*overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return cfg, model, batch


def denoising_only(compose, experiment):
    # Alignment losses off, so any gradient on the adapter comes from the denoising loss alone.
    return build(compose, f"+experiment={experiment}", "model.prompt_loss=null", "model.llm_loss=null")


def adapter_grad_norm(model) -> float:
    return sum(p.grad.abs().sum().item() for p in model.connector.parameters() if p.grad is not None)


def test_denoising_gradient_reaches_the_adapter_in_sur_paper(compose):
    _, model, batch = denoising_only(compose, "sur_paper")
    model.training_step(batch, 0).backward()
    assert adapter_grad_norm(model) > 0
    assert model.connector.fc.weight.grad.abs().sum() > 0


def test_denoising_gradient_is_cut_in_sur_released(compose):
    _, model, batch = denoising_only(compose, "sur_released")
    loss = model.training_step(batch, 0)
    assert not loss.requires_grad  # nothing trainable sees the denoising loss
    _, model, batch = build(compose, "+experiment=sur_released")
    model.training_step(batch, 0).backward()
    # With the alignment terms on, only they move the adapter.
    assert adapter_grad_norm(model) > 0


def test_only_the_connector_is_trainable(compose):
    _, model, _ = build(compose, "+experiment=cosine_eta_adaptive")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("connector.") for name in trainable)
    assert any(name.startswith("connector.eta.") for name in trainable)
    assert "connector.llm_projection.weight" in trainable


def test_one_optimizer_step_changes_only_trainable_parameters(compose, tmp_path):
    cfg, model, _ = build(compose, "+experiment=cosine_eta_adaptive")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=instantiate(cfg.data))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    for frozen in ("backbone.unet.", "backbone.vae.", "backbone.text_encoder.", "llm."):
        names = [n for n in before if n.startswith(frozen)]
        assert names, frozen
        assert all(torch.equal(model.get_parameter(n).detach(), before[n]) for n in names), frozen


def test_checkpoint_holds_only_the_connector(compose, tmp_path):
    cfg, model, _ = build(compose, "+experiment=sur_paper")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=instantiate(cfg.data))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    state = torch.load(tmp_path / "x.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith("connector.") for k in state)
    fresh = instantiate(cfg.model)
    fresh.load_state_dict(state, strict=False)
    for name, p in model.connector.state_dict().items():
        assert torch.equal(fresh.connector.state_dict()[name], p)


def test_validation_loss_is_deterministic(compose):
    _, model, batch = build(compose, "+experiment=sur_paper")
    model.log = lambda *a, **k: None
    assert model.validation_step(batch, 3).item() == model.validation_step(batch, 3).item()


@pytest.mark.parametrize("kind", ["kl", "cosine", "mse"])
def test_each_alignment_kind_trains(compose, kind):
    _, model, batch = build(compose, "+experiment=sur_paper", f"loss.prompt.kind={kind}", f"loss.llm.kind={kind}")
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_caption_dropout_with_alignment_aligns_dropped_rows_to_the_empty_prompt(compose, rate):
    # The connector's output for "" (the negative prompt at generation) is trained towards CLIP(""), and the
    # LLM distillation then reads the empty prompt's state: what the encoders are asked for shows it.
    _, model, batch = build(compose, "+experiment=sur_paper", f"model.caption_dropout={rate}")
    seen = {"text": [], "clip": []}
    text_features, clip_features = model.text_features, model.clip_features
    model.text_features = lambda prompts: seen["text"].append(list(prompts)) or text_features(prompts)
    model.clip_features = lambda prompts: seen["clip"].append(list(prompts)) or clip_features(prompts)
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    n = len(batch["simple_prompt"])
    if rate:
        assert seen == {"text": [[""] * n], "clip": [[""] * n]}
    else:
        assert seen == {"text": [list(batch["simple_prompt"])], "clip": [list(batch["complex_prompt"])]}
    loss.backward()
    assert model.connector.fc.weight.grad.abs().sum() > 0


def test_eta_histogram_reaches_tensorboard(compose, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    cfg, model, _ = build(compose, "+experiment=cosine_eta_adaptive", "model.eta_histogram_every_n_steps=1")
    logger = TensorBoardLogger(tmp_path / "tb", name="")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=instantiate(cfg.data))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logger.log_dir)).Reload()
    assert "train/eta" in events.Tags()["histograms"]


def nan_on_calls(monkeypatch, bad_calls):
    """Make the denoising loss NaN on the given (1-based) calls."""
    from sur_lightning.training.losses import DenoisingLoss

    real, calls = DenoisingLoss.__call__, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        value = real(self, *args, **kwargs)
        return value * float("nan") if bad_calls(len(calls)) else value

    monkeypatch.setattr(DenoisingLoss, "__call__", flaky)


def fit(cfg, model, max_steps, callbacks=()):
    import lightning as L

    trainer = L.Trainer(
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=instantiate(cfg.data))
    return trainer


def test_a_nonfinite_loss_skips_its_step_without_touching_the_weights(compose, monkeypatch):
    import lightning as L

    cfg, model, _ = build(compose, "+experiment=sur_demo", "model.lr_scheduler.num_warmup_steps=0")
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({k: v.clone() for k, v in pl_module.connector.state_dict().items()})

    initial = {k: v.clone() for k, v in model.connector.state_dict().items()}
    nan_on_calls(monkeypatch, lambda call: call in (2, 3))
    trainer = fit(cfg, model, max_steps=4, callbacks=[Snapshot()])

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # Lightning still counts a skipped step (its optimizer call finds no gradients), so 4 batches, 4 steps.
    assert trainer.global_step == 4 and len(snapshots) == 4
    assert not same(snapshots[0], initial)
    assert same(snapshots[1], snapshots[0]) and same(snapshots[2], snapshots[0])  # no update, no weight decay
    assert not same(snapshots[3], snapshots[2])
    assert model.nonfinite_skipped == 2 and model.nonfinite_in_a_row == 0
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 2


def test_too_many_nonfinite_losses_in_a_row_stop_training(compose, monkeypatch):
    cfg, model, _ = build(compose, "+experiment=sur_demo", "model.max_nonfinite_in_a_row=3")
    nan_on_calls(monkeypatch, lambda call: call >= 2)
    with pytest.raises(RuntimeError, match=r"3 non-finite losses in a row \(step 3: denoising=nan"):
        fit(cfg, model, max_steps=10)


def unet_inputs_by_id(model, batch) -> dict[str, tuple[torch.Tensor, int]]:
    """Run one training step and return, per sample id, the noisy latent [4,h,w] and timestep the UNet saw."""
    seen = {}
    real = model.backbone.predict

    def spy(noisy, timesteps, conditioning, *added):
        seen.update({i: (noisy[k].clone(), int(timesteps[k])) for k, i in enumerate(batch["id"])})
        return real(noisy, timesteps, conditioning, *added)

    model.backbone.predict = spy
    try:
        model.training_step(batch, 0)
    finally:
        del model.backbone.predict
    return seen


def test_training_draws_are_keyed_by_sample_not_by_batch_layout_or_global_rng(compose):
    """Noise, timestep and VAE latent sample depend on (seed, epoch, step, sample id) only: the same sample
    gets the same noisy latent and timestep in a batch of 4 as in a batch of 2, whatever the global RNG."""
    _, model, batch = build(compose, "+experiment=sur_demo", "data.batch_size=4")
    model.log = lambda *a, **k: None
    torch.manual_seed(1)
    whole = unet_inputs_by_id(model, batch)
    halves = {}
    for part, seed in ((slice(0, 2), 2), (slice(2, 4), 3)):
        torch.manual_seed(seed)
        sub = {k: v[part] for k, v in batch.items() if k != "data_events"}
        halves |= unet_inputs_by_id(model, sub)
    assert whole.keys() == halves.keys() and len(whole) == 4
    for sample_id, (noisy, t) in whole.items():
        assert t == halves[sample_id][1]
        torch.testing.assert_close(noisy, halves[sample_id][0], rtol=0, atol=1e-6)
    # Another step draws afresh (global_step is a property Lightning reads from the trainer).
    from unittest import mock

    with mock.patch.object(type(model), "global_step", new_callable=mock.PropertyMock, return_value=7):
        later = unet_inputs_by_id(model, batch)
    assert any(later[i][1] != whole[i][1] for i in whole)
    assert all(not torch.allclose(later[i][0], whole[i][0]) for i in whole)


def test_teacher_prediction_is_the_mse_to_the_frozen_unet_under_clip_of_the_complex_prompt(compose):
    _, model, batch = build(
        compose,
        "+experiment=sur_paper",
        "+loss/teacher=unet",
        "loss.teacher_prediction.weight=2.0",
        "model.prompt_loss=null",
        "model.llm_loss=null",
    )
    calls, logged = [], {}
    predict = model.backbone.predict

    def recording_predict(latents, timesteps, conditioning, *added):  # added: SDXL's pooled and time ids (None here)
        out = predict(latents, timesteps, conditioning, *added)
        calls.append((latents, timesteps, conditioning, out))
        return out

    model.backbone.predict = recording_predict
    model.log_training = lambda loss, losses, out, batch_size: logged.update(losses)
    loss = model.training_step(batch, 0)
    (student_x, student_t, _, student), (teacher_x, teacher_t, teacher_c, teacher) = calls
    assert torch.equal(teacher_x, student_x) and torch.equal(teacher_t, student_t)  # same x_t and t
    torch.testing.assert_close(teacher_c, model.clip_features(batch["complex_prompt"]).clip)
    assert not teacher.requires_grad  # the teacher is frozen and takes no gradient
    torch.testing.assert_close(logged["teacher_prediction"], torch.nn.functional.mse_loss(student, teacher))
    torch.testing.assert_close(loss, logged["denoising"] + 2.0 * logged["teacher_prediction"])

    # The term on its own moves the adapter's output layer (zero-initialised, so nothing else would).
    model.connector.zero_grad()
    logged["teacher_prediction"].backward()
    assert model.connector.fc.weight.grad.abs().sum() > 0


def test_teacher_prediction_is_refused_where_it_cannot_reach_the_connector_or_has_no_target(compose):
    with pytest.raises(Exception, match="denoise_grad_to_connector=true"):
        instantiate(compose("+experiment=sur_released", "+loss/teacher=unet").model)
    with pytest.raises(Exception, match="caption_dropout=0.1 cannot be combined"):
        instantiate(
            compose(
                "+experiment=sur_paper",
                "+loss/teacher=unet",
                "model.prompt_loss=null",
                "model.llm_loss=null",
                "model.caption_dropout=0.1",
            ).model
        )
    from sur_lightning.training.losses import TeacherPredictionLoss

    with pytest.raises(ValueError, match="weight must be positive"):
        TeacherPredictionLoss(weight=0)
