"""The benchmark's measurements (``python -m sur_lightning.bench``): the floor of a connector's training step (the
frozen UNet's forward and the backward to its conditioning), the real training step split into its parts with a
warm feature cache and without, memory growth after the warm-up, and generation latency with and without the
connector. Measures only; nothing is asserted.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from sur_lightning.runtime import cpu_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds per named phase, summed over the timed steps (synchronising the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self.active = True

    @contextmanager
    def phase(self, name: str):
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        if self.active:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started


def forward_timer(module: torch.nn.Module, stopwatch: Stopwatch, name: str):
    """Hooks that add ``module``'s forward time to ``name``; returns the handles."""
    state = {}

    def before(*_):
        synchronize(stopwatch.device)
        state["t"] = time.perf_counter()

    def after(*_):
        synchronize(stopwatch.device)
        if stopwatch.active:
            stopwatch.totals[name] = stopwatch.totals.get(name, 0.0) + time.perf_counter() - state["t"]

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def autocast(precision, device: torch.device):
    """The autocast Lightning's ``trainer.precision`` puts around each training step (``bf16-mixed`` / ``16-mixed``),
    from Lightning's own precision plugin: the benchmark has no Trainer to apply it."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    precision = str(precision)
    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, device.type).autocast_context_manager()
    if precision not in ("32", "32-true", "None"):
        raise ValueError(f"bench: trainer.precision={precision} is not measured; use 32-true, bf16-mixed or 16-mixed")
    return nullcontext()


def machine() -> dict:
    import diffusers
    import lightning

    info = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "lightning": lightning.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory now (the peak never falls, so it would hide a leak behind an early high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the peak
        return peak_rss_mb()


def memory_now_mb(device: torch.device) -> float:
    """What a leak would grow: CUDA memory held by tensors on a GPU, resident memory on a CPU."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else current_rss_mb()


def batches(datamodule, device):
    while True:
        for batch in datamodule.train_dataloader():
            batch = datamodule.on_before_batch_transfer(batch, 0)
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_step_time(datamodule, module, optimizer, device, steps: int, warmup: int, precision=None) -> dict:
    """Seconds per full step and per phase, over ``steps`` steps after ``warmup``, under ``precision``
    (``trainer.precision``), of ``module`` (built as train.py builds it) on ``datamodule``'s batches."""
    stopwatch = Stopwatch(device)
    hooks = forward_timer(module.connector, stopwatch, "connector") + forward_timer(
        module.backbone.unet, stopwatch, "unet_forward"
    )
    data = batches(datamodule, device)
    memory = []
    for step in range(warmup + steps):
        stopwatch.active = step >= warmup
        with stopwatch.phase("data"):
            batch = next(data)
        with stopwatch.phase("forward"), autocast(precision, device):
            loss = module.training_step(batch, step)
        with stopwatch.phase("backward"):
            loss.backward()
        with stopwatch.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        memory.append(memory_now_mb(device))
    for hook in hooks:
        hook.remove()
    totals = {k: v / steps for k, v in stopwatch.totals.items()}
    # The forward phase includes the connector and UNet forwards; report what is left of it on its own.
    totals["other_forward"] = totals.pop("forward") - totals.get("connector", 0.0) - totals.get("unet_forward", 0.0)
    totals["step"] = sum(
        totals[k] for k in ("data", "connector", "unet_forward", "other_forward", "backward", "optimizer")
    )
    # Growth from the end of the warm-up to the last step: 0 for a step that frees all it allocates.
    first = memory[warmup - 1] if warmup else memory[0]
    return {
        "seconds": totals,
        "batch_size": int(datamodule.batch_size),
        "memory_growth_mb": memory[-1] - first,
        "module": module,
        "batch": batch,
        "optimizer": optimizer,
        "data": data,
    }


def step_time(module, optimizer, data, device, step: int, precision=None) -> float:
    """Seconds for one whole training step: the next batch, the forward, the backward and the optimizer."""
    synchronize(device)
    started = time.perf_counter()
    batch = next(data)
    with autocast(precision, device):
        loss = module.training_step(batch, step)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def floor_ratio_rounds(module, optimizer, data, batch, device, rounds: int, steps: int, precision=None) -> dict:
    """The warm step against the floor, measured in alternating rounds: each round times ``steps`` floors, then
    ``steps`` whole training steps, and takes the ratio of their medians. A shared machine's load drifts over
    seconds; alternating puts both measurements under the same drift, and the spread over rounds shows how
    much remains. A step contains the floor's work, so a ratio below 1 is noise, and is flagged as such."""
    floors, step_times, ratios = [], [], []
    for _ in range(rounds):
        floor = floor_time(module, batch, device, steps, 1, precision)
        step = statistics.median(step_time(module, optimizer, data, device, i, precision) for i in range(steps))
        floors.append(floor)
        step_times.append(step)
        ratios.append(step / floor)
    median = statistics.median(ratios)
    return {
        "rounds": rounds,
        "steps_per_round": steps,
        "ratios": ratios,
        "ratio_median": median,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "floor_median_s": statistics.median(floors),
        "step_median_s": statistics.median(step_times),
        "below_one": median < 1.0,
    }


