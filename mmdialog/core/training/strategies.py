"""How ``train.strategy`` becomes Lightning's strategy. ``auto``, ``ddp`` and
``deepspeed`` (ZeRO stage 2) are Lightning's own; ``fsdp`` is built here,
because FSDP needs to know the model's units:

* each repeated block (an LLM decoder layer, a ViT / Q-Former / CLIP layer, a
  UNet transformer block) is one unit: it is gathered, run and freed in turn;
* a module whose own weights have another dtype than the model's (the float32
  LoRA adapters and projections of a bf16 model) is a unit of its own, since an
  FSDP unit flattens its weights into one tensor of one dtype;
* frozen and trained weights may share a unit (``use_orig_params``), so the
  freeze policy and the optimizer see the model's own parameters;
* frozen parts outside the repeated blocks stay whole (``kept_whole``): FSDP
  shards the frozen LLM inside its layers, not the encoders behind the caches.

Lightning refuses the ``fsdp`` name on a CPU accelerator; torch's FSDP runs
there (gloo), so the strategy object is handed over as it is.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from torch import nn

from mmdialog.core.compiling import repeated_blocks


def kept_whole(model: nn.Module) -> list[nn.Parameter]:
    """The frozen weights FSDP leaves out of its units: every all-frozen module outside
    the repeated blocks (BLIP-2's ViT and Q-Former, the VAE, the text encoder, the
    frozen embedding tables) and the frozen weights of a module that also trains
    (BLIP-2's query tokens). Inside a unit, FSDP runs forward on views of its flat
    weight that all require grad, so what the model checks for being frozen while it
    runs (the per-photo caches, the bridge's table) must stay outside one."""
    blocks = {id(m) for m in repeated_blocks(model)}
    kept: dict[int, nn.Parameter] = {}

    def visit(module: nn.Module) -> None:
        if id(module) in blocks:
            return
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            kept.update((id(p), p) for p in params)
            return
        kept.update((id(p), p) for p in module.parameters(recurse=False) if not p.requires_grad)
        for child in module.children():
            visit(child)

    visit(model)
    return list(kept.values())


def fsdp_units(model: nn.Module, kept: list[nn.Parameter]) -> Any:
    """FSDP's ``auto_wrap_policy`` for ``model``: its repeated blocks, and each
    module whose own weights differ in dtype from most of the model's; nothing
    whose weights are all ``kept`` out."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = tuple({type(m) for m in repeated_blocks(model)})
    out = {id(p) for p in kept}
    sizes = Counter()
    for p in model.parameters():
        if id(p) not in out:
            sizes[p.dtype] += p.numel()
    main = sizes.most_common(1)[0][0]

    def is_unit(module: nn.Module) -> bool:
        params = [p for p in module.parameters() if id(p) not in out]
        own = {p.dtype for p in module.parameters(recurse=False) if id(p) not in out}
        return bool(params) and (isinstance(module, blocks) or (len(own) == 1 and main not in own))

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=is_unit)


def lightning_strategy(name: str, model: nn.Module) -> Any:
    """What ``L.Trainer(strategy=...)`` gets for ``train.strategy``."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    kept = kept_whole(model)

    class ShardedStrategy(FSDPStrategy):
        """Lightning's FSDP with mmdialog's units, on any accelerator."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            for p in kept:  # FSDP moves what it shards; the rest is ours to place
                p.data = p.data.to(self.root_device)
            if self.root_device.type == "cpu":  # Lightning passes no device there, which FSDP refuses
                from torch.distributed.fsdp import FullyShardedDataParallel

                kwargs = {k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"}
                model = FullyShardedDataParallel(
                    module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                    auto_wrap_policy=self.kwargs["auto_wrap_policy"], **kwargs)
                self.kwargs = kwargs  # applied: Lightning would warn that the model is wrapped already
            return super()._setup_model(model)

        # Gathering a full state dict "offloaded to the CPU" crashes torch's FSDP when the
        # shards are on the CPU already; there every rank gathers in place.
        def _gathered_in_place(self) -> Any:
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                        FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False))

        def lightning_module_state_dict(self) -> dict[str, Any]:
            if self.root_device.type != "cpu":
                return super().lightning_module_state_dict()
            with self._gathered_in_place():
                return self.model.state_dict()

        def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
            if self.root_device.type != "cpu":
                return super().optimizer_state(optimizer)
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import OptimStateKeyType

            optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
            with self._gathered_in_place():
                state = FSDP.optim_state_dict(self.model, optimizer)
                return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)

    return ShardedStrategy(auto_wrap_policy=fsdp_units(model, kept), ignored_states=kept, use_orig_params=True,
                           sharding_strategy="FULL_SHARD", limit_all_gathers=True)


def is_sharded(trainer: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def full_weights(trainer: Any) -> Any:
    """A context in which every rank's module holds its full weights (FSDP shards
    them outside forward): what is saved after training reads them."""
    from contextlib import nullcontext

    if not is_sharded(trainer):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
