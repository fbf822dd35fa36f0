"""The LightningModule around a ``DialogueModel``: the training step, dev
evaluation with plateau halving, the optimizer and the checkpoint contents."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from mmdialog.core import checkpoint as ckpt_format
from mmdialog.core import markup
from mmdialog.core.collator import Batch
from mmdialog.core.config import TrainConfig
from mmdialog.core.errors import ConfigError, TrainingError
from mmdialog.core.model import DialogueModel
from mmdialog.core.quantization import adamw_8bit
from mmdialog.core.training.data import ResumableLoader
from mmdialog.core.training.strategies import is_sharded


class DialogueModule(L.LightningModule):
    """Optimises the trainable groups of a ``DialogueModel`` (see the freeze policy)."""

    strict_loading = False  # checkpoints hold only trainable weights

    def __init__(self, model: DialogueModel) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = model.config.train
        self.seed = model.config.model.seed
        self.sample_log: list[str] = []  # over every process of the run: resumed ones continue it
        self.photos_skipped = 0  # photos that could not be read: their samples train the text only
        # Plateau halving on dev BLEU-2 (the reference recipe), applied on top of warm-up.
        self.lr_scale, self.best_bleu2, self.bad_evals = 1.0, -1.0, 0
        self._val: list[tuple[str, str]] = []

    def on_train_start(self) -> None:
        # Lightning trains the module in whatever mode it was handed; DialogueModel.train
        # keeps the frozen parts in eval mode (no dropout in a frozen Q-Former, caches on).
        self.model.train()

    def transfer_batch_to_device(self, batch: Batch | list, device, dataloader_idx: int) -> Batch | list:
        return batch.to(device) if isinstance(batch, Batch) else batch  # dev turns stay Python objects

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.train_cfg.deterministic:
            # Noise, timesteps and dropout depend on (seed, step, rank, micro-batch) only.
            torch.manual_seed(hash((self.seed, self.global_step, self.global_rank, batch_idx)) % 2**62)
        self.model.bridge.set_step(self.global_step)
        out = self.model(batch)
        if not torch.isfinite(out["loss"]):
            raise TrainingError(
                f"loss became {out['loss'].item()} at step {self.global_step} (text {out['text_loss'].item():.4g}, "
                f"image {out['image_loss'].item():.4g}); the last good checkpoint is kept in "
                f"{self.train_cfg.out_dir}/checkpoints — lower --lr or use --precision 32-true, then --resume")
        self.sample_log.extend(batch.ids)
        self.photos_skipped += batch.stats.get("photos_unreadable", 0)
        loader = self.trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.mark_consumed()
        n = len(batch)
        self.log("loss", out["loss"].detach(), batch_size=n)
        self.log("text_loss", out["text_loss"].detach(), prog_bar=True, batch_size=n)
        self.log("image_loss", out["image_loss"].detach(), prog_bar=True, batch_size=n)
        self.log("image_samples", out["image_samples"].float(), batch_size=n, reduce_fx="sum")
        return out["loss"]

    def validation_step(self, samples: list, batch_idx: int) -> None:
        replies = self.model.respond_batch([(list(s.context), s.speaker) for s in samples], draw=False,
                                           max_new_tokens=self.train_cfg.val_max_new_tokens,
                                           num_beams=self.train_cfg.val_num_beams,
                                           photo_in_loop=self.train_cfg.val_decoding == "ours")
        gold = [s.target.text_with_photos() for s in samples]
        self._val.extend(zip([r.text for r in replies], gold))

    def on_validation_epoch_end(self) -> None:
        from mmdialog.core.evaluation.metrics import text

        if not self._val:
            return
        preds, golds = zip(*self._val)
        self._val = []
        # Dev BLEU-2 as the reference selects on it: str.split() tokens, case kept.
        clean = markup.strip_reference if self.train_cfg.val_decoding == "reference" else markup.strip
        bleu2 = text.bleu([clean(p) for p in preds], [clean(g) for g in golds], n=2,
                          tokenizer=text.reference_tokenize)
        # The reference's ReduceLROnPlateau(mode=max, factor=0.5, patience): stepped after
        # warm-up only; the lr halves when more than `patience` evaluations in a row did not
        # improve, and the count starts again. Early stopping (a callback) counts every evaluation.
        if bleu2 > self.best_bleu2:
            self.best_bleu2, self.bad_evals = bleu2, 0
        elif self.global_step >= self.train_cfg.warmup_steps:
            self.bad_evals += 1
            if self.bad_evals > self.train_cfg.plateau_patience:
                self.lr_scale *= 0.5
                self.bad_evals = 0
        self.log("val_bleu2", bleu2, sync_dist=True)
        self.log("lr_scale", self.lr_scale)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.lr_scale, self.best_bleu2, self.bad_evals = checkpoint.get(ckpt_format.PLATEAU_KEY, (1.0, -1.0, 0))
        self.sample_log = list(checkpoint.get(ckpt_format.SAMPLES_KEY, []))
        self.photos_skipped = int(checkpoint.get(ckpt_format.PHOTOS_SKIPPED_KEY, 0))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning clips a sharded (FSDP) model by value only; FSDP computes the norm across shards.
        if gradient_clip_val and is_sharded(self.trainer):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        t = self.train_cfg
        opt = build_optimizer(self.model, t)
        warm, start = t.warmup_steps, t.warmup_start_factor

        def warmup(s: int) -> float:
            if not warm:
                return 1.0
            if start is None:
                return min(1.0, (s + 1) / warm)
            return start + (1.0 - start) * min(1.0, s / warm)  # torch's LinearLR(start, 1.0, warm)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup(s) * self.lr_scale)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_format.filter_lightning_state(checkpoint, self.model)
        checkpoint[ckpt_format.SAMPLES_KEY] = list(self.sample_log)
        checkpoint[ckpt_format.PHOTOS_SKIPPED_KEY] = self.photos_skipped
        checkpoint[ckpt_format.PLATEAU_KEY] = (self.lr_scale, self.best_bleu2, self.bad_evals)


def build_optimizer(model: DialogueModel, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights (``train.optimizer``): torch's, fused where every
    weight is on a GPU, or bitsandbytes' with 8-bit moments for ``train.optimizer_8bit_groups``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        fused = t.fused_optimizer and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
    groups = model.parameter_groups()
    names = t.optimizer_8bit_groups
    if names is None:  # what each plugin names as its large groups
        names = [f"{slot}.{g}" for slot, comp in model.components().items() for g in comp.optimizer_8bit_by_default]
    unknown = sorted(set(names) - set(groups))
    if unknown:
        raise ConfigError(f"config field 'train.optimizer_8bit_groups': no parameter group '{unknown[0]}'; "
                          f"this model has: {', '.join(sorted(groups))}")
    eight = {id(p) for g in names for p in groups[g]}
    by_bits = {bits: [p for p in params if (id(p) in eight) == (bits == 8)] for bits in (8, 32)}
    return adamw_8bit([{"params": ps, "optim_bits": bits} for bits, ps in by_bits.items() if ps],
                      lr=t.lr, weight_decay=t.weight_decay)
