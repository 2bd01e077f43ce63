"""Builders and one-off conversions that draw random numbers without touching the global generator.

A run's trainable parts are initialised right after the frozen parts are loaded. When loading a part
first has to build or convert it (a tiny test model written once, SmolLM2's GGUF turned into a plain
checkpoint), that work draws from the global generator on a cold cache and not on a warm one, and the
connector would then start from other weights: a run would depend on what was cached before it.
May import: nothing of the package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def keeps_global_rng(function: Callable[..., T]) -> Callable[..., T]:
    """Run ``function`` under a forked CPU generator: what it seeds and draws is undone when it returns."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs) -> T:
        with torch.random.fork_rng(devices=[]):
            return function(*args, **kwargs)

    return wrapped
