"""`mmdialog serve` under concurrent clients: batched replies against one at a time,
measured in the same run on the same server (machines differ ~2× in absolute
speed; the ratio does not).

    python benchmarks/bench_server.py [--model tiny] [--clients 8] [--max-new-tokens 32]

One real uvicorn server on 127.0.0.1 serves the model. ``sequential``: the
clients' requests sent one after the other; ``concurrent``: the same requests
sent at once, which the server answers in batches (``--max-batch``). Greedy
decoding: both runs write the same replies (a batch runs until its longest
reply ends). Prints JSON: requests/s of each, their ratio (target ≥ 3 with 8
clients), the batches formed and the replies' mean length in words.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = ["hello there", "what did you do this weekend?", "show me your cat", "do you like coffee?",
           "where do you live?", "tell me about your garden", "any plans for the holidays?", "what are you reading?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="a preset or an exported folder")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()

    import httpx
    import torch
    from sharing_model import ServerThread

    from mmdialog import load
    from mmdialog.sdk.server import Limits, create_app

    torch.manual_seed(0)
    model = load(args.model)
    app = create_app(model, limits=Limits(max_batch=args.max_batch, max_queue=64), seed=0,
                     max_new_tokens=args.max_new_tokens)
    server = ServerThread(app)
    bodies = [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]} for i in range(args.clients)]
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            def ask(body):
                r = client.post("/v1/chat", json=body)
                r.raise_for_status()
                return r.json()

            ask(bodies[0])  # warm-up
            t0 = time.perf_counter()
            for body in bodies:
                ask(body)
            sequential = time.perf_counter() - t0
            batches_before = app.state.counters["batches"]
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                replies = list(pool.map(ask, bodies))
            concurrent_s = time.perf_counter() - t0
            batches = app.state.counters["batches"] - batches_before
    finally:
        server.stop()
    n = args.clients
    print(json.dumps({
        "model": args.model, "clients": n, "max_new_tokens": args.max_new_tokens, "max_batch": args.max_batch,
        "torch_threads": torch.get_num_threads(),
        "sequential_s": round(sequential, 2), "concurrent_s": round(concurrent_s, 2),
        "sequential_req_per_s": round(n / sequential, 3), "concurrent_req_per_s": round(n / concurrent_s, 3),
        "throughput_ratio": round(sequential / concurrent_s, 2), "target_ratio": 3.0,
        "batches_formed": batches, "max_batch_seen": app.state.counters["max_active"],
        "mean_reply_words": round(sum(len(r["raw_text"].split()) for r in replies) / n, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
