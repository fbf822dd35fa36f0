"""Does the training loader keep up? Samples per second that one loader process
builds, with no stored encoder outputs (cold: every photo decoded and resized
for both encoders) and with every photo stored (warm: no pixels at all), and
the share of a real ``mmdialog train`` run the training process spends waiting
for batches with the default ``data.num_workers``.

    python benchmarks/bench_loader.py --scale tiny     # CI: 64-px encoders, 512-px photos
    python benchmarks/bench_loader.py --scale paper    # 224-px perceiver (K=32), 512-px generator,
                                                       # 1024×768 JPEGs

The dialogues are the embedded PhotoChat excerpt (42 dialogues, both speakers as
agents), each shared photo a synthetic JPEG written here. The collator is the real
one (the SmolLM2 tokenizer and chat template; the paper preset's Llama-2 tokenizer
costs about the same per token), built with the scale's image sizes. The warm
store's entries are written directly at paper shapes (Q-Former features
32 × 768 bf16, VAE posterior 2 × 4 × 64 × 64 float32). The ``train`` run is the
tiny model on the dialogues of the shared demo photos, each replaced by a 512-px
JPEG, from an empty store (its first epoch encodes), CPU.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mmdialog import build  # noqa: E402
from mmdialog.core.caching import content_key  # noqa: E402
from mmdialog.core.data import demo_dialogues  # noqa: E402

SCALES = {
    # perceiver side, K, generator side, photo width × height
    "tiny": dict(perceiver=64, k=8, generator=64, photo=(512, 512)),
    "paper": dict(perceiver=224, k=32, generator=512, photo=(1024, 768)),
}


def synthetic_jpeg(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A photo-like JPEG (smooth colour fields plus grain: about 100-250 KB at 1024×768)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / rng.uniform(40, 200) + c) * np.cos(y / rng.uniform(40, 200))
                     for c in range(3)], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return path


def with_photos(dialogues, folder: Path, size: tuple[int, int]):
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for d in dialogues:
        for t in d.turns:
            for p in t.photos:
                p.path = synthetic_jpeg(folder / f"{n}.jpg", size, n)
                n += 1
    return dialogues, n


def samples_per_s(collator, samples, batch_size: int, repeats: int) -> float:
    """One loader process, steady state: the first batch (the worker's start) is not timed."""
    loader = DataLoader(samples * repeats, batch_size=batch_size, num_workers=1, collate_fn=collator)
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch)
    return n / (time.perf_counter() - start)


def fill_store(model, keys: list[str]) -> None:
    """Entries at paper shapes, written straight into the stores (the loader reads only their headers)."""
    shapes = {"perceiver": {"features": torch.zeros(32, 768, dtype=torch.bfloat16)},
              "generator": {"mean": torch.zeros(4, 64, 64), "std": torch.ones(4, 64, 64)}}
    for kind, store in model.collator.stores.items():
        for key in keys:
            store.put(key, shapes[kind])


def train_wait(root: Path, steps: int) -> dict:
    """A tiny ``mmdialog train`` run on the shared-photo demo dialogues with 512-px JPEGs."""
    from mmdialog.core.data.jsonl import write_jsonl
    from mmdialog.core.training import train

    dialogues, _ = with_photos(demo_dialogues("train", photochat=False), root / "photos512", (512, 512))
    write_jsonl(dialogues, root / "train.jsonl")
    model = build("tiny", overrides={"data.path": str(root / "train.jsonl"), "data.feature_store": str(root / "fs-train"),
                                     "train.max_steps": steps, "train.out_dir": str(root / "run"),
                                     "train.checkpoint_every": 10_000, "train.val_every": 0})
    result = train(model, progress=False)
    return {"train_steps": result.steps, "train_fit_s": round(result.fit_s, 2),
            "data_wait_s": round(result.data_wait_s, 3),
            "data_wait_fraction": round(result.data_wait_s / result.fit_s, 4),
            "train_num_workers": result.num_workers, "encoded_photos": result.encoded_photos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None, help="passes over the samples (default: scale's)")
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--no-train", action="store_true", help="only the loader rates")
    args = ap.parse_args()
    s = SCALES[args.scale]
    repeats = args.repeats or (1 if args.scale == "paper" else 2)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build("tiny", overrides={
            "model.perceiver.config": {"vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "image_size": s["perceiver"], "patch_size": 16},
                                       "qformer_config": {"hidden_size": 32, "intermediate_size": 64,
                                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                                          "encoder_hidden_size": 32, "vocab_size": 100},
                                       "num_query_tokens": s["k"]},
            "model.generator.resolution": s["generator"]})
        dialogues, n_photos = with_photos(demo_dialogues(None, photos=False), root / "photos", s["photo"])
        samples = model.collator.samples(dialogues)
        model.collator.stores = {}
        cold = samples_per_s(model.collator, samples, args.batch_size, repeats)
        model.use_feature_stores(root / "fs")
        keys = sorted({content_key(p.path) for d in dialogues for p in d.photos})
        fill_store(model, keys)
        warm = samples_per_s(model.collator, samples, args.batch_size, repeats * 5)
        photo_kb = sum(p.path.stat().st_size for d in dialogues for p in d.photos) / n_photos / 1024
        out = {"scale": args.scale, "samples": len(samples), "photos": n_photos, "photo_kb": round(photo_kb, 1),
               "perceiver_px": s["perceiver"], "generator_px": s["generator"], "batch_size": args.batch_size,
               "cold_samples_per_s": round(cold, 2), "warm_samples_per_s": round(warm, 2),
               "warm_over_cold": round(warm / cold, 1)}
        if not args.no_train:
            out |= train_wait(root, args.train_steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
