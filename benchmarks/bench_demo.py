"""Does the `make demo` model know *when* to share? Prints one JSON object.

* ``share_rate_asked``: replies to requests for a photo (phrasings not in the
  training dialogues) that share one, and which library photo each shared;
* ``share_rate_small_talk``: replies to small talk (not in the training
  dialogues either) that share one; should be ~0;
* ``excerpt``: intent F1 and BLEU-1/2 on the PhotoChat excerpt's test split
  (per turn, gold context, both speakers; the first ``--limit`` turns), what
  ``mmdialog eval`` reports. PhotoChat's photos are not shipped, so no photo
  scores there.

    python benchmarks/bench_demo.py [--model runs/tiny] [--limit 96]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Requests for a photo, worded unlike the training dialogues (core/data/demo/share.jsonl).
ASKED = ["show me a photo of your cat", "can I see a photo of your coffee?", "do you have a picture of a rocket?",
         "send me a pic of the galaxies", "show me the coins", "I'd love to see your cat!"]
#: Small talk: no photo is asked for or offered.
SMALL_TALK = ["good evening!", "how has your week been?", "nice weather today, isn't it?",
              "what do you do for fun?", "I just got back from the gym", "see you later!",
              "what kind of music do you listen to?", "tell me a joke", "hi, how are you?", "what are you up to?"]


def share_rate(model, prompts: list[str], max_new_tokens: int) -> dict:
    from mmdialog import Turn

    replies = model.respond_batch([([Turn("user", p)], "assistant") for p in prompts], seed=0,
                                  max_new_tokens=max_new_tokens)
    rows = [{"prompt": p, "reply": r.plain, "shared": r.shared,
             "photos": [{"source": ph.source, "file": ph.file.name if ph.file else None,
                         "score": round(ph.score, 3) if ph.score is not None else None} for ph in r.photos]}
            for p, r in zip(prompts, replies)]
    return {"rate": sum(r["shared"] for r in rows) / len(rows), "replies": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/tiny", help="run folder, checkpoint or exported folder")
    ap.add_argument("--limit", type=int, default=96, help="excerpt test turns scored (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    import mmdialog
    from mmdialog.core.data import demo_dialogues
    from mmdialog.core.evaluation import evaluate

    start = time.perf_counter()
    model = mmdialog.load(args.model)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    asked = share_rate(model, ASKED, args.max_new_tokens)
    small = share_rate(model, SMALL_TALK, args.max_new_tokens)
    result = {"benchmark": "demo_sharing", "model": args.model, "load_s": round(load_s, 1),
              "share_rate_asked": asked["rate"], "share_rate_small_talk": small["rate"],
              "retrieved_real_photo": sum(any(p["source"] == "retrieved" for p in r["photos"])
                                          for r in asked["replies"]),
              "prompts_s": round(time.perf_counter() - start, 1),
              "asked": asked["replies"], "small_talk": small["replies"]}
    if args.limit:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            row = evaluate(model, demo_dialogues("test", photos=False), out, name="demo",
                           dataset="embedded PhotoChat excerpt:test", limit=args.limit, draw=False,
                           max_new_tokens=args.max_new_tokens)
        result["excerpt"] = {k: row[k] for k in ("n_turns", "intent_f1", "intent_precision", "intent_recall",
                                                 "bleu1", "bleu2") if k in row}
        result["excerpt_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
