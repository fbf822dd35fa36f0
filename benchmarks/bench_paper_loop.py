"""The real ``mmdialog train`` loop at paper shapes: the model of
``bench_paper_step.py`` (RANDOM weights, Llama-2-7B + LoRA, BLIP-2 ViT-g +
Q-Former, SD 2.1-base; nothing downloaded) trained through
``mmdialog.core.training.train`` on synthetic JPEG dialogues (1024×768 photos,
PhotoChat-like turns) with the default loader workers, so the loader, the
feature store and Lightning's loop are all in the measurement.

    python benchmarks/bench_paper_loop.py --scale paper --json out.json   # a GPU
    python benchmarks/bench_paper_loop.py --scale tiny --steps 2          # CPU check of the script

Three runs on one model: ``cold`` (an empty feature store: the first epoch encodes
every photo), then two on the filled store, ``--warmup`` and ``--warmup + --steps``
optimizer steps; the difference of their loop times over ``--steps`` steps is the
steady state (the first steps compile). Prints one JSON object: dialogues/s of the
loop (compare ``bench_paper_step.py``'s step dialogues/s: goal ≥ 95 %), the share of
the loop the training process waited for batches, the photos each run encoded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_loader import synthetic_jpeg  # noqa: E402
from bench_paper_step import config  # noqa: E402

from mmdialog import build  # noqa: E402
from mmdialog.core.training import train  # noqa: E402


def write_dialogues(folder: Path, n: int, photos: int, size: tuple[int, int]) -> Path:
    """``n`` dialogues, each sharing one of ``photos`` JPEGs (a photo recurs, as in PhotoChat)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [synthetic_jpeg(folder / f"{i}.jpg", size, i) for i in range(photos)]
    lines = []
    for i in range(n):
        lines.append(json.dumps({"id": f"loop-{i}", "split": "train", "turns": [
            {"speaker": "0", "text": "hey, how was your weekend? we went hiking up by the lake with the dogs"},
            {"speaker": "1", "text": "so good! we went to the beach and the kids built a huge sandcastle"},
            {"speaker": "0", "text": "no way, do you have a photo of it?"},
            {"speaker": "1", "text": "sure, here it is",
             "photos": [{"path": str(files[i % photos]), "description": "a sandcastle on a sunny beach"}]},
            {"speaker": "0", "text": "that is amazing, the kids must have been so proud"}]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="steady-state optimizer steps measured")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dialogues", type=int, default=128)
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_dialogues(root / "data", args.dialogues, args.photos, (1024, 768))
        cfg = config(args.scale, False, True)
        cfg["data"] = {"path": str(data), "batch_size": args.micro_batch, "both_speakers": False,
                       "feature_store": str(root / "store")}
        cfg["train"] |= {"precision": "bf16-mixed" if cuda else "32-true", "compile": args.compile and cuda,
                         "warmup_steps": 0, "val_every": 0, "checkpoint_every": 100_000, "devices": 1,
                         "out_dir": str(root / "run")}
        model = build(cfg, device="cuda" if cuda else "cpu")
        runs = {}
        for name, steps in (("cold", args.steps), ("warm_short", args.warmup),
                            ("warm_long", args.warmup + args.steps)):
            model.config.train.max_steps = steps
            model.config.train.out_dir = str(root / name)
            r = train(model, progress=False)
            runs[name] = {"steps": r.steps, "fit_s": round(r.fit_s, 2), "data_wait_s": round(r.data_wait_s, 3),
                          "encoded_photos": r.encoded_photos, "num_workers": r.num_workers}
        long, short = runs["warm_long"], runs["warm_short"]
        steady = long["fit_s"] - short["fit_s"]
        out = {"scale": args.scale, "micro_batch": args.micro_batch, "photos": args.photos,
               "loop_dialogues_per_s": round(args.steps * args.micro_batch / steady, 2) if steady > 0 else None,
               "cold_loop_dialogues_per_s": round(runs["cold"]["steps"] * args.micro_batch / runs["cold"]["fit_s"], 2),
               "data_wait_fraction": round((long["data_wait_s"] - short["data_wait_s"]) / steady, 4)
               if steady > 0 else None, "runs": runs}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
