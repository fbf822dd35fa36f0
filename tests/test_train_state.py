"""Training state that cannot be lost or mixed: checkpoints verified on read,
one training per out-dir, folders replaced atomically, resume refused with
another model config, size caps shared by `data check` and training."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_training import DEMO, make

from mmdialog import MMDialogError, load_config
from mmdialog.core.checkpoint import check_resume_config, resume_checkpoint
from mmdialog.core.errors import ConfigError
from mmdialog.core.training import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run: checkpoints/last.ckpt (step 2) beside last.prev.ckpt (step 1)."""
    out = tmp_path_factory.mktemp("run")
    train(make(out, 2), progress=False)
    return out


def flip_tensor_bytes(path: Path) -> None:
    """Overwrite bytes inside the largest tensor record of a torch.save zip, in place:
    the zip directory stays intact (the file opens), only tensor values change."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        f.write(b"\xff" * 64)  # NaNs, as a bad disk block
    with zipfile.ZipFile(path) as z:
        assert z.namelist()


def test_damaged_tensor_bytes_are_detected_and_the_previous_checkpoint_used(run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    last, prev = ckpts / "last.ckpt", ckpts / "last.prev.ckpt"
    last.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    prev.write_bytes((run / "checkpoints" / "last.prev.ckpt").read_bytes())
    assert resume_checkpoint(last) == (last, None)
    flip_tensor_bytes(last)
    torch.load(last, weights_only=True, map_location="cpu")  # torch itself still reads it
    path, note = resume_checkpoint(last)
    assert path == prev and "\n" not in note
    assert note == f"{last} is damaged (truncated, unreadable or its bytes changed); resuming from the previous " \
                   f"checkpoint {prev}"
    flip_tensor_bytes(prev)
    with pytest.raises(ConfigError, match="cannot resume: .*last.ckpt is damaged .* and so is the previous one") as e:
        resume_checkpoint(last)
    assert "\n" not in str(e.value)


def test_damaged_trainable_weights_are_refused_in_one_line(run, tmp_path):
    from mmdialog.core.checkpoint import read_checkpoint

    weights = tmp_path / "trainable.pt"
    weights.write_bytes((run / "trainable.pt").read_bytes())
    assert read_checkpoint(weights)[0]
    flip_tensor_bytes(weights)
    with pytest.raises(ConfigError, match=r"trainable.pt' is damaged: its contents do not match the SHA-256"):
        read_checkpoint(weights)


def test_training_resumes_from_the_previous_checkpoint_when_the_last_is_damaged(run, tmp_path):
    import shutil

    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    flip_tensor_bytes(tmp_path / "checkpoints" / "last.ckpt")
    result = train(make(tmp_path, 2), progress=False, resume=True)
    # From step 1 (the previous checkpoint), not from the damaged step 2: one step trained.
    assert [r["step"] for r in result.history] == [2]
    assert any("resuming from the previous checkpoint" in n for n in result.notes)
    assert all(torch.isfinite(torch.tensor(r["text_loss"])) for r in result.history)


@pytest.mark.parametrize("override, change", [
    ({"model.llm.lora.r": 4}, "model.llm.lora.r: 8 → 4"),
    ({"model.perceiver.name": "caption"}, "model.perceiver.name: qformer → caption"),
])
def test_resume_with_another_model_config_names_the_difference(run, override, change):
    base = {"data.path": str(DEMO), "train.out_dir": str(run)}
    ckpt = run / "checkpoints" / "last.ckpt"
    check_resume_config(ckpt, load_config("tiny", {**base, "train.max_steps": 9,
                                                   "model.llm.gradient_checkpointing": True}))
    with pytest.raises(ConfigError) as e:
        check_resume_config(ckpt, load_config("tiny", {**base, **override}))
    assert change in str(e.value) and "\n" not in str(e.value)


def test_resume_with_another_perceiver_is_one_line_from_the_cli(run):
    """Before the model is built: the checkpoint's config is read, nothing else."""
    cmd = [sys.executable, "-m", "mmdialog", "train", "--data", str(DEMO), "--set", "data.split=train",
           "--set", "data.both_speakers=false", "--quiet", "--out-dir", str(run), "--resume", "last"]
    out = subprocess.run(cmd + ["--perceiver", "caption"], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.perceiver.name: qformer → caption" in lines[0], out.stderr


def test_a_second_training_into_the_same_out_dir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    cmd = [sys.executable, "-m", "mmdialog", "train", "--data", str(DEMO), "--set", "data.split=train",
           "--set", "data.both_speakers=false", "--quiet", "--max-steps", "1000", "--out-dir", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        lock = tmp_path / ".lock"
        while time.time() < deadline and not (lock.exists() and lock.read_text() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: {tmp_path} is in use by another training (pid {first.pid}): wait for it to end, or choose "
            "another --out-dir"]
        assert first.poll() is None  # the first one is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # A killed holder leaves the file, not the lock: the next one takes it at once.
    take = ("import sys; from mmdialog.core.files import lock_folder; "
            f"print(lock_folder({str(tmp_path)!r}, 'training'))")
    again = subprocess.run([sys.executable, "-c", take], capture_output=True, text=True, env=ENV, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == "True", again.stderr


SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mmdialog.core import files

    where, kill_at, exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    if not exchange:
        files._exchange = lambda a, b: False          # a system without RENAME_EXCHANGE
    files._step = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == kill_at else None
    with files.atomic_folder(where / "model", replace=True) as tmp:
        for i in range(3):
            (tmp / f"part{i}").write_text("new")
""")


@pytest.mark.parametrize("exchange, kill_at, holds", [
    (True, "written", "old"), (True, "exchanged", "new"), (True, None, "new"),
    (False, "written", "old"), (False, "renamed", "new"), (False, None, "new")])
def test_replacing_a_folder_never_leaves_the_name_without_a_complete_one(tmp_path, exchange, kill_at, holds):
    """`export --force` (``atomic_folder(replace=True)``) killed between its steps, for real."""
    model = tmp_path / "model"
    model.mkdir()
    for i in range(3):
        (model / f"part{i}").write_text("old")
    out = subprocess.run([sys.executable, "-c", SWAP, str(tmp_path), str(kill_at), "1" if exchange else "0"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == (-signal.SIGKILL if kill_at else 0), out.stderr
    assert sorted(p.name for p in model.iterdir()) == ["part0", "part1", "part2"]
    assert {p.read_text() for p in model.iterdir()} == {holds}
    if kill_at is None:
        assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left beside it


@pytest.fixture()
def oversized(tmp_path):
    """Three dialogues: one fine, one with a 25,000-character turn, one of 30 turns of 8,000."""
    def dialogue(i, texts):
        return {"id": f"d{i}", "turns": [{"speaker": "ab"[j % 2], "text": t} for j, t in enumerate(texts)]}

    rows = [dialogue(0, ["hi there", "hello"]), dialogue(1, ["hi", "x" * 25_000]),
            dialogue(2, ["word " * 1600] * 30)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_turn_and_record_caps_are_the_same_in_data_check_and_training(oversized):
    from mmdialog.core.config import DataConfig
    from mmdialog.core.data.source import read_dialogues

    check = subprocess.run([sys.executable, "-m", "mmdialog", "data", "check", str(oversized), "--json"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    report = json.loads(check.stdout)
    assert check.returncode == 1 and report["dialogues"] == 1 and report["bad_records"] == 2
    messages = [p["message"] for p in report["problems"]]
    assert messages == ["turn 2 holds 25,000 characters, over the cap of 20,000 (data.max_turn_chars); skipped",
                        "the record holds 240,000 characters, over the cap of 200,000 (data.max_record_chars); "
                        "skipped"]
    dialogues, summary = read_dialogues(DataConfig(path=str(oversized)))
    assert [d.id for d in dialogues] == ["d0"] and "2 bad records" in summary
    # One rule, one setting: raised caps keep them in both.
    raised = ["--max-turn-chars", "30000", "--max-record-chars", "300000"]
    check = subprocess.run([sys.executable, "-m", "mmdialog", "data", "check", str(oversized), "--json", *raised],
                           capture_output=True, text=True, env=ENV, timeout=120)
    assert json.loads(check.stdout)["dialogues"] == 3
    dialogues, _ = read_dialogues(DataConfig(path=str(oversized), max_turn_chars=30_000, max_record_chars=300_000))
    assert len(dialogues) == 3
    with pytest.raises(MMDialogError, match="max_turn_chars"):
        read_dialogues(DataConfig(path=str(oversized), strict=True))
