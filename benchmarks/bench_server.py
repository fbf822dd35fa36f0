"""`mmdialog serve` under concurrent clients: batched replies against one at a time,
measured in the same run on the same server (machines differ ~2× in absolute
speed; the ratio does not).

    python benchmarks/bench_server.py [--model tiny] [--clients 8] [--max-new-tokens 32]

One real uvicorn server on 127.0.0.1 serves the model; the official ``openai``
client asks it (``/v1/chat/completions``), as a user's program would.
``sequential``: the clients' requests sent one after the other; ``concurrent``:
the same requests sent at once from one thread each, which the server answers
in batches (``--max-batch``). Greedy decoding: both runs write the same
replies (a batch runs until its longest reply ends). Prints JSON: requests/s
of each, their ratio (target ≥ 3 with 8 clients), the batches formed, the
replies' mean length in tokens, and the time one ``respond_batch`` of all the
prompts takes without the server (the model's own batching gain: the ceiling
of the server's).
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

    import openai
    import torch
    from sharing_model import ServerThread

    from mmdialog import Turn, load
    from mmdialog.sdk.server import Limits, create_app

    torch.manual_seed(0)
    model = load(args.model)
    app = create_app(model, limits=Limits(max_batch=args.max_batch, max_queue=64), seed=0,
                     max_new_tokens=args.max_new_tokens)
    server = ServerThread(app)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        def ask(prompt):
            return client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": prompt}],
                                                  seed=0, max_completion_tokens=args.max_new_tokens)

        ask(prompts[0])  # warm-up
        t0 = time.perf_counter()
        alone = [ask(p) for p in prompts]
        sequential = time.perf_counter() - t0
        batches_before = app.state.counters["batches"]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            replies = list(pool.map(ask, prompts))
        concurrent_s = time.perf_counter() - t0
        batches = app.state.counters["batches"] - batches_before
    finally:
        server.stop()
    # The model alone: the prompts one at a time, then as one batch (no HTTP, no queue).
    options = {"max_new_tokens": args.max_new_tokens, "seed": 0}
    t0 = time.perf_counter()
    for p in prompts:
        model.respond_batch([([Turn("user", p)], "assistant")], **options)
    model_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.respond_batch([([Turn("user", p)], "assistant") for p in prompts], **options)
    model_batch = time.perf_counter() - t0
    n = args.clients
    print(json.dumps({
        "model": args.model, "clients": n, "max_new_tokens": args.max_new_tokens, "max_batch": args.max_batch,
        "torch_threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "sequential_s": round(sequential, 2), "concurrent_s": round(concurrent_s, 2),
        "sequential_req_per_s": round(n / sequential, 3), "concurrent_req_per_s": round(n / concurrent_s, 3),
        "throughput_ratio": round(sequential / concurrent_s, 2), "target_ratio": 3.0,
        "batches_formed": batches, "max_batch_seen": app.state.counters["max_active"],
        "same_replies": [r.choices[0].message.content for r in replies] == [r.choices[0].message.content
                                                                            for r in alone],
        "mean_completion_tokens": round(sum(r.usage.completion_tokens for r in replies) / n, 1),
        "model_only_sequential_s": round(model_one, 2), "model_only_batch_s": round(model_batch, 2),
        "model_only_ratio": round(model_one / model_batch, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
