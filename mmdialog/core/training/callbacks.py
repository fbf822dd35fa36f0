"""Callbacks of ``mmdialog train``: atomic checkpoint writes that keep the
previous checkpoint, a checkpoint at SIGTERM / Ctrl-C and at the last step,
throughput in the progress bar, the loss history, the frozen encoders moved
off the accelerator once their caches are full."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmdialog.core.caching import offload
from mmdialog.core.checkpoint import previous_checkpoint, safe_load, with_digest
from mmdialog.core.errors import TrainingError
from mmdialog.core.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then rename: a crash
    mid-write never leaves a half-written checkpoint under the real name. The
    file carries a digest of its contents, checked on resume. The checkpoint it
    replaces is kept as ``<name>.prev`` (a hard link), so a checkpoint damaged
    later still has a good one beside it. Loading is ``weights_only``, as every
    checkpoint mmdialog reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            with atomic_write(path) as tmp:
                torch.save(with_digest(checkpoint), tmp)
                if path.exists():
                    prev = previous_checkpoint(path)
                    prev.unlink(missing_ok=True)
                    try:
                        os.link(path, prev)
                    except OSError:  # a file system without hard links
                        shutil.copy2(path, prev)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as an iostream RuntimeError
            need = sum(t.numel() * t.element_size() for t in _tensors(checkpoint))
            free = shutil.disk_usage(path.parent).free
            if getattr(e, "errno", None) != errno.ENOSPC and free >= need:
                raise
            raise TrainingError(f"no space left on the device of {path}: the checkpoint needs about "
                                f"{need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free; free some space "
                                "(the last checkpoint is intact), then --resume last") from None

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return safe_load(path)  # resume never unpickles code


def all_stored(stores, samples) -> bool:
    """Every photo of the training ``samples`` (dialogue, agent) is whole in every store."""
    from mmdialog.core.caching import content_key

    paths = {p.path for d, _ in samples for p in d.photos if p.path is not None}
    try:
        keys = {content_key(path) for path in paths}
    except OSError:
        return False
    return all(store.complete(k) for store in stores for k in keys)


def _tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class StopOnSignal(L.Callback):
    """SIGTERM (a batch scheduler's notice) or Ctrl-C: finish the optimizer step in
    progress, write a checkpoint and stop, so the run resumes exactly with
    ``--resume last``. ``signal`` says which one came (the CLI exits 128 + its
    number: 143, 130). A second Ctrl-C stops at once, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signal: int | None = None
        # The handlers from before Lightning installed its own (made before the Trainer): what
        # the process gets back. Lightning's, put back instead, kept the trainer and the whole
        # model alive after ``train`` returned (a signal handler is held outside the heap's reach).
        self._original: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._original = {s: h for s in self.SIGNALS if (h := signal.getsignal(s)) is not None}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning installed its own SIGTERM handler (which would end the run at
        # the next batch, mid-accumulation and without a checkpoint): ours replaces it.
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore()

    def restore(self) -> None:
        for s, handler in self._original.items():
            signal.signal(s, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signal is not None and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


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


class OffloadCachedEncoders(L.Callback):
    """Once every training photo is in the feature store — at the start when an earlier
    run or ``mmdialog data cache`` filled it, else at the end of the first epoch this
    process ran from its first batch — the frozen encoders behind the store
    (``Component.cached_encoders``) move to the CPU for the rest of the run and come
    back when training ends. A run resumed mid-epoch waits for the next whole epoch.
    Single-device runs only: a sharded or replicated module is the strategy's to place."""

    def __init__(self) -> None:
        self.offloaded: list[torch.nn.Module] = []
        self._batches = 0
        self._starting = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Decided at the first batch: callbacks' on_train_start runs before the module's,
        # which puts the frozen parts in eval mode, and only then are they cacheable.
        self._starting = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._starting:
            return
        self._starting = False
        stores = pl_module.model.collator.stores
        samples = getattr(getattr(trainer, "datamodule", None), "train_set", None)
        if stores and samples is not None and all_stored(stores.values(), samples.samples):
            self._offload(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batches >= trainer.num_training_batches:
            self._offload(trainer, pl_module)

    def _offload(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import SingleDeviceStrategy

        if self.offloaded or not isinstance(trainer.strategy, SingleDeviceStrategy):
            return
        model = pl_module.model
        self.offloaded = [m for part in (model.perceiver, model.generator) for m in part.cached_encoders()]
        offload(self.offloaded)
        if pl_module.device.type == "cuda":
            torch.cuda.empty_cache()

    def _bring_back(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in self.offloaded:
            module.to(pl_module.device)

    # Dev replies perceive every photo of their context: one move each way, not one per batch.
    on_validation_start = _bring_back

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        offload(self.offloaded)

    on_train_end = _bring_back
