"""The repeated blocks of a model, and their regional ``torch.compile``, shared
by training (``train.compile``, FSDP's units) and inference
(``generator.compile_unet``)."""
from __future__ import annotations

import torch


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each transformers layer (``GradientCheckpointingLayer``) and each block a
    diffusers model lists in ``_repeated_blocks``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    repeated = {name for mod in model.modules() for name in getattr(mod, "_repeated_blocks", None) or ()}
    return [mod for mod in model.modules()
            if isinstance(mod, GradientCheckpointingLayer) or type(mod).__name__ in repeated]


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """Regional ``torch.compile`` of the repeated blocks. Identical blocks share
    one graph, so compiling costs about one layer, not the model; module names
    and checkpoints are unchanged. Returns the number compiled."""
    blocks = repeated_blocks(model)
    for mod in blocks:
        mod.compile()
    return len(blocks)
