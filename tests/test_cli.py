"""The `mmdialog` command as users run it: a real subprocess, real data, real models."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "mmdialog" / "core" / "data" / "demo"


def run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "mmdialog", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("perceiver, bridge", [("qformer", "gumbel"), ("caption", "text")])
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