def floor_time(module, batch, device, steps: int, warmup: int, precision=None) -> float:
    """Seconds for the frozen UNet's forward plus the backward to its conditioning input (SDXL: and the pooled
    embedding), alone."""
    scheduler = module.backbone.noise_scheduler
    with torch.no_grad():
        latents = module.latents(batch)
        out = module.condition(batch["simple_prompt"], torch.zeros(latents.shape[0], device=device))
        conditioning, pooled = out.conditioning, out.pooled
    # SDXL: the pooled embedding is a conditioning input too, and the time ids come from the batch.
    time_ids = module.backbone.batch_time_ids(batch, latents)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    times = []
    for step in range(warmup + steps):
        leaf = conditioning.detach().requires_grad_(True)
        pooled_leaf = None if pooled is None else pooled.detach().requires_grad_(True)
        synchronize(device)
        started = time.perf_counter()
        with autocast(precision, device):
            prediction = module.backbone.predict(noisy, timesteps, leaf, pooled_leaf, time_ids)
        torch.nn.functional.mse_loss(prediction.float(), noise.float()).backward()
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def inference_latency(module, device, prompt: str, steps: int, repeats: int) -> dict:
    """Seconds for one prompt through the pipeline, base vs connector, median of ``repeats``."""
    from sur_lightning.generation.conditioning import ClipConditioning, ConnectorConditioning, frozen_text_features
    from sur_lightning.generation.pipeline import build_pipeline, render

    pipeline = build_pipeline(module.backbone)
    pipeline.set_progress_bar_config(disable=True)
    module.connector.eval()
    columns = {
        "base": ClipConditioning(frozen_text_features(module.backbone)),
        "connector": ConnectorConditioning(module.connector, module.text_features),
    }
    # The two renders' difference is read against UNet-dominated times that vary by several % between calls on
    # a shared machine; the time inside the connector's own calls is the overhead without that noise.
    stopwatch = Stopwatch(device)
    hooks = forward_timer(module.connector, stopwatch, "connector")
    result = {}
    for name, conditioning in columns.items():
        times = []
        for repeat in range(repeats + 1):  # the first call warms up
            stopwatch.active = repeat > 0
            synchronize(device)
            started = time.perf_counter()
            with torch.no_grad():
                render(pipeline, conditioning, [prompt], [0], num_inference_steps=steps, guidance_scale=4.0)
            synchronize(device)
            times.append(time.perf_counter() - started)
        result[name] = statistics.median(times[1:])
    for hook in hooks:
        hook.remove()
    result["ratio"] = result["connector"] / result["base"]
    result["connector_calls_s"] = stopwatch.totals.get("connector", 0.0) / repeats
    result["connector_calls_share"] = result["connector_calls_s"] / result["base"]
    return result


def table(result: dict) -> str:
    ms = lambda s: f"{1000 * s:.1f}"
    lines = []
    if "warm_cache" in result:
        lines += [
            "| phase | warm cache (ms/step) | cache off: every encoder every step, as the official loop (ms/step) |",
            "|---|---|---|",
        ]
        cold = result.get("cache_off", {})
        for phase in ("data", "connector", "unet_forward", "other_forward", "backward", "optimizer", "step"):
            lines.append(
                f"| {phase} | {ms(result['warm_cache'][phase])} | {ms(cold[phase]) if phase in cold else '–'} |"
            )
        lines.append(f"| floor (UNet fwd + bwd to conditioning) | {ms(result['floor_s'])} | |")
        rounds = result.get("floor_ratio")
        spread = (
            f" (median of {rounds['rounds']} alternating rounds; range {rounds['ratio_min']:.2f}–{rounds['ratio_max']:.2f})"
            if rounds
            else ""
        )
        flag = (
            "\nBELOW 1: a step cannot cost less than the floor it contains, so the machine's noise is larger than "
            "this figure's precision; rerun on an idle machine or with more bench.ratio_rounds"
            if rounds and rounds["below_one"]
            else ""
        )
        lines.append(
            f"\nwarm step / floor: {result['warm_cache_ratio_to_floor']:.2f}×{spread}{flag}"
            + (
                f"; warm step / cache-off step: {result['warm_cache_ratio_to_cache_off']:.2f}× "
                f"(cache speed-up {result['cache_speedup']:.2f}×)"
                if "cache_speedup" in result
                else ""
            )
        )
    if "inference" in result:
        inf = result["inference"]
        lines.append(
            f"pipeline, one prompt: base {ms(inf['base'])} ms, with connector {ms(inf['connector'])} ms "
            f"(×{inf['ratio']:.3f}); inside the connector's calls {ms(inf['connector_calls_s'])} ms "
            f"= {100 * inf['connector_calls_share']:.2f} % of the base render"
        )
    held = "CUDA allocated" if "cuda_max_allocated_mb" in result else "RSS"
    growth = (
        f"; {held} growth over the {result['config']['steps']} timed steps {result['memory_growth_mb_over_steps']:.1f} MB"
        if "memory_growth_mb_over_steps" in result
        else ""
    )
    lines.append(
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
        + (
            f", CUDA max allocated {result['cuda_max_allocated_mb']:.0f} MB"
            if "cuda_max_allocated_mb" in result
            else ""
        )
        + growth
    )
    machine_info = result["machine"]
    lines.append(
        f"machine: {machine_info['cpu']}, {machine_info['threads']} threads, GPU {machine_info['gpu']}; "
        f"torch {machine_info['torch']}, diffusers {machine_info['diffusers']}, lightning {machine_info['lightning']}"
    )
    return "\n".join(lines)
