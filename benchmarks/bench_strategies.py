"""Sharded training, run for real: the paper preset's model (RANDOM weights at the
real shapes, as bench_paper_step.py builds it) trained a few optimizer steps through
``mmdialog.train`` — the Lightning loop users run — under one ``train.strategy``,
on the embedded "when to share" dialogues and their photos. Run it once per strategy
and compare the losses: the same seeds give the same batches, noise and timesteps.

    python benchmarks/bench_strategies.py --scale paper --strategy auto --json auto.json
    python benchmarks/bench_strategies.py --scale paper --strategy fsdp --json fsdp.json
    python benchmarks/bench_strategies.py --scale paper --strategy deepspeed --json deepspeed.json
    python benchmarks/bench_strategies.py --scale tiny --device cpu --strategy fsdp   # CPU check

Prints one JSON object: the text and image loss of every step, seconds per step, peak memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_paper_step import config, write  # noqa: E402

from mmdialog import build  # noqa: E402
from mmdialog.core.training import read_dialogues, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--strategy", default="auto", help="train.strategy: auto, ddp, fsdp, deepspeed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"scale": args.scale, "strategy": args.strategy, "steps": args.steps, "batch_size": args.batch_size,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    if args.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        result["error"] = "deepspeed is not installed (pip install deepspeed)"
        print(write(result, args.json))
        sys.exit(1)
    cfg = config(args.scale, reference=False, grad_ckpt=True)
    out = tempfile.mkdtemp(prefix=f"bench-{args.strategy}-")
    cfg["data"] = {"path": "embedded:demo-share", "batch_size": args.batch_size}
    cfg["train"].update({"max_steps": args.steps, "warmup_steps": 0, "strategy": args.strategy, "devices": 1,
                         "accelerator": "gpu" if args.device == "cuda" else "cpu", "out_dir": out,
                         "checkpoint_every": 10_000, "offload_cached_encoders": False,
                         "precision": "bf16-mixed" if args.device == "cuda" else "32-true"})
    model = build(cfg)
    data = read_dialogues(model.config.data)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run = train(model, progress=False, data=data)
    seconds = time.perf_counter() - start
    result.update({
        "text_losses": [round(r["text_loss"], 4) for r in run.history],
        "image_losses": [round(r["image_loss"], 4) for r in run.history],
        "seconds_per_step": round(seconds / max(1, run.steps), 2), "steps_run": run.steps,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
    })
    print(write(result, args.json))


if __name__ == "__main__":
    main()
