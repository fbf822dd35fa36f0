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

import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from mmdialog.core.checkpoint import (
    BEST,
    LAST,
    TRAINABLE,
    check_resume_config,
    resume_checkpoint,
    save_trainable,
    weights_digest,
)
from mmdialog.core.compiling import compile_repeated_blocks
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.data.source import read_dialogues
from mmdialog.core.errors import ConfigError, MMDialogError, TrainingError
from mmdialog.core.files import atomic_write, folder_lock
from mmdialog.core.model import DialogueModel
from mmdialog.core.training.callbacks import (
    AtomicCheckpointIO,
    LossHistory,
    OffloadCachedEncoders,
    SaveAtLastStep,
    StopOnSignal,
    Throughput,
)
from mmdialog.core.training.data import DialogueDataModule
from mmdialog.core.training.module import DialogueModule, build_optimizer
from mmdialog.core.training.strategies import full_weights, lightning_strategy

__all__ = ["TrainResult", "TrainingError", "build_optimizer", "compile_repeated_blocks", "read_dialogues", "train"]


@dataclass
class TrainResult:
    """What ``train`` did. Every rank gets one; the paths are rank 0's."""

    steps: int                       # optimizer steps reached
    history: list[dict[str, float]]  # one row per logged step: step, text_loss, image_loss, …
    data: str                        # the training data's one-line summary
    global_zero: bool                # this process is rank 0
    signal: int | None = None        # SIGTERM / SIGINT that stopped the run (a checkpoint was written)
    notes: list[str] = field(default_factory=list)     # what the user should know (resumed from, cleaned up)
    photos_skipped: int = 0          # photos that could not be read during training (their samples: text only)
    offloaded: list[str] = field(default_factory=list)  # encoders moved off the device once their caches filled
    weights: str | None = None       # trainable.pt (rank 0)
    checkpoint: str | None = None    # last.ckpt (rank 0)
    best: str | None = None          # best.ckpt: the best dev BLEU-2's weights (rank 0, with dev evaluation)
    best_bleu2: float | None = None  # its dev BLEU-2
    encoded_photos: dict[str, int] = field(default_factory=dict)  # photos each feature store encoded in this run
    fit_s: float = 0.0               # seconds in Lightning's fit
    data_wait_s: float = 0.0         # of which the main process waited for the data loader
    num_workers: int = 0             # the data loader's worker processes


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _user_error_within(e: BaseException) -> MMDialogError | None:
    """An ``MMDialogError`` that ``e`` was raised while handling, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, MMDialogError):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _trainer(t: Any, out: Path, callbacks: list[L.Callback], loggers: list, progress: bool,
             validate: bool, strategy: Any = None) -> L.Trainer:
    """``strategy``: what Lightning gets (``lightning_strategy``); default ``t.strategy``."""
    return L.Trainer(
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate, precision=resolve_precision(t.precision),
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy if strategy is None else strategy,
        default_root_dir=out, log_every_n_steps=t.log_every, callbacks=callbacks, logger=loggers,
        enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=t.gradient_clip or None,
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=True,
        # Every val_every optimizer steps, or after every epoch ("epoch", as the reference).
        val_check_interval=t.val_every * t.accumulate if validate and t.val_every != "epoch" else None,
        check_val_every_n_epoch=1 if not validate or t.val_every == "epoch" else None,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0)


def remove_stale_temp_files(out: Path) -> int:
    """Temporary files a killed run left beside its checkpoints (``core/files.py``
    names them ``.<name>.<random>.tmp``); returns how many were removed."""
    stale = [f for d in (out, out / "checkpoints") if d.is_dir() for f in d.glob(".*.tmp") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def is_launching_process() -> bool:
    """The process the user started, not a rank that Lightning's launcher,
    torchrun or SLURM started beside it (they set these to the rank)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def out_dir_lock(out: str | Path):
    """One training per out-dir: ``out/.lock`` held by the launching process
    (``core/files.py``: released by the OS however the process ends). A second
    training into the same folder is a one-line error, before it writes anything."""
    import contextlib

    return folder_lock(out, "training") if is_launching_process() else contextlib.nullcontext()


def train(model: DialogueModel, progress: bool = True,
          resume: str | Path | bool | tuple[Path, str | None] | None = None,
          data: tuple[list[Dialogue], str] | None = None) -> TrainResult:
    """Train ``model`` per its config. Returns the loss history and output paths.

    ``resume``: True → ``out_dir/checkpoints/last.ckpt``; a path → that file
    (a damaged one falls back to the previous checkpoint kept beside it); what
    ``resume_checkpoint`` returned → that checkpoint, checked once already (its
    note is the caller's to show). A checkpoint's model config must equal ``model``'s
    (one line naming the difference).
    ``data``: the training split and its summary (``read_dialogues``), when the
    caller has read it already.
    """
    with out_dir_lock(model.config.train.out_dir):
        return _train(model, progress, resume, data)


