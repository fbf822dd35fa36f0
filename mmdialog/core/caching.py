"""Per-photo caches of what a frozen encoder computes (the VAE's posterior,
the perceiver's ViT + Q-Former features): a photo repeats every epoch, its
encoding does not. Once every training photo is cached, the encoders behind
the caches may leave the accelerator (``offload``) and come back only when
called (``resident``): the same numbers, gigabytes less memory (ViT-g alone
is 2 GB in bf16)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def cached_per_photo(cache: dict[str, Any], names: list[str], compute: Callable[[int], Any]) -> list[Any]:
    """The entries for ``names``, computing each missing one from its photo
    (index ``i`` of the batch) alone: an entry never depends on its batch-mates,
    so a resumed run, whose cache starts empty, refills it with the same values."""
    with torch.no_grad():
        for i, name in enumerate(names):
            if name not in cache:
                cache[name] = compute(i)
    return [cache[name] for name in names]


def offload(modules: list[nn.Module]) -> None:
    """Move frozen ``modules`` to the CPU; ``resident`` brings them back for a call."""
    for module in modules:
        module.to("cpu")


@contextmanager
def resident(device: torch.device, *modules: nn.Module) -> Iterator[None]:
    """Run with ``modules`` on ``device``: one that was offloaded comes back for
    the call (a photo missing from the cache, or inference) and leaves again."""
    homes = [(m, p.device) for m in modules if (p := next(m.parameters(), None)) is not None and p.device != device]
    for module, _ in homes:
        module.to(device)
    try:
        yield
    finally:
        for module, home in homes:
            module.to(home)
