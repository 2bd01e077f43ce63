"""Train the toy world's base text-to-image model from scratch, on complex prompts only.

    python -m sur_lightning.toyworld.pretrain                       # the recipe of the shipped base
    python -m sur_lightning.toyworld.pretrain unet.steps=100 vae.steps=50 work_dir=/tmp/toy   # a quick run

Three stages, each resumable from ``work_dir`` (run the same command again after an interruption):

1. **VAE** (``AutoencoderKL``, x4: 64 px images -> 4x16x16 latents), trained on world images with an
   MSE reconstruction loss and a tiny KL term;
2. **latents** of ``unet.num_images`` random complex-prompt images, encoded once (mean and std of the
   latent distribution), and the VAE's ``scaling_factor`` set to 1 / std of the latents;
3. **UNet + CLIP text encoder**, trained jointly with ε-prediction on SD1.5's noise schedule, min-SNR
   weighting (``compute_snr``), caption dropout (so classifier-free guidance works) and an EMA of the
   weights, which is what gets exported.

The text encoder is a ``CLIPTextModel`` on the real CLIP tokenizer; it only ever sees the complex
vocabulary ("two red circles"), so every narrative word ("tomato") keeps its random initial embedding.
Every ``eval_every`` steps the EMA model samples every (count, colour, shape) with DDIM and CFG and the
programmatic checker scores it; ``log.jsonl`` holds the losses and accuracies. The result is saved in
the Stable Diffusion folder layout (fp16 safetensors) to ``export_dir`` with ``base.json``: the
recipe, the final accuracies and the SHA-256 of every weight file.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from sur_lightning.config import CONFIG_DIR
from sur_lightning.models.backbone import assemble_pipeline
from sur_lightning.toyworld import file_sha256
from sur_lightning.toyworld.base_model import (
    SD15_SCHEDULER,
    WEIGHT_FILES,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from sur_lightning.toyworld.world import IMAGE_SIZE, all_targets, complex_prompt, random_complex_example


def image_batch(rng: random.Random, batch_size: int) -> torch.Tensor:
    """[B, 3, 64, 64] in [-1, 1]: random complex-prompt world images."""
    images = [np.asarray(random_complex_example(rng)[0], dtype=np.float32) for _ in range(batch_size)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1


def linear_decay(optimizer, total: int, warmup: int = 0, final: float = 0.1):
    """Linear warm-up, then cosine decay to ``final`` × the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ stage 1: VAE


def train_vae(cfg: DictConfig, work: Path) -> torch.nn.Module:
    from tqdm.auto import tqdm

    final = work / "vae"
    vae = build_vae(**cfg.vae.model)
    if (final / "done").exists():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(final)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
    schedule = linear_decay(optimizer, cfg.vae.steps, warmup=50, final=0.05)
    start, ckpt = 0, work / "vae_state.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
    rng = random.Random(f"vae-{cfg.seed}-{start}")
    bar = tqdm(range(start, cfg.vae.steps), desc="vae", initial=start, total=cfg.vae.steps)
    for step in bar:
        images = image_batch(rng, cfg.vae.batch_size)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, images)
        loss = mse + cfg.vae.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if (step + 1) % cfg.log_every == 0:
            append_log(work / "log.jsonl", {"stage": "vae", "step": step + 1, "mse": mse.item()})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae.steps:
            state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
            torch.save(state | {"step": step + 1}, ckpt)
    vae.eval()
    vae.save_pretrained(final)
    (final / "done").touch()
    return vae


# ------------------------------------------------------------------------------------ stage 2: latents


@torch.no_grad()
def encode_dataset(cfg: DictConfig, work: Path, vae) -> dict:
    from tqdm.auto import tqdm

    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    rng = random.Random(f"latents-{cfg.seed}")
    means, stds, prompts = [], [], []
    vae.eval()
    batch = 128
    for start in tqdm(range(0, cfg.unet.num_images, batch), desc="encoding"):
        images, texts = [], []
        for _ in range(min(batch, cfg.unet.num_images - start)):
            image, prompt, _ = random_complex_example(rng)
            images.append(np.asarray(image, dtype=np.float32))
            texts.append(prompt)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        prompts += texts
    mean, std = torch.cat(means), torch.cat(stds)
    scaling_factor = float(1.0 / (mean + std * torch.randn_like(std)).std())
    data = {"mean": mean.half(), "std": std.half(), "prompts": prompts, "scaling_factor": scaling_factor}
    torch.save(data, path)
    return data


# ------------------------------------------------------------------------------------ stage 3: UNet


