"""The paper-scale benchmark script runs end to end at tiny scale on CPU (no timing asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [[], ["--reference-recipe"]])
def test_bench_paper_step_tiny(flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paper_step.py"), "--scale", "tiny",
                          "--device", "cpu", "--micro-batch", "2", "--accumulate", "1", "--steps", "1", *flags],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["recipe"] == ("reference" if flags else "mmdialog-default") and not r["oom"]
    assert r["dialogues_per_step"] == 2 and r["flops_per_step"] > 0 and r["step_s"] > 0
    parts = r["seconds_per_step"]
    assert {"llm_fwd", "bridge_fwd", "text_encoder_fwd", "vae_encode_fwd", "unet_fwd", "optimizer"} <= set(parts)
    assert (parts["perceiver_fwd"] > 0) != bool(flags)  # the reference recipe has no perceiver
    assert (parts["vae_encode_fwd"] > 0) == bool(flags)  # ours reads cached VAE posteriors


def test_bench_paper_step_sweep_tiny():
    """One build, every setting of SWEEP measured (micro-batches capped at --dialogues)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_paper_step import SWEEP

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paper_step.py"), "--scale", "tiny",
                          "--device", "cpu", "--sweep", "--dialogues", "2", "--steps", "1", "--warmup", "0"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    rows = r["sweep"]
    assert [(x["llm_checkpoint_every"], x["unet_checkpoint"]) for x in rows] == [s[1:] for s in SWEEP]
    assert all(not x["oom"] and x["dialogues_per_step"] == 2 and x["step_s"] > 0 for x in rows)
    assert r["best_under_cap"] == max(rows, key=lambda x: x["dialogues_per_s"])
