"""Train the toy world's image tower: a contrastive image–text space for unCLIP and an offline CLIP score.

    python -m sur_lightning.toyworld.image_tower                                  # the shipped tower's recipe
    python -m sur_lightning.toyworld.image_tower export_dir=sur_lightning/toyworld/base/image_tower   # ship it
    python -m sur_lightning.toyworld.image_tower steps=20 eval.images_per_target=2 export_dir=/tmp/tower  # quick

The tower (``models/image_tower.py``: four stride-2 convolutions, global pooling, a linear head) learns to put a
world image next to the frozen base text encoder's pooled state of its complex prompt ("two red circles"), seen
through a learned linear head, with CLIP's symmetric InfoNCE and a learned temperature. Every step draws one fresh
image of each of the 54 (count, colour, shape) targets, so no two rows of a batch share a text.

The gate (issue 34): on fresh images from a stream training never draws from, the target whose text embedding is
nearest to the image's must be the image's own (count, colour, shape) for at least ``eval.gate`` of them. The
tower is saved to ``export_dir`` (``config.json``, safetensors weights) with ``image_tower.json``: the recipe, the
reproducing command, the measured retrieval, the environment and the SHA-256 of the weights, checked on every load
(``sur_lightning.toyworld.shipped_image_tower``). With ``threads`` fixed the weights are the same bit for bit on a
rerun on the same CPU model and library versions. About 30 s on one core.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sur_lightning.config import CONFIG_DIR
from sur_lightning.models.image_tower import ImageTower, pooled_text_states
from sur_lightning.runtime import environment, pin_threads
from sur_lightning.toyworld import IMAGE_TOWER_RECORD, file_sha256, shipped_base
from sur_lightning.toyworld.world import IMAGE_SIZE, all_targets, complex_prompt, draw_example

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # the name diffusers' save_pretrained gives safetensors weights


def to_pixels(images) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def draw_targets(targets, rng: random.Random):
    """One fresh image per target, in the targets' order."""
    return [draw_example(*target, rng) for target in targets]


def fingerprint(image) -> bytes:
    """A short digest of an image's pixels (to find held-out images identical to a training image)."""
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def load_text_encoder(base: str):
    """The base's frozen CLIP tokenizer and text encoder (fp32, eval)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float32)
    return tokenizer, text_encoder.eval().requires_grad_(False)


def draw_unseen(target, rng: random.Random, seen: set[bytes]):
    """A fresh image of ``target`` whose pixels differ from every training image (``seen``: their fingerprints);
    returns it and how many identical draws were skipped (single shapes have a few thousand placements)."""
    for skipped in range(1000):
        image = draw_example(*target, rng)
        if fingerprint(image) not in seen:
            return image, skipped
    raise RuntimeError(f"image tower evaluation: found no image of {target} unlike the training images")


@torch.no_grad()
def retrieval(
    tower: ImageTower,
    text_pooled: torch.Tensor,
    targets,
    images_per_target: int,
    seed: int,
    seen: set[bytes] = frozenset(),
) -> dict:
    """Top-1 retrieval over ``targets`` (their texts' pooled states ``text_pooled`` [T, P]) for ``images_per_target``
    fresh images of each target, none identical to a training image (``seen``: their ``fingerprint``s): the share
    whose nearest text is their own target's, and the shares whose nearest target has their count, colour, shape."""
    tower.eval()
    texts = tower.embed_texts(text_pooled)
    rng = random.Random(f"image-tower-eval-{seed}")
    hits = {"exact": 0, "count": 0, "color": 0, "shape": 0}
    skipped = 0
    for _ in range(images_per_target):
        images = []
        for target in targets:
            image, repeats = draw_unseen(target, rng, seen)
            images.append(image)
            skipped += repeats
        nearest = (tower.embed_images(to_pixels(images)) @ texts.T).argmax(dim=1)
        for target, index in zip(targets, nearest.tolist()):
            chosen = targets[index]
            hits["exact"] += chosen == target
            for k, name in enumerate(("count", "color", "shape")):
                hits[name] += chosen[k] == target[k]
    total = images_per_target * len(targets)
    return {f"top1_{name}": hits[name] / total for name in hits} | {
        "images": total,
        "seed": seed,
        "draws_skipped_as_identical_to_a_training_image": skipped,
    }


def train(cfg: DictConfig) -> tuple[ImageTower, dict, dict]:
    """Train the tower; returns it, the retrieval measured on held-out images, and facts of the run (the last
    step's loss, the SHA-256 of the text encoder it read)."""
    from tqdm.auto import tqdm

    base = shipped_base(cfg.base)
    tokenizer, text_encoder = load_text_encoder(base)
    targets = all_targets()
    text_pooled = pooled_text_states(text_encoder, tokenizer, [complex_prompt(*t) for t in targets])

    torch.manual_seed(cfg.seed)
    tower = ImageTower(**OmegaConf.to_container(cfg.model), text_dim=text_pooled.shape[1], image_size=IMAGE_SIZE)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(f"image-tower-train-{cfg.seed}")
    seen: set[bytes] = set()  # the training images' fingerprints: held-out images must differ from all
    tower.train()
    bar = tqdm(range(cfg.steps), desc="image tower")
    for _step in bar:
        images = draw_targets(targets, rng)
        seen.update(fingerprint(image) for image in images)
        loss = tower.contrastive_loss(to_pixels(images), text_pooled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", temperature=f"{1 / tower.temperature_scale().item():.3f}")
    measured = retrieval(tower, text_pooled, targets, cfg.eval.images_per_target, cfg.eval.seed, seen)
    measured["gate"] = cfg.eval.gate
    measured["passed"] = measured["top1_exact"] >= cfg.eval.gate
    trained = {
        "final_loss": loss.item(),
        "text_encoder_sha256": file_sha256(Path(base) / "text_encoder" / "model.safetensors"),
    }
    return tower, measured, trained


def export(cfg: DictConfig, tower: ImageTower, measured: dict, trained: dict, seconds: float) -> dict:
    """Save the tower and ``image_tower.json`` (recipe, command, retrieval, SHA-256) to ``cfg.export_dir``."""
    export_dir = Path(cfg.export_dir)
    tower.save_pretrained(export_dir, safe_serialization=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("paths", None)  # this machine's folders, not part of the recipe
    record = {
        "command": " ".join(["python -m sur_lightning.toyworld.image_tower", *cfg.get("overrides", [])]),
        "config": config,
        "text_encoder": {
            "base": "shipped" if cfg.base is None else str(cfg.base),
            "file": "text_encoder/model.safetensors",
            "sha256": trained["text_encoder_sha256"],
        },
        "parameters": sum(p.numel() for p in tower.parameters()),
        "retrieval": measured,
        "final_loss": trained["final_loss"],
        "seconds": round(seconds, 1),
        "environment": environment(),
        "sha256": {WEIGHTS_FILE: file_sha256(export_dir / WEIGHTS_FILE)},
    }
    (export_dir / IMAGE_TOWER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="toyworld_image_tower")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_struct(cfg, False)
    cfg.overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    pin_threads(cfg.threads)
    tic = time.time()
    tower, measured, trained = train(cfg)
    record = export(cfg, tower, measured, trained, time.time() - tic)
    print(json.dumps({"retrieval": record["retrieval"], "sha256": record["sha256"]}, indent=2))
    print(f"exported to {cfg.export_dir}")
    if not record["retrieval"]["passed"]:
        print(f"WARNING: top-1 retrieval {record['retrieval']['top1_exact']:.3f} is below the gate {cfg.eval.gate}")


if __name__ == "__main__":
    main()