def _train(model: DialogueModel, progress: bool, resume: str | Path | bool | tuple[Path, str | None] | None,
           data: tuple[list[Dialogue], str] | None) -> TrainResult:
    cfg = model.config
    t = cfg.train
    out = Path(t.out_dir)
    ckpt_path, notes = None, []
    if isinstance(resume, tuple):
        ckpt_path = str(resume[0])
    elif resume:
        ckpt, note = resume_checkpoint(out / LAST if resume is True else resume)
        check_resume_config(ckpt, cfg)
        ckpt_path = str(ckpt)
        notes += [note] if note else []
    if removed := remove_stale_temp_files(out):
        notes.append(f"removed {removed} temporary file(s) left by an interrupted run in {out}")
    history = LossHistory()
    checkpoint = ModelCheckpoint(dirpath=out / LAST.rsplit("/", 1)[0], filename="last",
                                 every_n_train_steps=t.checkpoint_every, save_top_k=1,
                                 enable_version_counter=False, save_on_train_epoch_end=False)
    stop = StopOnSignal(out / LAST)
    callbacks: list[L.Callback] = [history, checkpoint, SaveAtLastStep(out / LAST, t.checkpoint_every), stop,
                                   Throughput(), L.pytorch.callbacks.LearningRateMonitor("step")]
    offloader = OffloadCachedEncoders()
    if t.offload_cached_encoders:
        callbacks.append(offloader)
    validate = t.val_every != 0
    best = ModelCheckpoint(dirpath=out / BEST.rsplit("/", 1)[0], filename="best", monitor="val_bleu2", mode="max",
                           save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=False)
    if validate:  # the weights of the best dev BLEU-2 are kept (and exported), as the reference keeps them
        callbacks += [best, EarlyStopping(monitor="val_bleu2", mode="max", patience=t.early_stop_patience,
                                          check_on_train_epoch_end=False)]
    loggers = [L.pytorch.loggers.CSVLogger(out, name="logs"),
               L.pytorch.loggers.TensorBoardLogger(out, name="tensorboard")]
    if t.deterministic:
        L.seed_everything(cfg.model.seed, workers=True, verbose=False)
    try:
        trainer = _trainer(t, out, callbacks, loggers, progress, validate, lightning_strategy(t.strategy, model))
    except (ValueError, MisconfigurationException) as e:  # a strategy, accelerator or precision this machine lacks
        raise ConfigError(f"train: {str(e).splitlines()[0]}") from None
    if t.compile:
        compile_repeated_blocks(model)
    module = DialogueModule(model)
    # Opened before Lightning wraps or shards the model: each store's name hashes its encoder's weights.
    stores = model.use_feature_stores(cfg.data.feature_store)
    encoded_before = {kind: store.encoded for kind, store in stores.items()}
    data = DialogueDataModule(cfg, model.collator, data)
    budget = {} if t.activation_memory_budget is None else {"activation_memory_budget": t.activation_memory_budget}
    fit_start = time.perf_counter()
    try:
        with torch._functorch.config.patch(**budget):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except SystemExit:
        if stop.signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt from None
        raise
    except Exception as e:
        if _is_oom(e):
            raise TrainingError(
                f"out of memory at step {trainer.global_step}: try --batch-size 1 with --accumulate, "
                "--gradient-checkpointing, --precision bf16-mixed, or --set model.max_length=256") from None
        cause = _user_error_within(e)
        if cause is not None:  # e.g. Lightning's clean-up failed too on the full disk a checkpoint met
            raise cause from None
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise TrainingError(f"no space left on the device of {out}: free some space (the last checkpoint "
                                "is intact), then --resume last") from None
        raise
    finally:
        stop.restore()
    fit_s = time.perf_counter() - fit_start
    encoded = {kind: store.encoded - encoded_before[kind] for kind, store in stores.items()}
    loader = trainer.train_dataloader
    result = TrainResult(steps=trainer.global_step, history=history.rows, data=data.summary,
                         global_zero=trainer.is_global_zero, signal=stop.signal, notes=notes,
                         photos_skipped=module.photos_skipped,
                         offloaded=[n for n, m in model.named_modules() if m in offloader.offloaded],
                         encoded_photos=encoded, fit_s=fit_s, data_wait_s=getattr(loader, "wait_s", 0.0),
                         num_workers=getattr(loader, "num_workers", 0))
    with full_weights(trainer):
        manifest = {"rank": trainer.global_rank, "steps": trainer.global_step, "data": data.summary,
                    "samples": module.sample_log, "photos_skipped": module.photos_skipped,
                    "encoded_photos": encoded,
                    "weights_sha1": weights_digest(model)}
        if trainer.is_global_zero:
            result.weights = str(save_trainable(model, out / TRAINABLE))
    with atomic_write(out / f"manifest_rank{trainer.global_rank}.json") as tmp:
        tmp.write_text(json.dumps(manifest))
    if trainer.is_global_zero:
        result.checkpoint = str(out / LAST)
        if validate and best.best_model_path:
            result.best, result.best_bleu2 = best.best_model_path, float(best.best_model_score)
    return result
