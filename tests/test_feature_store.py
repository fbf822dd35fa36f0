"""The on-disk feature store (core/caching.py): entries keyed by photo content, encoder
weights and resolution; torn entries recomputed; one encoding per photo across processes;
memory that does not grow with the store; training batches without pixels."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmdialog.core.caching import FeatureStore, content_key, weights_digest

ROOT = Path(__file__).resolve().parents[1]


def entry(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"mean": torch.randn(4, 8, 8, generator=g), "std": torch.rand(4, 8, 8, generator=g)}


def counting(store: FeatureStore, calls: list[int]):
    def compute(i: int) -> dict[str, torch.Tensor]:
        calls.append(i)
        return entry(i)
    return compute


def test_entries_are_kept_on_disk_and_a_torn_or_damaged_one_is_recomputed_never_read(tmp_path):
    store = FeatureStore(tmp_path, "vae-v1", "d1g35t", 64)
    calls: list[int] = []
    keys = ["aa11", "bb22", "aa11"]                      # a photo twice in one batch: encoded once
    got = store.fetch(keys, counting(store, calls))
    assert calls == [0, 1] and store.encoded == 2
    assert torch.equal(got[2]["mean"], entry(0)["mean"]) and torch.equal(got[1]["std"], entry(1)["std"])
    again = FeatureStore(tmp_path, "vae-v1", "d1g35t", 64)  # a later run
    assert [torch.equal(a["mean"], b["mean"]) for a, b in zip(again.fetch(keys, counting(again, calls)), got)] \
        == [True] * 3 and again.encoded == 0
    # A copy cut short: the header's offsets no longer reach the end of the file.
    path = store.path("aa11")
    path.write_bytes(path.read_bytes()[:-50])
    assert not store.complete("aa11") and store.get("aa11") is None and not path.exists()
    # A flipped byte in the tensors (same size, header intact): the CRC says so.
    data = bytearray(store.path("bb22").read_bytes())
    data[-3] ^= 0xFF
    store.path("bb22").write_bytes(bytes(data))
    assert store.complete("bb22") and store.get("bb22") is None
    calls.clear()
    got = store.fetch(keys, counting(store, calls))
    assert calls == [0, 1] and torch.equal(got[1]["std"], entry(1)["std"])
    assert not list(tmp_path.rglob("*.claim")) and not list(tmp_path.rglob("*.tmp"))
    # Another encoder's weights or resolution is another folder.
    assert FeatureStore(tmp_path, "vae-v1", "d1g35t", 512).folder != store.folder
    assert weights_digest("vae-v1", torch.ones(2)) != weights_digest("vae-v1", torch.zeros(2))
    # A key that is not a plain name never leaves the store's folder.
    assert store.folder in store.path("../../etc/passwd").parents


def test_a_photo_another_process_is_encoding_is_waited_for_and_a_dead_claim_is_taken_over(tmp_path):
    store = FeatureStore(tmp_path, "qformer-v1", "d1g35t", 64)
    helper = textwrap.dedent(f"""
        import sys, time, torch
        from mmdialog.core.caching import FeatureStore
        store = FeatureStore({str(tmp_path)!r}, "qformer-v1", "d1g35t", 64)
        assert store.claim("cc33")
        print("claimed", flush=True)
        time.sleep(1.0)
        store.put("cc33", {{"features": torch.full((8, 4), 7.0)}})
        store.release("cc33")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", helper], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        calls: list[int] = []
        got = store.fetch(["cc33"], lambda i: calls.append(i) or {"features": torch.zeros(8, 4)})
    finally:
        proc.wait(timeout=60)
    assert calls == [] and torch.equal(got[0]["features"], torch.full((8, 4), 7.0)) and store.encoded == 0
    # A process that died holding its claim (here: one that has exited) does not block the photo.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    claim = store.path("dd44").with_suffix(".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(f"{socket.gethostname()} {dead.stdout.strip()}")
    got = store.fetch(["dd44"], lambda i: {"features": torch.ones(8, 4)})
    assert store.encoded == 1 and torch.equal(got[0]["features"], torch.ones(8, 4)) and not claim.exists()


def test_training_batches_of_stored_photos_carry_no_pixels_and_train_the_same(tiny, cat_dialogue, tmp_path):
    """A batch whose photos both encoders hold is built without decoding a photo and
    gives the model the same inputs; one that mixes marks the stored photo's pixels NaN."""
    from mmdialog.core import collator

    loads: list[int] = []
    col = collator.Collator(tiny.llm, tiny.perceiver, tiny.collator.format, tiny.generator.resolution,
                            tiny.config.model.max_length,
                            image_loader=lambda p, s: loads.append(s) or collator.default_image_loader(p, s))
    col.stores = tiny.use_feature_stores(tmp_path)
    tiny.collator.stores = {}  # the shared model's own collator stays as it was
    cold = col([(cat_dialogue, "1")])
    assert cold.photo_pixels.shape[-1] == 64 and cold.desc_pixels.shape[-1] == 64 and len(loads) == 2
    mode = tiny.training
    tiny.train()
    try:
        torch.manual_seed(0)
        first = tiny(cold)
        warm = col([(cat_dialogue, "1")])
        assert len(loads) == 2                                    # nothing decoded
        assert warm.photo_pixels.shape == (1, 3, 0, 0) and warm.desc_pixels.shape == (1, 3, 0, 0)
        assert warm.photo_keys == cold.photo_keys == [content_key(cat_dialogue.turns[3].photos[0].path)]
        torch.manual_seed(0)
        second = tiny(warm)
    finally:
        tiny.train(mode)
    assert torch.equal(first["loss"], second["loss"])
    # The perceiver's entry is gone: that photo's pixels come back, the generator's stay out.
    col.stores["perceiver"].path(warm.photo_keys[0]).unlink()
    mixed = col([(cat_dialogue, "1")])
    assert mixed.photo_pixels.shape[-1] == 64 and mixed.desc_pixels.shape == (1, 3, 0, 0) and len(loads) == 3


