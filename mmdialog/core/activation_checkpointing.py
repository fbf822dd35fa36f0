"""Activation checkpointing policies, shared by every component that recomputes
activations in the backward pass (the LLM's decoder layers, the UNet's blocks).

``full`` keeps only each checkpointed block's input and recomputes the whole
block. ``save_matmuls`` is selective activation checkpointing (torch's
``create_selective_checkpoint_contexts``): the outputs of matmuls, attention
and convolutions are kept, and only the cheap element-wise ops between them
(norms, activations, residual adds, casts) are recomputed. The numerics are the
same either way; the trade is memory for recompute.

Under ``torch.compile`` the compiler decides what a compiled block saves, so a
policy applies to eager blocks; ``train.activation_memory_budget`` is the
compiled counterpart (AOTAutograd's partitioner trades recompute for memory
to stay under a fraction of what the block would save).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch

CheckpointPolicy = Literal["full", "save_matmuls"]


@functools.cache
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ["mm", "bmm", "addmm", "baddbmm", "convolution", "_scaled_mm",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy as Policy

    return Policy.MUST_SAVE if op in _saved_ops() else Policy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: CheckpointPolicy) -> dict[str, Any]:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for ``policy``."""
    if policy == "full":
        return {"use_reentrant": False}
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return {"use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)}


def checkpoint_function(policy: CheckpointPolicy) -> Callable[..., Any]:
    """``fn(module, *args)`` that checkpoints one call under ``policy`` (the form
    diffusers' ``enable_gradient_checkpointing`` takes)."""
    from torch.utils.checkpoint import checkpoint

    kwargs = checkpoint_kwargs(policy)

    def run(module: Any, *args: Any) -> Any:
        return checkpoint(module.__call__, *args, **kwargs)

    return run
