"""Training data: (dialogue, agent) samples in an order that depends only on
(seed, epoch) — shuffled, or sorted by length as the reference does — served by
a loader whose position inside the epoch is saved in checkpoints, so a resumed
run sees exactly the batches it would have seen."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmdialog.core import markup
from mmdialog.core.config import Config
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.data.source import read_dialogues


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


class LengthSampler(Sampler[int]):
    """Samples by dialogue length in words, shortest first, ties in data order, the
    same every epoch: the reference's ``DialogueLengthSampler`` (no shuffling).
    ``set_epoch`` only records the epoch, for the loader's saved state."""

    def __init__(self, lengths: list[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def dialogue_words(dialogue: Dialogue) -> int:
    """Words of the dialogue with each photo as ``[img] description [/img]``: the
    length the reference sorts by (``str.split`` of its joined turns)."""
    return sum(len(t.text_with_photos(lambda p: markup.render(p.description)).split()) for t in dialogue.turns)


class ResumableLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints.

    ``training_step`` marks each batch consumed; on resume the first
    ``consumed`` batches of the interrupted epoch's (seeded, hence identical)
    order are skipped, so a run resumed mid-epoch sees exactly the batches it
    would have seen (Lightning restarts non-stateful loaders from the epoch
    start). The epoch is saved too: Lightning does not hand the sampler the
    interrupted epoch's number when it resumes in the middle of one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = 0
        self.wait_s = 0.0  # seconds the training process waited for batches
        self._skip = 0
        self._resume_epoch = 0

    def mark_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "epoch": getattr(self.sampler, "epoch", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A checkpoint taken after the epoch's last batch resumes at a new epoch.
        self._skip = state["consumed"] if state["consumed"] < len(self) else 0
        self._resume_epoch = state.get("epoch", 0)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.consumed = skip
        if skip and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self._resume_epoch)
        it = super().__iter__()
        for _ in range(skip):
            next(it, None)
        return self._timed(it)

    def _timed(self, it):
        """The batches, adding the time the training process waits for each to ``wait_s``."""
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - start
            yield batch


class DialogueDataModule(L.LightningDataModule):
    def __init__(self, config: Config, collator, data: tuple[list[Dialogue], str] | None = None) -> None:
        super().__init__()
        self.cfg = config.data
        self.val_turns = config.train.val_turns
        self.seed = config.model.seed
        self.collator = collator
        self.data = data
        self.summary = data[1] if data is not None else ""

    def setup(self, stage: str | None = None) -> None:
        dialogues, self.summary = self.data or read_dialogues(self.cfg, self.cfg.split or "train")
        self.train_set = SampleDataset(self.collator.samples(dialogues, self.cfg.both_speakers))

    def val_dataloader(self) -> DataLoader:
        """Dev turns with gold context; the module scores BLEU-2 of the replies."""
        from mmdialog.core.data.samples import dialogue_samples

        dev, _ = read_dialogues(self.cfg, "dev")
        samples = dialogue_samples(dev)[: self.val_turns or None]  # 0: the whole dev split
        return DataLoader(samples, batch_size=self.cfg.batch_size * 2, collate_fn=list)

    def sampler(self) -> Sampler[int]:
        if self.cfg.order == "length":
            return LengthSampler([dialogue_words(d) for d, _ in self.train_set.samples])
        return EpochShuffleSampler(len(self.train_set), self.seed)

    def train_dataloader(self) -> DataLoader:
        workers = loader_workers(self.cfg.num_workers, self.trainer)
        return ResumableLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=self.sampler(),
                               collate_fn=self.collator, num_workers=workers, persistent_workers=workers > 0,
                               pin_memory=workers > 0 and torch.cuda.is_available(),
                               prefetch_factor=4 if workers else None)


def loader_workers(setting: int | str, trainer: L.Trainer | None) -> int:
    """``data.num_workers``; ``auto``: none when the step runs on the CPU (a worker would
    take cores from it, and a batch whose photos are stored costs a millisecond to build),
    else up to 4 per device of the node, one CPU left to each device's training process."""
    if setting != "auto":
        return int(setting)
    from lightning.pytorch.accelerators import CPUAccelerator

    if trainer is None or isinstance(trainer.accelerator, CPUAccelerator):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus // max(1, trainer.num_devices) - 1))
