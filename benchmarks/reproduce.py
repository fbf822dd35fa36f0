"""The paper's PhotoChat table in one command: train the end-to-end and the
pipeline rows under the reference recipe, evaluate both as the reference does,
and write ``results.md`` with the published numbers beside ours.

    python benchmarks/reproduce.py --config paper --data /data/photochat \\
        --image-dir /data/photochat/images \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/reproduce

Rows: ``end-to-end`` (``--reference-recipe``: bag DVTM, the authors' prompt,
batches, schedule and padded conditioning) and ``pipeline``
(``reference_recipe="pipeline"``: LoRA r 256 α 512 no dropout, bridge
``text``, the UNet masking the description padding; decoded with beam
sampling, top-p 0.9, T 0.6). Each row is evaluated on the test split with
the reference's decoding (one 2-beam search per turn across ``[/img]``, 30
new tokens, 20 diffusion steps at guidance 7.5), its text clean-up, and the
weights ``--weights`` names (``last``: what the reference's test path
scores). It resumes where it stopped: a row whose ``trainable.pt`` exists is
trained, one with ``checkpoints/last.ckpt`` continues from it, an evaluated
row's ``eval/<row>.json`` is read back. ``--set key=value`` overrides the
config of both rows (``--set train.max_steps=4`` for a quick look).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from mmdialog.core.assembler import build, load  # noqa: E402
from mmdialog.core.checkpoint import LAST, TRAINABLE, find_checkpoint  # noqa: E402
from mmdialog.core.config import load_config, recipe  # noqa: E402
from mmdialog.core.data.source import read_dialogues  # noqa: E402
from mmdialog.core.evaluation import evaluate  # noqa: E402
from mmdialog.core.evaluation.table import results_table  # noqa: E402
from mmdialog.core.files import atomic_write  # noqa: E402
from mmdialog.core.training import train  # noqa: E402

#: (row, recipe, decoding)
ROWS: tuple[tuple[str, Any, dict[str, Any]], ...] = (
    ("end-to-end", True, recipe("reference")["decoding"]),
    ("pipeline", "pipeline", recipe("reference-pipeline")["decoding"]),
)

#: The published PhotoChat numbers, by row: the source, and each value transcribed from it (metric key of
#: ``results_table`` → number). A value not transcribed here prints as "–" with the source in its note.
PAPER = "Guo et al., An End-to-End Model for Photo-Sharing Multi-Modal Dialogue Generation, ICME 2025 " \
        "(arXiv 2408.08650v2), Table 1, PhotoChat"
PUBLISHED: dict[str, dict[str, Any]] = {
    "end-to-end": {"source": PAPER, "values": {}},
    "pipeline": {"source": PAPER, "values": {}},
}


def published_row(name: str) -> dict[str, Any]:
    entry = PUBLISHED[name]
    row: dict[str, Any] = {"model": f"{name} (published)", "dataset": "PhotoChat test", **entry["values"]}
    why = f"not transcribed from {entry['source']} (benchmarks/reproduce.py: PUBLISHED)"
    row["reasons"] = {k: why for k in ("bleu1", "bleu2", "rouge_l", "fid", "is", "intent_f1", "kid_mean",
                                       "bleu2_norm", "sacrebleu", "n_turns", "n_generated", "n_gold")}
    return row


def parse_sets(sets: list[str]) -> dict[str, Any]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: use key=value")
        out[key] = yaml.safe_load(value)
    return out


def run_row(name: str, recipe: Any, decoding: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    run = out / name
    overrides = {**parse_sets(args.set), "train.out_dir": str(run)}
    if args.data:
        overrides["data.path"] = args.data
    if args.image_dir:
        overrides["data.image_dir"] = args.image_dir
    cfg = load_config(args.config, overrides, reference_recipe=recipe)
    if not (run / TRAINABLE).is_file():  # not trained to the end yet: start, or continue from last.ckpt
        print(f"{name}: training{' (resumed)' if (run / LAST).is_file() else ''} -> {run}", flush=True)
        train(build(cfg), progress=False, resume=True if (run / LAST).is_file() else None)
    scored = out / "eval" / f"{name}.json"
    if scored.is_file():
        print(f"{name}: evaluated already ({scored})", flush=True)
        return json.loads(scored.read_text())
    weights = find_checkpoint(run, args.weights)
    print(f"{name}: evaluating {weights}", flush=True)
    model = load(weights)
    dialogues, summary = read_dialogues(cfg.data, "test")
    row = evaluate(model, dialogues, out / "eval", name=name, dataset=f"{cfg.data.path}:test", limit=args.limit,
                   batch_size=args.batch_size, draw=not args.no_images, inception_weights=args.inception_weights,
                   scoring="reference", **decoding, seed=cfg.model.seed)
    row["weights"] = str(weights)
    with atomic_write(scored) as tmp:
        tmp.write_text(json.dumps(row, indent=2, default=str))
    return row


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper", help="preset or YAML the recipe is merged over")
    p.add_argument("--data", help="PhotoChat root (default: the config's data.path)")
    p.add_argument("--image-dir", help="PhotoChat photos (default: the config's data.image_dir)")
    p.add_argument("--inception-weights", help="TF-ported Inception-v3 file: comparable FID/IS")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--weights", choices=("last", "best"), default="last",
                   help="weights scored: last (as the reference's test path) or best dev BLEU-2")
    p.add_argument("--limit", type=int, help="evaluate the first N test turns only")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch (the photos do not depend on it)")
    p.add_argument("--no-images", action="store_true", help="decide and describe, draw no photos")
    p.add_argument("--set", action="append", default=[], help="config override key=value, both rows")
    args = p.parse_args(argv)
    ours = [run_row(name, recipe, decoding, args) for name, recipe, decoding in ROWS]
    rows = [r for (name, _, _), row in zip(ROWS, ours) for r in (row, published_row(name))]
    table = results_table(rows) + f"\nPublished rows: {PAPER}.\n"
    path = Path(args.out) / "results.md"
    with atomic_write(path) as tmp:
        tmp.write_text(table)
    print(table)
    print(f"results: {path}")
    return path


if __name__ == "__main__":
    main()
