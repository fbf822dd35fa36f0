"""Per-photo caches of what a frozen encoder computes (the VAE's posterior,
the perceiver's ViT + Q-Former features): a photo repeats every epoch, its
encoding does not."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def cached_per_photo(cache: dict[str, Any], names: list[str], compute: Callable[[int], Any]) -> list[Any]:
    """The entries for ``names``, computing each missing one from its photo
    (index ``i`` of the batch) alone: an entry never depends on its batch-mates,
    so a resumed run, whose cache starts empty, refills it with the same values."""
    with torch.no_grad():
        for i, name in enumerate(names):
            if name not in cache:
                cache[name] = compute(i)
    return [cache[name] for name in names]
