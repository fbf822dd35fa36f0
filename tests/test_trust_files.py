"""Opening a file someone sent you runs no code from it.

Real malicious pickles: a ``trainable.pt`` and a Lightning-style ``.ckpt`` whose
otherwise genuine contents carry an object that, unpickled, creates a marker
file. The payload is checked to fire under a plain ``torch.load``; then every
entry point that opens a checkpoint — ``mmdialog.load``, ``export``, and the
``chat`` / ``export`` / ``eval`` / ``serve`` / ``train --resume`` commands in a
real subprocess — must refuse it with one line, and the marker must not appear.
A genuine ``trainable.pt`` and ``.ckpt`` still load (safe loading is not over-strict).
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from sharing_model import run_cli

import mmdialog
from mmdialog import ConfigError
from mmdialog.core.assembler import export
from mmdialog.core.checkpoint import read_checkpoint, save_trainable
from mmdialog.core.config import dump_config, load_config

REFUSED = r"checkpoint '.*' is refused: it holds Python objects besides tensors and plain data, and unpickling " \
          r"them could run code"


class Payload:
    """Unpickled, it creates ``marker``: what a real attack would do with ``os.system``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (str(self.marker),)


def _config_yaml() -> str:
    return dump_config(load_config("tiny", {}))


def _lightning_dict(state: dict, config: str, **extra) -> dict:
    """What Lightning writes (and mmdialog's checkpoint filter cuts): plain data and tensors only."""
    return {"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "last_model_path": ""}},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4)}},
                                  "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 1, "_last_lr": [1e-4]}], "hparams_name": "kwargs",
            "hyper_parameters": {}, "mmdialog_config": config, **extra}


def _malicious(folder: pathlib.Path, kind: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(file, marker): a checkpoint of ``kind`` that creates ``marker`` when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"PWNED-{kind}"
    state = {"bridge.proj.weight": torch.zeros(4, 4)}
    if kind == "ckpt":  # the payload deep inside, where a Lightning callback's state goes
        path = folder / "last.ckpt"
        torch.save(_lightning_dict(state, _config_yaml(), callbacks={"Evil": {"state": Payload(marker)}}), path)
    else:
        path = folder / "trainable.pt"
        legacy = {"_use_new_zipfile_serialization": False} if kind == "legacy-pt" else {}
        torch.save({"trainable": state, "config": _config_yaml(), "evil": Payload(marker)}, path, **legacy)
    return path, marker


@pytest.mark.parametrize("kind", ["pt", "ckpt", "legacy-pt"])
def test_the_payload_is_real(tmp_path, kind):
    """Without weights_only the file does run code: the refusals below are refusals of a live payload."""
    path, marker = _malicious(tmp_path, kind)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


ENTRY_POINTS = {
    "mmdialog.load(file)": lambda path, run, out: mmdialog.load(path),
    "mmdialog.load(run folder)": lambda path, run, out: mmdialog.load(run),
    "export(file, out)": lambda path, run, out: export(path, out),
    "read_checkpoint(file)": lambda path, run, out: read_checkpoint(path),
}


@pytest.mark.parametrize("kind", ["pt", "ckpt", "legacy-pt"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_the_python_api_refuses_a_malicious_checkpoint(tmp_path, entry, kind):
    run, out = tmp_path / "run", tmp_path / "out"
    path, marker = _malicious(run, kind)
    if kind == "ckpt":  # where a run folder keeps it
        (run / "checkpoints").mkdir()
        path = path.rename(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=REFUSED) as err:
        ENTRY_POINTS[entry](path, run, out)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "\x1b" not in message
    assert "weights_only=False" not in message  # no advice to do the unsafe thing
    assert not marker.exists() and not out.exists()


#: Each command that opens a checkpoint, once, on one of the two malicious files.
COMMANDS = {
    "chat": ("pt", lambda path, tmp: ["chat", str(path), "-m", "hi"]),
    "export": ("ckpt", lambda path, tmp: ["export", str(path), str(tmp / "out")]),
    "eval": ("pt", lambda path, tmp: ["eval", str(path), "--limit", "1", "--no-images", "--out", str(tmp / "eval")]),
    "serve": ("ckpt", lambda path, tmp: ["serve", str(path), "--port", "0"]),
    "train --resume": ("ckpt", lambda path, tmp: ["train", "--resume", str(path), "--max-steps", "1", "--quiet",
                                                  "--out-dir", str(tmp / "train")]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_cli_refuses_a_malicious_checkpoint_with_one_line(tmp_path, command):
    kind, argv = COMMANDS[command]
    path, marker = _malicious(tmp_path / "sent", kind)
    # serve must exit before it listens: a timeout here means it served the file's model
    proc = run_cli(*argv(path, tmp_path), timeout=240)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and str(path) in lines[-1], proc.stderr[-3000:]
    assert re.search(REFUSED, lines[-1]), lines[-1]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_genuine_checkpoints_still_load(tmp_path):
    """A trainable.pt written by save_trainable, and the same weights as a Lightning .ckpt."""
    from mmdialog import build

    model = build("tiny", generator="library")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # weights a fresh build does not have, so loading must copy them
        for p in trainable.values():
            p.add_(0.01)
    pt = save_trainable(model, tmp_path / "run" / "trainable.pt")
    data = torch.load(pt, weights_only=True)
    ckpt = tmp_path / "last.ckpt"
    torch.save(_lightning_dict(data["trainable"], data["config"]), ckpt)
    for path in (pt, ckpt):
        loaded = mmdialog.load(path)
        params = dict(loaded.named_parameters())
        assert all(torch.equal(params[n], p) for n, p in trainable.items()), path
