"""Callbacks of ``mmdialog train``: atomic checkpoint writes, a checkpoint at
Ctrl-C and at the last step, throughput in the progress bar, the loss history."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmdialog.core.checkpoint import safe_load
from mmdialog.core.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then rename: a crash
    mid-write never leaves a half-written checkpoint under the real name.
    Loading is ``weights_only``, as every checkpoint mmdialog reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return safe_load(path)  # resume never unpickles code


class SaveOnInterrupt(L.Callback):
    """Ctrl-C: Lightning stops and exits; first write a checkpoint of the work done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.interrupted = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            trainer.save_checkpoint(self.path)


class SaveAtLastStep(L.Callback):
    """Checkpoint the last optimizer step when it falls between periodic saves.

    It saves where ModelCheckpoint does (end of the batch), so a resume from it
    is exact; a save after ``fit`` returns would mark the epoch finished and
    resume into the next one."""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every, self.saved = path, every, -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == trainer.max_steps and step % self.every and step != self.saved:
            self.saved = step
            trainer.save_checkpoint(self.path)


class Throughput(L.Callback):
    """Samples per second in the progress bar (Lightning's bar adds ETA)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("samples_s", len(batch) / max(time.perf_counter() - self.start, 1e-9), prog_bar=True,
                      batch_size=len(batch))


class LossHistory(L.Callback):
    """Keeps each optimizer step's logged losses (for the CLI summary)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            m = trainer.callback_metrics
            self.rows.append({"step": trainer.global_step,
                              **{k: float(m[k]) for k in ("text_loss", "image_loss") if k in m}})
