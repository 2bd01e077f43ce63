"""Why the SUR demo does not close the colour gap: how well can anything map the base's CLIP states of a
simple prompt onto those of its complex prompt, and what does each fit draw?

    python experiments/toyworld_benchmark/alignment_fit.py            # ~6 min on 2 CPU cores

The prompt-alignment term asks the adapter for CLIP(complex) token by token. Here that target is fitted
directly, without the UNet in the loop, on the adapter-train prompts, and each fit's output on the
held-out combinations is drawn by the frozen base and scored by the checker:

- ``sur_adapter``:    the project's SURAdapter (2 blocks, 8 heads, ff 2048), η = 1 so its output is the
                      conditioning, per-token MSE, AdamW — the most favourable setting for SUR's alignment;
- ``linear_mixing``:  a closed-form ridge map over all 77 × d numbers at once (tokens may move between
                      positions): what a linear map of the states can reach;
- ``linear_per_token``: one d × d ridge map shared by every position (no token moves).

R² is 1 − MSE / variance of the target over prompts: 0 is "predicts the average complex prompt".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sur_lightning.evaluation.metrics import shapes
from sur_lightning.models.connectors import TextFeatures
from sur_lightning.models.connectors.sur import SURAdapter
from sur_lightning.models.eta import FixedEta
from sur_lightning.toyworld import shipped_base
from sur_lightning.toyworld.world import make_splits, suite_rows


def load_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        shipped_base(), safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def clip_states(pipe, prompts: list[str]) -> torch.Tensor:
    """[N, 77, d] the base's CLIP states, as the UNet receives them."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def r_squared(prediction: torch.Tensor, target: torch.Tensor) -> float:
    mse = ((prediction - target) ** 2).mean()
    variance = ((target - target.mean(0)) ** 2).mean()
    return float(1 - mse / variance)


def fit_sur_adapter(simple, complex_, steps: int, lr: float, batch_size: int, seed: int):
    torch.manual_seed(seed)
    adapter = SURAdapter(dim=simple.shape[-1], llm_dim=8, eta=FixedEta(1.0), dropout=0.0)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, len(simple), (batch_size,))
        loss = ((adapter(TextFeatures(clip=simple[index])).conditioning - complex_[index]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapter.eval()
    return lambda states: adapter(TextFeatures(clip=states)).conditioning.detach()


def fit_ridge(simple, complex_, per_token: bool, ridge: float = 1e-2):
    """Closed-form ridge regression (with a bias) from simple to complex states."""
    if per_token:
        x = simple.reshape(-1, simple.shape[-1]).double()
        y = complex_.reshape(-1, complex_.shape[-1]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)

        def predict(states):
            flat = states.reshape(-1, states.shape[-1]).double()
            flat = torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], 1)
            return (flat @ weights).reshape(states.shape).float()

        return predict
    x_mean, y_mean = simple.double().mean(0), complex_.double().mean(0)
    x = (simple.double() - x_mean).flatten(1)
    y = (complex_.double() - y_mean).flatten(1)
    # Kernel form: N prompts ≪ 77·d numbers.
    dual = torch.linalg.solve(x @ x.T + ridge * torch.eye(len(x), dtype=x.dtype), y)

    def predict(states):
        k = (states.double() - x_mean).flatten(1) @ x.T
        return ((k @ dual).reshape(states.shape) + y_mean).float()

    return predict


@torch.no_grad()
def accuracy(pipe, conditioning: torch.Tensor, negative: torch.Tensor, rows: list[dict], steps: int) -> dict:
    generators = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    images = pipe(
        prompt_embeds=conditioning,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=generators,
        height=64,
        width=64,
    ).images
    checks = [shapes.check(image, target=(r["count"], r["color"], r["shape"])) for image, r in zip(images, rows)]
    return {k: float(np.mean([c[k] for c in checks])) for k in ("color", "shape", "count")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="SUR-adapter optimisation steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = load_pipeline()
    splits = make_splits(0)
    train, held = suite_rows(splits, "adapter_train"), suite_rows(splits, "held_out_combinations")
    simple, complex_ = clip_states(pipe, [r["prompt"] for r in train]), clip_states(pipe, [r["complex"] for r in train])
    held_simple, held_complex = (
        clip_states(pipe, [r["prompt"] for r in held]),
        clip_states(pipe, [r["complex"] for r in held]),
    )
    empty = clip_states(pipe, [""]).expand(len(held), -1, -1)

    rows = [("base + simple", None, held_simple, empty, None), ("base + complex", None, held_complex, empty, None)]
    started = time.time()
    fits = {
        "sur_adapter": fit_sur_adapter(simple, complex_, args.steps, args.lr, args.batch_size, args.seed),
        "linear_mixing": fit_ridge(simple, complex_, per_token=False),
        "linear_per_token": fit_ridge(simple, complex_, per_token=True),
    }
    print(f"fitted in {time.time() - started:.0f} s", flush=True)
    for name, predict in fits.items():
        fit = (r_squared(predict(simple), complex_), r_squared(predict(held_simple), held_complex))
        rows.append((name, fit, predict(held_simple), predict(empty), empty))

    print(
        f"\nHeld-out combinations ({len(held)} prompts, 1 seed each, DDIM {args.sample_steps}, CFG 4); "
        f"SUR-adapter: {args.steps} steps, lr {args.lr}, batch {args.batch_size}.\n"
    )
    print("Negative prompt: through the fit, as generation applies a connector to both CFG branches; and the base's")
    print('own CLIP("") (the fits never saw an empty prompt).\n')
    print(
        "| fit | R² adapter-train | R² held-out | colour / shape / count, negative through the fit | "
        'colour / shape / count, negative CLIP("") |\n|---|---|---|---|---|'
    )
    for name, fit, conditioning, negative, plain_negative in rows:
        scores = accuracy(pipe, conditioning, negative, held, args.sample_steps)
        cells = [f"{scores['color']:.2f} / {scores['shape']:.2f} / {scores['count']:.2f}"]
        if plain_negative is not None:
            plain = accuracy(pipe, conditioning, plain_negative, held, args.sample_steps)
            cells.append(f"{plain['color']:.2f} / {plain['shape']:.2f} / {plain['count']:.2f}")
        else:
            cells.append(cells[0])
        r2 = f"{fit[0]:.2f} | {fit[1]:.2f}" if fit else " | "
        print(f"| {name} | {r2} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