@torch.no_grad()
def sample_accuracy(pipeline_parts, seeds, guidance_scale: float, steps: int, batch_size: int = 54) -> dict:
    """Sample every (count, colour, shape) once per seed with DDIM + CFG; the checker's accuracies."""
    from diffusers import DDIMScheduler

    from sur_lightning.evaluation.metrics import shapes

    pipeline = assemble_pipeline(*pipeline_parts, DDIMScheduler.from_config(SD15_SCHEDULER))
    pipeline.set_progress_bar_config(disable=True)
    jobs = [(target, seed) for seed in seeds for target in all_targets()]
    checks = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        generators = [torch.Generator().manual_seed(1000 + seed * 100 + j) for j, (_, seed) in enumerate(chunk)]
        images = pipeline(
            [complex_prompt(*t) for t, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
        ).images
        checks += [shapes.check(image, target=t) for image, (t, _) in zip(images, chunk)]
    return {f"{k}_accuracy": float(np.mean([c[k] for c in checks])) for k in ("count", "color", "shape", "exact")}


def train_unet(cfg: DictConfig, work: Path, vae, latents: dict):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(work / "tokenizer_src")
    text_encoder = build_text_encoder(**cfg.text_encoder)
    unet = build_unet(**cfg.unet.model)
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet.lr, weight_decay=cfg.unet.weight_decay)
    schedule = linear_decay(optimizer, cfg.unet.steps, warmup=cfg.unet.warmup, final=0.1)
    ema = EMAModel(params, decay=cfg.unet.ema_decay)
    start, ckpt = 0, work / "unet_state.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    vocabulary = sorted(set(latents["prompts"]))
    token_ids = tokenizer(vocabulary + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    index_of = {p: i for i, p in enumerate(vocabulary)}
    prompt_index = torch.tensor([index_of[p] for p in latents["prompts"]])
    mean, std, scale = latents["mean"].float(), latents["std"].float(), latents["scaling_factor"]
    n = mean.shape[0]

    def evaluate(step: int) -> dict:
        ema.store(params)
        ema.copy_to(params)
        unet.eval(), text_encoder.eval()
        vae.config.scaling_factor = scale
        try:
            acc = sample_accuracy((vae, text_encoder, tokenizer, unet), [0], cfg.eval.guidance_scale, cfg.eval.steps)
        finally:
            ema.restore(params)
            unet.train(), text_encoder.train()
        append_log(work / "log.jsonl", {"stage": "unet", "step": step, "eval": acc})
        return acc

    bar = tqdm(range(start, cfg.unet.steps), desc="unet", initial=start, total=cfg.unet.steps)
    unet.train(), text_encoder.train()
    losses, tic = [], time.time()
    for step in bar:
        rows = torch.randint(0, n, (cfg.unet.batch_size,))
        clean = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * scale
        ids = prompt_index[rows].clone()
        ids[torch.rand(len(ids)) < cfg.unet.caption_dropout] = len(vocabulary)  # the empty prompt
        states = text_encoder(token_ids[ids])[0]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),))
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=cfg.unet.snr_gamma) / snr  # min-SNR-γ for ε-prediction
        loss = (weights * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        losses.append(per_sample.mean().item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % cfg.log_every == 0:
            row = {"stage": "unet", "step": step + 1, "loss": float(np.mean(losses[-cfg.log_every :]))}
            append_log(
                work / "log.jsonl",
                row | {"lr": schedule.get_last_lr()[0], "s_per_step": (time.time() - tic) / len(losses)},
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet.steps:
            state = {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "ema": ema.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": step + 1,
            }
            torch.save(state, work / "unet_state.tmp")
            (work / "unet_state.tmp").replace(ckpt)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.unet.steps:
            bar.write(f"step {step + 1}: {evaluate(step + 1)}")
    ema.copy_to(params)
    unet.eval(), text_encoder.eval()
    return tokenizer, text_encoder, unet


# ------------------------------------------------------------------------------------ export


def export(cfg: DictConfig, export_dir: Path, vae, tokenizer, text_encoder, unet, scaling_factor: float) -> dict:
    """Save in SD1.5's folder layout with fp16 weights, and ``base.json`` with the recipe, accuracies and hashes."""
    from diffusers import PNDMScheduler

    vae.config.scaling_factor = scaling_factor
    vae.register_to_config(scaling_factor=scaling_factor)
    # SD1.5 ships a PNDM scheduler config; the same file serves DDPM training and DDIM sampling.
    pipeline = assemble_pipeline(vae, text_encoder, tokenizer, unet, PNDMScheduler.from_config(SD15_SCHEDULER))
    accuracy = sample_accuracy(
        (vae, text_encoder, tokenizer, unet), list(cfg.eval.final_seeds), cfg.eval.guidance_scale, cfg.eval.steps
    )
    pipeline.to(torch.float16).save_pretrained(export_dir, safe_serialization=True)
    scheduler_file = export_dir / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(
        json.dumps(
            SD15_SCHEDULER | {"_diffusers_version": json.loads(scheduler_file.read_text())["_diffusers_version"]},
            indent=2,
        )
    )
    parameters = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    record = {
        "command": "python -m sur_lightning.toyworld.pretrain " + " ".join(cfg.get("overrides", [])),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "parameters": parameters,
        "scaling_factor": scaling_factor,
        "accuracy": accuracy
        | {"seeds": list(cfg.eval.final_seeds), "images": len(cfg.eval.final_seeds) * len(all_targets())},
        "sampler": {"scheduler": "ddim", "steps": cfg.eval.steps, "guidance_scale": cfg.eval.guidance_scale},
        "sha256": {name: file_sha256(export_dir / name) for name in WEIGHT_FILES},
    }
    (export_dir / "base.json").write_text(json.dumps(record, indent=2))
    return record


def pretrain(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads) if cfg.threads else None
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    vae = train_vae(cfg, work)
    latents = encode_dataset(cfg, work, vae)
    tokenizer, text_encoder, unet = train_unet(cfg, work, vae, latents)
    record = export(cfg, Path(cfg.export_dir), vae, tokenizer, text_encoder, unet, latents["scaling_factor"])
    print(json.dumps({"accuracy": record["accuracy"], "parameters": record["parameters"]}, indent=2))
    print(f"exported to {cfg.export_dir}")
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="toyworld_pretrain")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_struct(cfg, False)
    cfg.overrides = list(HydraConfig.get().overrides.task)
    pretrain(cfg)


if __name__ == "__main__":
    main()