def make(out: Path, store: Path, steps: int = 1):
    from mmdialog import build

    demo = ROOT / "mmdialog" / "core" / "data" / "demo" / "chat.jsonl"
    return build("tiny", overrides={"data.path": str(demo), "data.split": "train", "data.both_speakers": False,
                                    "data.feature_store": str(store), "train.max_steps": steps,
                                    "train.out_dir": str(out), "train.warmup_steps": 1})


@pytest.mark.slow
def test_a_second_identical_run_encodes_no_photo(tmp_path):
    from mmdialog.core.training import train

    first = train(make(tmp_path / "a", tmp_path / "store"), progress=False)
    second = train(make(tmp_path / "b", tmp_path / "store"), progress=False)
    # 1 step of 2 sharer samples: each shares one photo, perceived and drawn.
    assert first.encoded_photos == {"perceiver": 2, "generator": 2}
    assert second.encoded_photos == {"perceiver": 0, "generator": 0}
    manifest = json.loads((tmp_path / "b" / "manifest_rank0.json").read_text())
    assert manifest["encoded_photos"] == {"perceiver": 0, "generator": 0}
    assert second.history == first.history


RSS_PROBE = """
import resource, sys, time, torch
from mmdialog.core.caching import FeatureStore
store = FeatureStore(sys.argv[1], "qformer-v1", "synthetic", 224)
n = int(sys.argv[2])
keys = [f"{i:032x}" for i in range(n)]
for start in range(0, n, 32):  # what training does: a batch of photos at a time, every photo read
    rows = store.fetch(keys[start:start + 32], lambda i: 1 / 0)
    torch.stack([r["features"] for r in rows])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_photos_stored(tmp_path):
    """1k and 100k stored photos (tiny Q-Former features, written straight into the
    store), each read once: the peak RSS differs by far less than the 99k photos' bytes."""
    model = FeatureStore(tmp_path / "model", "qformer-v1", "synthetic", 224)
    model.put("0" * 32, {"features": torch.randn(8, 64)})
    blob = model.path("0" * 32).read_bytes()
    peaks = {}
    for n in (1_000, 100_000):
        store = FeatureStore(tmp_path / str(n), "qformer-v1", "synthetic", 224)
        for i in range(n):
            path = store.path(f"{i:032x}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / str(n)), str(n)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[n] = int(run.stdout.split()[-1])
    stored = 99_000 * len(blob)
    assert peaks[100_000] - peaks[1_000] < stored / 4, (peaks, stored)


@pytest.mark.slow
def test_two_processes_share_one_store_and_encode_each_photo_once(tmp_path, cat_photo):
    """Real DDP (gloo, 2 processes) through the CLI on dialogues that all share one photo:
    both ranks meet it in their first batch, one encodes it, the other reads it; a second
    run on the filled store encodes nothing and trains to the same weights."""
    lines = [json.dumps({"id": f"d{i}", "split": "train", "turns": [
        {"speaker": "a", "text": f"how was day {i}?"},
        {"speaker": "b", "text": "look", "photos": [{"path": str(cat_photo), "description": "a tabby cat"}]},
        {"speaker": "a", "text": "lovely"}]}) for i in range(4)]
    (tmp_path / "cats.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for name in ("cold", "warm"):
        out = tmp_path / name
        run = subprocess.run(
            [sys.executable, "-m", "mmdialog", "train", "--devices", "2", "--strategy", "ddp",
             "--set", "train.accelerator=cpu", "--data", str(tmp_path / "cats.jsonl"),
             "--set", "data.both_speakers=false", "--set", f"data.feature_store={tmp_path / 'store'}",
             "--max-steps", "2", "--quiet", "--out-dir", str(out)],
            capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append([json.loads((out / f"manifest_rank{r}.json").read_text()) for r in (0, 1)])
    cold, warm = runs
    for kind in ("perceiver", "generator"):
        assert sum(r["encoded_photos"][kind] for r in cold) == 1   # one photo, encoded once in all
        assert sum(r["encoded_photos"][kind] for r in warm) == 0
    assert cold[0]["weights_sha1"] == cold[1]["weights_sha1"] == warm[0]["weights_sha1"]
    assert not list((tmp_path / "store").rglob("*.claim"))


@pytest.mark.slow
def test_data_cache_fills_the_store_ahead_of_training_and_a_second_fill_encodes_nothing(tmp_path):
    demo = ROOT / "mmdialog" / "core" / "data" / "demo" / "chat.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    outs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-m", "mmdialog", "data", "cache", str(demo), "-c", "tiny",
                              "--feature-store", str(tmp_path), "--device", "cpu", "--quiet"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(run.stdout)
    assert "perceiver: 7 photo(s) encoded" in outs[0] and "generator: 7 photo(s) encoded" in outs[0]
    assert "perceiver: 0 photo(s) encoded" in outs[1] and "generator: 0 photo(s) encoded" in outs[1]
    # What training then asks for is there: a run on the same data encodes nothing.
    from mmdialog.core.training import train

    result = train(make(tmp_path / "run", tmp_path), progress=False)
    assert result.encoded_photos == {"perceiver": 0, "generator": 0}
    assert result.offloaded == ["perceiver.vision", "perceiver.qformer", "generator.vae"]  # from the start
