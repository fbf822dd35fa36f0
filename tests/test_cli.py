"""The `mmdialog` command as users run it: a real subprocess, real data, real models."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mmdialog" / "core" / "data" / "demo"


def run(*args, timeout=600, cwd=None):
    """``mmdialog ARGS`` from ``cwd`` (default: a new temporary folder, so that the relative default
    out-dir, runs/tiny, is never the repository's: `make demo` trains there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="mmdialog-test-cwd-") as tmp:
        return subprocess.run([sys.executable, "-m", "mmdialog", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=cwd or tmp)


@pytest.mark.parametrize("perceiver, bridge", [("qformer", "gumbel"),
                                                pytest.param("caption", "text", marks=pytest.mark.slow)])
def test_train_prints_both_losses(tmp_path, perceiver, bridge):
    """The end-to-end model and the pipeline baseline train with the same command."""
    out = run("train", "--perceiver", perceiver, "--bridge", bridge, "--max-steps", "3", "--quiet",
              "--data", str(DEMO / "chat.jsonl"), "--out-dir", str(tmp_path), "--set", "data.both_speakers=false")
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 3
    assert all("text_loss" in s and "image_loss" in s for s in steps)
    # sharer-only samples of dialogues that all share a photo: every step has an image loss
    assert all(float(s.split("image_loss")[1]) > 0 for s in steps)
    assert (tmp_path / "trainable.pt").exists()
    assert (tmp_path / "logs").is_dir()
    # only mmdialog's own lines on the terminal; the libraries' notices are in the run's log
    assert [line.split(" ")[0] for line in out.stderr.strip().splitlines()] == ["data:", "building", "trainable"]
    assert "GPU available" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["train", "--perceiver", "clip"], "error: unknown perceiver plugin 'clip'; available: caption, qformer"),
    (["train", "--set", "train.lr=-1"], "error: config field 'train.lr': Input should be greater than 0"),
    (["train", "--set", "model.bridge.tau"], "error: --set expects key=value"),
    (["train", "--config", "nowhere.yaml"], "error: config file nowhere.yaml does not exist"),
    (["train", "--set", "model.generator.path=/no/such/sd"], "error: generator sd: folder '/no/such/sd' does not exist"),
])
def test_user_errors_are_one_line_without_traceback(args, message):
    out = run(*args, timeout=180)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-1000:]
    assert "Traceback" not in out.stderr


def test_config_show_and_plugins():
    out = run("config", "show", "--bridge", "text")
    assert out.returncode == 0 and "name: text" in out.stdout
    out = run("plugins", "--json")
    assert out.returncode == 0 and '"name": "sdxl"' in out.stdout


def test_data_commands_are_mounted():
    out = run("data", "check", str(DEMO / "photochat"))
    assert out.returncode in (0, 1), out.stderr
    assert "42" in out.stdout


def test_train_never_overwrites_an_earlier_run(tmp_path):
    (tmp_path / "trainable.pt").write_bytes(b"an earlier run's weights")
    out = run("train", "--out-dir", str(tmp_path), "--max-steps", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} holds an earlier run (trainable.pt); continue it with --resume last, or choose "
        "another --out-dir, or --overwrite")
    assert (tmp_path / "trainable.pt").read_bytes() == b"an earlier run's weights"


def test_version():
    from mmdialog import __version__

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mmdialog {__version__}"


def test_a_session_removes_its_empty_temporary_folder_at_exit():
    code = ("import mmdialog, sys; from mmdialog.core.session import Session\n"
            "class M:\n    def eval(self): return self\n"
            "s = Session(M()); print(s.photos_dir)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).exists()
