"""Lean numerics: a frozen base stored quantized or multiplied in float8
(torchao), and 8-bit AdamW moments (bitsandbytes). The LLM plugin applies the
first two to its decoder (``plugins/llms/hf.py``), the trainer builds the
optimizer (``core/training/module.py``). Both libraries are the ``lean``
extra and are imported only when a switch asks for them.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from mmdialog.core.errors import ConfigError, DependencyError

LEAN_EXTRA = "pip install 'mmdialog[lean]'"
BaseQuantization = Literal["none", "nf4", "int8", "float8"]
NF4_BLOCK = 64  # weights per NF4 scale (QLoRA's block size)


def require(module: str, feature: str) -> ModuleType:
    """``module`` imported, or a one-line ``DependencyError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DependencyError(f"{feature} needs {module}: {LEAN_EXTRA} (import failed: {cause})") from None


def is_quantized(p: torch.Tensor) -> bool:
    """Whether ``p`` is a torchao tensor subclass (stored quantized; it takes no gradient)."""
    return type(p) not in (torch.Tensor, nn.Parameter)


def base_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers under ``module`` except LoRA's adapters: under peft, each
    adapted layer's ``base_layer`` and the layers LoRA does not target."""
    return [(name, mod) for name, mod in module.named_modules()
            if isinstance(mod, nn.Linear) and "lora_" not in name]


def quantize_weights(module: nn.Module, scheme: BaseQuantization) -> int:
    """Store the weight of every base Linear under ``module`` as ``scheme``
    (weight-only: the matmul de-quantizes, the input and its gradient keep
    their dtype). Returns the number of layers quantized."""
    if scheme == "none":
        return 0
    quantization = require("torchao.quantization", f"model.llm.base_quantization: {scheme}")
    layers = base_linears(module)
    for name, lin in layers:
        if scheme == "nf4":
            n_blocks, rem = divmod(lin.weight.numel(), NF4_BLOCK)
            if rem:
                raise ConfigError(f"model.llm.base_quantization: nf4 needs weights in blocks of {NF4_BLOCK}; "
                                  f"'{name}' has {lin.weight.numel()} numbers")
            # The block scales are quantized again in groups: the largest power of two ≤ 256 dividing them.
            scaler_block = 256 if n_blocks % 256 == 0 else n_blocks & -n_blocks
            nf4 = quantization.NF4Tensor.from_tensor(lin.weight.detach(), NF4_BLOCK, scaler_block)
            lin.weight = nn.Parameter(nf4, requires_grad=False)
        else:
            config = quantization.Int8WeightOnlyConfig() if scheme == "int8" else quantization.Float8WeightOnlyConfig()
            quantization.quantize_(lin, config)
    return len(layers)


def require_float8_device() -> None:
    """float8 matmuls run on CUDA GPUs of compute capability 8.9 or newer (Ada, Hopper)."""
    if not torch.cuda.is_available():
        raise ConfigError("model.llm.float8_matmul needs a CUDA GPU of compute capability 8.9 or newer "
                          "(Ada, Hopper); no CUDA device here — set it to false")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"model.llm.float8_matmul needs a CUDA GPU of compute capability 8.9 or newer "
                          f"(Ada, Hopper); this one ({torch.cuda.get_device_name()}) is {major}.{minor} — "
                          "set it to false")


def float8_matmuls(module: nn.Module) -> int:
    """Swap the base Linears under ``module`` for torchao's ``Float8Linear``:
    input, weight and output gradient cast to float8 (dynamic tensor-wise
    scales) for each matmul, forward and backward, weights kept in their dtype.
    Layers whose sides are not multiples of 16 (a float8 GEMM requirement)
    stay as they are. Returns the number swapped. Check ``require_float8_device`` first."""
    float8 = require("torchao.float8", "model.llm.float8_matmul")
    chosen = {id(lin) for _, lin in base_linears(module)
              if lin.in_features % 16 == 0 and lin.out_features % 16 == 0}
    float8.convert_to_float8_training(module, module_filter_fn=lambda mod, fqn: id(mod) in chosen)
    return len(chosen)


def adamw_8bit(groups: Iterable[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW over param groups that each say ``optim_bits`` (8 or 32):
    8-bit groups keep both moments blockwise-quantized to uint8 (256 numbers per
    float32 scale; tensors under 4096 numbers stay float32), 32-bit groups float32."""
    return _grouped_adamw_8bit()(list(groups), lr=lr, weight_decay=weight_decay)


@functools.cache
def _grouped_adamw_8bit() -> type:
    bnb = require("bitsandbytes", "train.optimizer: adamw8bit")

    class GroupedAdamW8bit(bnb.optim.AdamW8bit):
        # bitsandbytes keeps per-parameter overrides in a process-wide manager keyed by id(p);
        # a group's own setting travels with the optimizer and its state dict instead.
        def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
            return {**super().get_config(gindex, pindex, group), "optim_bits": group["optim_bits"]}

    return GroupedAdamW8bit
