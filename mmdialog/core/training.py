"""Lightning training: a LightningModule around ``DialogueModel`` and a data
module that turns dialogues into (dialogue, agent) samples and batches.

Scale (devices, nodes, DDP/FSDP/DeepSpeed, precision) is Lightning's; no
distribution code lives here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mmdialog.core.config import Config, DataConfig, dump_config
from mmdialog.core.data.collate import Batch, training_samples
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.errors import MMDialogError
from mmdialog.core.model import DialogueModel

DEMO = "embedded:demo"


def read_dialogues(cfg: DataConfig, split: str | None = None) -> tuple[list[Dialogue], str]:
    """Dialogues for a data config, and a one-line summary of what was read."""
    from mmdialog.core.data import demo_dialogues, load_dialogues

    split = split or cfg.split
    if cfg.path == DEMO:
        dialogues = demo_dialogues(split or "train")
        return dialogues, f"embedded demo ({split or 'train'}): {len(dialogues)} dialogues"
    result = load_dialogues(cfg.path, format=cfg.format, split=split, image_dir=cfg.image_dir)
    if not result.dialogues:
        raise MMDialogError(f"no usable dialogues in {cfg.path}: run `mmdialog data check {cfg.path}`")
    return result.dialogues, result.report.headline()


class SampleDataset(Dataset):
    def __init__(self, samples: list[tuple[Dialogue, str]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Dialogue, str]:
        return self.samples[i]


class DialogueDataModule(L.LightningDataModule):
    def __init__(self, config: Config, collator) -> None:
        super().__init__()
        self.cfg = config.data
        self.collator = collator
        self.summary = ""

    def setup(self, stage: str | None = None) -> None:
        dialogues, self.summary = read_dialogues(self.cfg, self.cfg.split or "train")
        self.train_set = SampleDataset(training_samples(dialogues, self.cfg.both_speakers))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True,
                          collate_fn=self.collator, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0)


class DialogueModule(L.LightningModule):
    def __init__(self, model: DialogueModel) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = model.config.train

    def transfer_batch_to_device(self, batch: Batch, device, dataloader_idx: int) -> Batch:
        return batch.to(device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if hasattr(self.model.bridge, "set_step"):
            self.model.bridge.set_step(self.global_step)
        out = self.model(batch)
        n = len(batch)
        self.log("loss", out["loss"].detach(), batch_size=n)
        self.log("text_loss", out["text_loss"].detach(), prog_bar=True, batch_size=n)
        self.log("image_loss", out["image_loss"].detach(), prog_bar=True, batch_size=n)
        return out["loss"]

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay)
        warm = self.train_cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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


def train(model: DialogueModel, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` per its config; return the loss history and where weights went."""
    cfg = model.config
    t = cfg.train
    history = LossHistory()
    trainer = L.Trainer(
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate, precision=t.precision,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        default_root_dir=t.out_dir, log_every_n_steps=t.log_every, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, callbacks=[history],
        logger=L.pytorch.loggers.CSVLogger(t.out_dir, name="logs"))
    data = DialogueDataModule(cfg, model.collator)
    trainer.fit(DialogueModule(model), datamodule=data)
    out = {"data": data.summary, "steps": trainer.global_step, "history": history.rows}
    if trainer.is_global_zero:
        out["weights"] = str(save_trainable(model, Path(t.out_dir) / "trainable.pt"))
    return out
