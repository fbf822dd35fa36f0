"""Training-step benchmark of the embedded default (tiny preset) on CPU.

Prints one JSON object: median step time (batch of 2 photo-sharing samples,
forward + backward + AdamW), time in the bridge's forward, peak RSS, and the
static vocabulary map's build and cached-load times.

    python benchmarks/bench_step.py [--steps 10] [--batch-size 2] [--bridge gumbel]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmdialog import build  # noqa: E402
from mmdialog.core.collator import training_samples  # noqa: E402
from mmdialog.core.data import demo_dialogues  # noqa: E402
from mmdialog.core.vocab import build_static_map, static_map  # noqa: E402

TARGETS = {"step_s": 1.2, "bridge_fraction": 0.10, "peak_rss_gb": 4.0, "map_cached_load_s": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--bridge", default="gumbel")
    ap.add_argument("--perceiver", default="qformer")
    args = ap.parse_args()
    torch.manual_seed(0)

    model = build("tiny", bridge=args.bridge, perceiver=args.perceiver)
    model.train()
    # Sharer-side samples of dialogues with a photo: every step runs both losses.
    samples = [s for s in training_samples(demo_dialogues("train"), both_speakers=False)
               if any(p.path for p in s[0].photos)]
    batches = [model.collator(samples[i:i + args.batch_size])
               for i in range(0, len(samples) - args.batch_size + 1, args.batch_size)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    bridge_time = [0.0]
    t0 = [0.0]
    model.bridge.register_forward_pre_hook(lambda *a: t0.__setitem__(0, time.perf_counter()))
    model.bridge.register_forward_hook(lambda *a: bridge_time.__setitem__(0, bridge_time[0] + time.perf_counter() - t0[0]))

    steps, bridges, tokens = [], [], []
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        bridge_time[0] = 0.0
        start = time.perf_counter()
        out = model(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
            bridges.append(bridge_time[0])
            tokens.append(int(batch.attention_mask.sum()))

    llm_tok, clip_tok = model.llm.tokenizer, model.generator.text_towers[0].tokenizer
    n = len(llm_tok)
    start = time.perf_counter()
    m = build_static_map(llm_tok, clip_tok, n)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        static_map(llm_tok, clip_tok, n, d)
        start = time.perf_counter()
        static_map(llm_tok, clip_tok, n, d)
        load_s = time.perf_counter() - start

    step = statistics.median(steps)
    bridge = statistics.median(bridges)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    result = {
        "benchmark": "tiny_train_step_cpu",
        "bridge": args.bridge, "perceiver": args.perceiver, "batch_size": args.batch_size,
        "steps_timed": args.steps, "tokens_per_batch_median": statistics.median(tokens),
        "step_s_median": round(step, 4), "step_s_min": round(min(steps), 4),
        "bridge_s_median": round(bridge, 4), "bridge_fraction": round(bridge / step, 4),
        "peak_rss_gb": round(rss, 3),
        "static_map_nnz": int(m._nnz()), "static_map_shape": list(m.shape),
        "static_map_build_s": round(build_s, 3), "static_map_cached_load_s": round(load_s, 4),
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "targets": TARGETS,
    }
    result["meets_targets"] = {
        "step": step <= TARGETS["step_s"], "bridge": bridge / step <= TARGETS["bridge_fraction"],
        "rss": rss <= TARGETS["peak_rss_gb"], "map_load": load_s <= TARGETS["map_cached_load_s"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
