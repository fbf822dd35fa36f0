"""The paper-scale benchmark script runs end to end at tiny scale on CPU (no timing asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--reference-recipe"]])
def test_bench_paper_step_tiny(flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paper_step.py"), "--scale", "tiny",
                          "--device", "cpu", "--micro-batch", "2", "--accumulate", "1", "--steps", "1", *flags],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["recipe"] == ("reference" if flags else "mmdialog-default") and not r["oom"]
    assert r["compiled"] == r["autocast"] == (not flags)  # the paper preset's switches; the reference's
    assert r["dialogues_per_step"] == 2 and r["flops_per_step"] > 0 and r["step_s"] > 0
    parts = r["seconds_per_step"]
    assert {"llm_fwd", "bridge_fwd", "text_encoder_fwd", "vae_encode_fwd", "unet_fwd", "optimizer"} <= set(parts)
    assert (parts["perceiver_fwd"] > 0) != bool(flags)  # the reference recipe has no perceiver
    assert (parts["vae_encode_fwd"] > 0) == bool(flags)  # ours reads cached VAE posteriors


@pytest.mark.slow
def test_bench_paper_step_sweep_tiny():
    """One build, every setting of SWEEP measured (micro-batches capped at --dialogues)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_paper_step import SWEEP

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paper_step.py"), "--scale", "tiny",
                          "--device", "cpu", "--sweep", "--dialogues", "2", "--steps", "1", "--warmup", "0",
                          "--no-compile"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    rows = r["sweep"]
    assert [(x["llm_checkpoint_every"], x["unet_checkpoint"]) for x in rows] == [s[1:] for s in SWEEP]
    assert all(not x["oom"] and x["dialogues_per_step"] == 2 and x["step_s"] > 0 for x in rows)
    assert r["best_under_cap"] == max(rows, key=lambda x: x["dialogues_per_s"])


@pytest.mark.slow
def test_bench_paper_step_settings_and_lora_dtype_tiny():
    """--settings replaces SWEEP (MB:LLM_EVERY:UNET); --lora-dtype reaches the model; a bad list is one line."""
    script = str(ROOT / "benchmarks" / "bench_paper_step.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, script, "--scale", "tiny", "--device", "cpu", "--sweep", "--settings",
                          "2:2:outer,1:0:none", "--dialogues", "2", "--lora-dtype", "model", "--steps", "1",
                          "--warmup", "0", "--no-compile", "--no-autocast"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["lora_dtype"] == "model" and r["compiled"] is False and r["autocast"] is False
    assert [(x["micro_batch"], x["accumulate"], x["llm_checkpoint_every"], x["unet_checkpoint"])
            for x in r["sweep"]] == [(2, 1, 2, "outer"), (1, 2, 0, False)]
    bad = subprocess.run([sys.executable, script, "--settings", "16:x:all"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "expected MB:LLM_EVERY:UNET" in bad.stderr.splitlines()[-1]


def _estimator():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import estimate_paper_memory

    return estimate_paper_memory


def test_live_bytes_counts_storages_not_views():
    import torch

    est = _estimator()
    w = torch.nn.Parameter(torch.ones(100, 10))
    tracker = est.LiveBytes()
    tracker.ignore([w])
    with tracker:
        tracker.phase("a")
        x = torch.empty(1000)                      # 4000 bytes
        view, view_t = x[10:], x.view(10, 100).t()  # views allocate nothing
        x.add_(1)                                   # nor do in-place updates
        with torch.no_grad():
            w.mul_(2)                               # nor updates of tensors that existed before
        y = x * 2                                   # 4000 more
        assert tracker.live == 8000
        del y
        assert tracker.live == 4000
        tracker.phase("b")
        del x, view, view_t
        z = torch.empty(250, dtype=torch.float64)   # 2000
    assert tracker.peaks == {"a": 8000, "b": 4000}
    assert tracker.live == z.nbytes == 2000


def test_fit_recovers_a_bilinear_phase():
    est = _estimator()
    f = {"forward1": lambda b, n: 7 + 3 * b + 5 * n + 2 * b * n, "optimizer": lambda b, n: 100 + 0 * b}
    points = {(b, n): {ph: g(b, n) for ph, g in f.items()} for b in (1, 2) for n in (1, 2)}
    coef = est.fit(points)
    assert est.predict(coef, 16, 32) == ("forward1", f["forward1"](16, 32))
    assert est.predict(coef, 1, 1) == ("optimizer", 100)


def test_live_bytes_sees_gradient_checkpointing_save_memory():
    """The tracker on a real step of the tiny model: checkpointing the LLM and the
    UNet leaves fewer saved activations when the backward starts."""
    import torch

    est = _estimator()
    bench = est.bench
    model = bench.build(bench.config("tiny", False, False)).train()
    plain = est.phase_peaks(model, False, 2, 2, False, False)
    ckpt = est.phase_peaks(model, False, 2, 2, 1, True)
    assert set(plain) == {"forward1", "backward1", "forward2", "backward2", "optimizer"}
    assert ckpt["backward1"] < plain["backward1"]
    # The second micro-batch runs beside the first one's gradients.
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert plain["forward2"] >= plain["forward1"] + grads * 0.99
    assert not any(p.grad is not None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_dropout_saves_a_bool_mask_as_on_cuda():
    import torch

    est = _estimator()
    x = torch.ones(1000, requires_grad=True)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    tracker = est.LiveBytes()
    with est.cuda_dropout(model), tracker:
        y = model(x)
        assert tracker.live == 4000 + 1000  # the output and a bool mask
        y.sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad, kept.float() * 2) and 300 < int(kept.sum()) < 700
    assert "forward" not in vars(model[0])  # restored
    assert torch.equal(model.eval()(x), x)


@pytest.mark.slow
def test_fault_injection_kills_resumes_and_reaches_the_same_weights(tmp_path):
    """A real SIGKILL and a real SIGTERM (seed 0: in that order) at random moments of
    `mmdialog train`, each followed by --resume last: the final weights are the
    uninterrupted run's, bit for bit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_injection.py"), "--kills", "2",
                          "--steps", "6", "--max-delay", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["kills"] == 2 and r["resumes"] >= 2 and r["digest_equal"] and r["corrupt_checkpoints"] == 0
    assert r["sigkills"] == 1 and r["sigterms"] == 1


def test_bench_cli_prints_ratios():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cli.py"), "--repeat", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["import_torch_s"] > 0 and set(r["cases"]) >= {"mmdialog --help", "import mmdialog"}


@pytest.mark.slow
def test_bench_paper_reply_tiny(tmp_path):
    script = str(ROOT / "benchmarks" / "bench_paper_reply.py")
    out = subprocess.run([sys.executable, script, "--scale", "tiny", "--device", "cpu", "--tokens", "3",
                          "--steps", "2", "--sessions", "2", "--repeats", "1", "--warmup", "0",
                          "--json", str(tmp_path / "reply.json")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result == json.loads((tmp_path / "reply.json").read_text())
    assert {"device", "torch", "transformers", "diffusers", "baseline", "levers", "ours"} <= set(result)
    for name in ("baseline", "ours"):
        assert {"one", "batched", "throughput_ratio", "throughput_ratio_text"} <= set(result[name])
        assert {"ttft_s", "text_s", "photo_s", "replies_per_s"} <= set(result[name]["one"])
        assert result[name]["batched"]["sessions"] == 2
    assert set(result["levers"]) == {"static_cache", "scheduler"}  # the compile levers: CUDA only by default
    assert result["ours"]["levers"] == {"kv_cache": "static", "compile_decode": False, "scheduler": "dpm",
                                        "compile_unet": False}
