"""Lightning training: a LightningModule around ``DialogueModel`` and a data
module of (dialogue, agent) samples.

Scale — devices, nodes, DDP / FSDP / DeepSpeed, precision — is Lightning's;
no distribution code lives here. What is ours:

* checkpoints hold only trainable weights + the full config + optimizer and
  scheduler state, written atomically (temp file + rename);
* deterministic mode reseeds every step from (seed, step, rank), and the
  sampler's order depends only on (seed, epoch), so a resumed run repeats an
  uninterrupted one exactly;
* a non-finite loss stops the run with its step number and keeps the last
  good checkpoint; Ctrl-C saves a checkpoint; out-of-memory says which flags
  reduce memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Sampler

from mmdialog.core.config import Config, DataConfig, dump_config
from mmdialog.core.data.collate import Batch, training_samples
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.errors import MMDialogError
from mmdialog.core.model import DialogueModel

DEMO = "embedded:demo"
CONFIG_KEY = "mmdialog_config"


class TrainingError(MMDialogError):
    """A run that had to stop (non-finite loss, out of memory)."""


def read_dialogues(cfg: DataConfig, split: str | None = None) -> tuple[list[Dialogue], str]:
    """Dialogues for a data config, and a one-line summary of what was read."""
    from mmdialog.core.data import demo_dialogues, load_dialogues

    split = split or cfg.split
    if cfg.path == DEMO:
        dialogues = demo_dialogues(split or "train")
        return dialogues, f"embedded demo ({split or 'train'}): {len(dialogues)} dialogues"
    result = load_dialogues(cfg.path, format=cfg.format, split=split, image_dir=cfg.image_dir)
    if not result.dialogues:
        raise MMDialogError(f"no usable dialogues in {cfg.path} (split {split}): "
                            f"run `mmdialog data check {cfg.path}`")
    return result.dialogues, result.report.headline()


class SampleDataset(Dataset):
    def __init__(self, samples: list[tuple[Dialogue, str]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Dialogue, str]:
        return self.samples[i]


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): a resumed run sees the
    same order as an uninterrupted one. Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints.

    ``training_step`` marks each batch consumed; on resume the first
    ``consumed`` batches of the (seeded, hence identical) epoch order are
    skipped, so a run resumed mid-epoch sees exactly the batches it would
    have seen (Lightning restarts non-stateful loaders from the epoch start).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = 0
        self._skip = 0

    def mark_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A checkpoint taken after the epoch's last batch resumes at a new epoch.
        self._skip = state["consumed"] if state["consumed"] < len(self) else 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.consumed = skip
        it = super().__iter__()
        for _ in range(skip):
            next(it, None)
        return it


class DialogueDataModule(L.LightningDataModule):
    def __init__(self, config: Config, collator) -> None:
        super().__init__()
        self.cfg = config.data
        self.val_turns = config.train.val_turns
        self.seed = config.model.seed
        self.collator = collator
        self.summary = ""

    def setup(self, stage: str | None = None) -> None:
        dialogues, self.summary = read_dialogues(self.cfg, self.cfg.split or "train")
        self.train_set = SampleDataset(training_samples(dialogues, self.cfg.both_speakers))

    def val_dataloader(self) -> DataLoader:
        """Dev turns with gold context; the module scores BLEU-2 of the replies."""
        from mmdialog.core.data.samples import dialogue_samples

        dev, _ = read_dialogues(self.cfg, "dev")
        samples = dialogue_samples(dev)[: self.val_turns]
        return DataLoader(samples, batch_size=self.cfg.batch_size * 2, collate_fn=list)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, batch_size=self.cfg.batch_size,
                          sampler=EpochShuffleSampler(len(self.train_set), self.seed),
                          collate_fn=self.collator, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0)


def trainable_names(model: DialogueModel) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


class DialogueModule(L.LightningModule):
    """Optimises the trainable groups of a ``DialogueModel`` (see the freeze policy)."""

    strict_loading = False  # checkpoints hold only trainable weights

    def __init__(self, model: DialogueModel) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = model.config.train
        self.seed = model.config.model.seed
        self.sample_log: list[str] = []
        # Plateau halving on dev BLEU-2 (the reference recipe), applied on top of warm-up.
        self.lr_scale, self.best_bleu2, self.bad_evals = 1.0, -1.0, 0
        self._val: list[tuple[str, str]] = []

    def transfer_batch_to_device(self, batch: Batch | list, device, dataloader_idx: int) -> Batch | list:
        return batch.to(device) if isinstance(batch, Batch) else batch  # dev turns stay Python objects

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.train_cfg.deterministic:
            # Noise, timesteps and dropout depend on (seed, step, rank, micro-batch) only.
            torch.manual_seed(hash((self.seed, self.global_step, self.global_rank, batch_idx)) % 2**62)
        if hasattr(self.model.bridge, "set_step"):
            self.model.bridge.set_step(self.global_step)
        out = self.model(batch)
        if not torch.isfinite(out["loss"]):
            raise TrainingError(
                f"loss became {out['loss'].item()} at step {self.global_step} (text {out['text_loss'].item():.4g}, "
                f"image {out['image_loss'].item():.4g}); the last good checkpoint is kept in "
                f"{self.train_cfg.out_dir}/checkpoints — lower --lr or use --precision 32-true, then --resume")
        self.sample_log.extend(batch.ids)
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
                                           max_new_tokens=self.train_cfg.val_max_new_tokens)
        gold = [" ".join([s.target.text] + [f"[img] {p.description} [/img]" for p in s.target.photos])
                for s in samples]
        self._val.extend(zip([r.text for r in replies], gold))

    def on_validation_epoch_end(self) -> None:
        from mmdialog.core import metrics

        if not self._val:
            return
        preds, golds = zip(*self._val)
        self._val = []
        bleu2 = metrics.bleu([metrics.strip_descriptions(p) for p in preds],
                             [metrics.strip_descriptions(g) for g in golds], n=2)
        if bleu2 > self.best_bleu2:
            self.best_bleu2, self.bad_evals = bleu2, 0
        else:
            self.bad_evals += 1
            if self.bad_evals % self.train_cfg.plateau_patience == 0:
                self.lr_scale *= 0.5
        self.log("val_bleu2", bleu2, sync_dist=True)
        self.log("lr_scale", self.lr_scale)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.lr_scale, self.best_bleu2, self.bad_evals = checkpoint.get("mmdialog_plateau", (1.0, -1.0, 0))

    def configure_optimizers(self):
        t = self.train_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = t.fused_optimizer and all(p.is_cuda for p in params)
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
        warm = t.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (min(1.0, (s + 1) / warm) if warm else 1.0) * self.lr_scale)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {"model." + n for n in trainable_names(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CONFIG_KEY] = dump_config(self.model.config)
        checkpoint["mmdialog_plateau"] = (self.lr_scale, self.best_bleu2, self.bad_evals)


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """Regional ``torch.compile``: each transformers layer (``GradientCheckpointingLayer``)
    and each block a diffusers model lists in ``_repeated_blocks``. Identical
    blocks share one graph, so compiling costs about one layer, not the model;
    module names and checkpoints are unchanged. Returns the number compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    repeated = {name for mod in model.modules() for name in getattr(mod, "_repeated_blocks", None) or ()}
    blocks = [mod for mod in model.modules()
              if isinstance(mod, GradientCheckpointingLayer) or type(mod).__name__ in repeated]
    for mod in blocks:
        mod.compile()
    return len(blocks)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then rename: a crash
    mid-write never leaves a half-written checkpoint under the real name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


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


def save_trainable(model: DialogueModel, path: str | Path) -> Path:
    """Trainable weights + config, written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"trainable": state, "config": dump_config(model.config)}, tmp)
    os.replace(tmp, path)
    return path


def weights_digest(model: DialogueModel) -> str:
    """SHA-1 of the trainable weights, for comparing runs and ranks."""
    h = hashlib.sha1()
    for n, p in model.named_parameters():
        if p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


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
        ckpt_path = str(ckpt_dir / "last.ckpt") if resume is True else str(resume)
        if not Path(ckpt_path).is_file():
            raise MMDialogError(f"nothing to resume: {ckpt_path} does not exist")
    history = LossHistory()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=t.checkpoint_every,
                                 save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=False)
    interrupt = SaveOnInterrupt(ckpt_dir / "last.ckpt")
    callbacks: list[L.Callback] = [history, checkpoint, SaveAtLastStep(ckpt_dir / "last.ckpt", t.checkpoint_every),
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
        result["weights"] = str(save_trainable(model, out / "trainable.pt"))
        result["checkpoint"] = str(ckpt_dir / "last.ckpt")
    return result
