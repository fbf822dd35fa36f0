"""Does the `make demo` model know *when* to share, again and again? Prints one JSON object.

Scripted conversations (``CONVERSATIONS``: four user turns each, worded unlike
the training dialogues) are played through real sessions, as `mmdialog chat`
plays them: each photo the model shares is saved and stays in the history, so
a later request is answered with earlier photos in the context.

* ``share_rate_by_position``: per turn position 1–4, the photo requests there
  whose reply shares a photo (position 2–4: after earlier turns, most of which
  shared one);
* ``share_rate_small_talk``: small-talk turns whose reply shares one (should be ~0);
* ``right_photo_rate``: photo requests answered with the expected library photo;
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
import re
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAT, COFFEE, ROCKET, COINS = "chelsea.png", "coffee.png", "rocket.jpg", "coins.png"
GALAXIES, ASTRONAUT, CAMERA = "hubble_deep_field.jpg", "astronaut.png", "camera.png"
#: Conversations of four user turns: (text, the library photo a request asks for; None: small talk).
#: None of these sentences is a turn of the training dialogues (core/data/demo/share.jsonl).
CONVERSATIONS: list[list[tuple[str, str | None]]] = [
    [("can I see a photo of your coffee?", COFFEE), ("looks good! how was your day?", None),
     ("do you have a picture of a rocket?", ROCKET), ("send me a pic of the galaxies", GALAXIES)],
    [("show me a photo of your cat", CAT), ("I'd love to see the coins too", COINS),
     ("nice weather today, isn't it?", None), ("got a picture of the astronaut?", ASTRONAUT)],
    [("hi, how are you?", None), ("show me the coins", COINS),
     ("could you share a photo of your espresso?", COFFEE), ("and one of your cat?", CAT)],
    [("do you have a picture of a rocket launch?", ROCKET), ("what kind of music do you listen to?", None),
     ("I'd love to see your cat!", CAT), ("now show me a photo of space", GALAXIES)],
    [("tell me a joke", None), ("what are you up to?", None),
     ("send me a picture of the galaxies", GALAXIES), ("can you show me the astronaut photo?", ASTRONAUT)],
    [("any photos of that old camera?", CAMERA), ("can I see your coffee too?", COFFEE),
     ("show me a picture of the rocket launch", ROCKET), ("see you later!", None)],
    [("good evening!", None), ("send me a picture of the astronaut", ASTRONAUT),
     ("how has your week been?", None), ("may I see a photo of your coins?", COINS)],
    [("let me see your cat", CAT), ("do you have a picture of the galaxies?", GALAXIES),
     ("show me your coffee", COFFEE), ("I just got back from the gym", None)],
]


def play(model, conversations: list[list[tuple[str, str | None]]], max_new_tokens: int,
         photos_dir: str) -> list[list[dict]]:
    """Each conversation in its own session, all answered together turn by turn (as the
    server batches concurrent requests): per conversation, one record per turn."""
    from mmdialog import GenerationOptions, Session
    from mmdialog.core.session import reply_batch

    opts = GenerationOptions(seed=0, max_new_tokens=max_new_tokens)
    sessions = [Session(model, photos_dir=photos_dir, **opts.model_dump()) for _ in conversations]
    out: list[list[dict]] = [[] for _ in conversations]
    for turn in range(max(len(c) for c in conversations)):
        live = [n for n, c in enumerate(conversations) if turn < len(c)]
        for n in live:
            sessions[n].begin(conversations[n][turn][0], [], opts)
        for n, reply in zip(live, reply_batch([sessions[n] for n in live], opts)):
            text, want = conversations[n][turn]
            out[n].append({"position": turn + 1, "prompt": text, "wants": want, "reply": reply.plain,
                           "raw": reply.text, "shared": reply.shared,
                           "photos": [{"source": p.source, "file": p.file.name if p.file else None,
                                       "score": round(p.score, 3) if p.score is not None else None}
                                      for p in reply.photos]})
    return out


_REPLY = re.compile(r"[^\[\]<>]*(\[img\][^\[\]<>]*\[/img\][^\[\]<>]*)*")


def clean(raw: str) -> bool:
    """A reply as the model should write it: text and whole ``[img] … [/img]`` spans, each
    description closed once, no ``<image>`` slot or ``<|…|>`` control token in it."""
    return bool(_REPLY.fullmatch(raw))


def rates(played: list[list[dict]]) -> dict:
    turns = [t for conv in played for t in conv]
    asked = [t for t in turns if t["wants"]]
    small = [t for t in turns if not t["wants"]]
    by_position = {}
    for pos in sorted({t["position"] for t in asked}):
        here = [t for t in asked if t["position"] == pos]
        by_position[str(pos)] = round(sum(t["shared"] for t in here) / len(here), 3)
    right = [t for t in asked if any(p["file"] == t["wants"] for p in t["photos"])]
    return {"share_rate_by_position": by_position,
            "share_rate_asked": round(sum(t["shared"] for t in asked) / len(asked), 3),
            "share_rate_small_talk": round(sum(t["shared"] for t in small) / len(small), 3),
            "right_photo_rate": round(len(right) / len(asked), 3),
            "unclean_replies": [t["raw"] for t in turns if not clean(t["raw"])],
            "n_requests": len(asked), "n_small_talk": len(small)}


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
    with tempfile.TemporaryDirectory() as photos:
        played = play(model, CONVERSATIONS, args.max_new_tokens, photos)
    result = {"benchmark": "demo_sharing", "model": args.model, "load_s": round(load_s, 1), **rates(played),
              "conversations_s": round(time.perf_counter() - start, 1), "conversations": played}
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
