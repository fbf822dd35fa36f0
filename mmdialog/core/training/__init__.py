"""Lightning training: ``train(model)``. The data module is ``data.py``, the
LightningModule ``module.py``, the callbacks ``callbacks.py``.

Scale — devices, nodes, DDP / FSDP / DeepSpeed, precision — is Lightning's;
no distribution code lives here. What is ours:

* checkpoints hold only trainable weights + the full config + optimizer and
  scheduler state, written atomically (the format: ``core/checkpoint.py``);
* deterministic mode reseeds every step from (seed, step, rank), and the
  sampler's order depends only on (seed, epoch), so a resumed run repeats an
  uninterrupted one exactly;
* a non-finite loss stops the run with its step number and keeps the last
  good checkpoint; Ctrl-C saves a checkpoint; out-of-memory says which flags
  reduce memory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from mmdialog.core.checkpoint import LAST, TRAINABLE, save_trainable, weights_digest
from mmdialog.core.errors import MMDialogError, TrainingError
from mmdialog.core.model import DialogueModel
from mmdialog.core.training.callbacks import (
    AtomicCheckpointIO,
    LossHistory,
    SaveAtLastStep,
    SaveOnInterrupt,
    Throughput,
)
from mmdialog.core.training.data import DialogueDataModule, read_dialogues
from mmdialog.core.training.module import DialogueModule, compile_repeated_blocks

__all__ = ["TrainingError", "compile_repeated_blocks", "read_dialogues", "train"]


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def train(model: DialogueModel, progress: bool = True, resume: str | bool | None = None) -> dict[str, Any]:
    """Train ``model`` per its config. Returns the loss history and output paths.

    ``resume``: True → ``out_dir/checkpoints/last.ckpt``; a path → that file.
    """
    cfg = model.config
    t = cfg.train
    out = Path(t.out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_path = None
    if resume:
        ckpt_path = str(out / LAST) if resume is True else str(resume)
        if not Path(ckpt_path).is_file():
            raise MMDialogError(f"nothing to resume: {ckpt_path} does not exist")
    history = LossHistory()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=t.checkpoint_every,
                                 save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=False)
    interrupt = SaveOnInterrupt(out / LAST)
    callbacks: list[L.Callback] = [history, checkpoint, SaveAtLastStep(out / LAST, t.checkpoint_every),
                                   interrupt, Throughput(),
                                   L.pytorch.callbacks.LearningRateMonitor("step")]
    validate = t.val_every > 0
    if validate:
        callbacks.append(EarlyStopping(monitor="val_bleu2", mode="max", patience=t.early_stop_patience,
                                       check_on_train_epoch_end=False))
    loggers = [L.pytorch.loggers.CSVLogger(out, name="logs"),
               L.pytorch.loggers.TensorBoardLogger(out, name="tensorboard")]
    if t.deterministic:
        L.seed_everything(cfg.model.seed, workers=True, verbose=False)
    trainer = L.Trainer(
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate, precision=resolve_precision(t.precision),
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        default_root_dir=out, log_every_n_steps=t.log_every, callbacks=callbacks, logger=loggers,
        enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=t.gradient_clip or None,
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=True,
        val_check_interval=t.val_every * t.accumulate if validate else None,
        check_val_every_n_epoch=None if validate else 1, limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0)
    if t.compile:
        compile_repeated_blocks(model)
    module = DialogueModule(model)
    data = DialogueDataModule(cfg, model.collator)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except SystemExit:
        if not interrupt.interrupted:
            raise
    except Exception as e:
        if _is_oom(e):
            raise TrainingError(
                f"out of memory at step {trainer.global_step}: try --batch-size 1 with --accumulate, "
                "--gradient-checkpointing, --precision bf16-mixed, or --set model.max_length=256") from None
        raise
    result: dict[str, Any] = {"data": data.summary, "steps": trainer.global_step, "history": history.rows,
                              "interrupted": interrupt.interrupted, "global_zero": trainer.is_global_zero}
    manifest = {"rank": trainer.global_rank, "steps": trainer.global_step, "samples": module.sample_log,
                "weights_sha1": weights_digest(model)}
    (out / f"manifest_rank{trainer.global_rank}.json").write_text(json.dumps(manifest))
    if trainer.is_global_zero:
        result["weights"] = str(save_trainable(model, out / TRAINABLE))
        result["checkpoint"] = str(out / LAST)
    return result
