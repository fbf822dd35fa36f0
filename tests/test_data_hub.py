"""Datasets in the Hub's layout (Parquet, written with pyarrow) and photo checks
remembered between starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmdialog.core.data import load_dialogues

ROOT = Path(__file__).resolve().parents[1]


def dialogcc_row(i: int, split: str) -> dict:
    """A record with DialogCC's columns, as the Hub's Parquet conversion stores it."""
    return {"dialogue_id": f"wow:{i}", "split": split, "dialogue": [
        {"utterance_idx": 0, "utterance": f"hello {i}", "speaker": "Kitzie", "rationale": "",
         "shared_image": [], "description": ""},
        {"utterance_idx": 1, "utterance": "look at this", "speaker": "Arn", "rationale": "to show it",
         "shared_image": [{"image_url": f"https://example.com/{i}.jpg", "caption": "a dog on a beach"}],
         "description": "a brown dog running on a beach"},
        {"utterance_idx": 2, "utterance": "so cute", "speaker": "Kitzie", "rationale": "",
         "shared_image": [], "description": ""}]}


@pytest.fixture()
def hub_folder(tmp_path) -> Path:
    """The Hub's Parquet layout: data/<split>-00000-of-00001.parquet."""
    (tmp_path / "data").mkdir()
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        rows = [dialogcc_row(i, "valid" if split == "validation" else split) for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    return tmp_path


def test_a_hub_layout_parquet_folder_loads_through_the_dialogcc_reader_with_per_split_counts(hub_folder):
    every = load_dialogues(hub_folder)
    assert len(every.dialogues) == 10 and {d.source for d in every.dialogues} == {"dialogcc"}
    d = every.dialogues[0]
    assert [t.speaker for t in d.turns] == ["Kitzie", "Arn", "Kitzie"]
    assert d.turns[1].photos[0].description == "a brown dog running on a beach"
    assert d.turns[1].photos[0].url == "https://example.com/0.jpg"
    assert len(load_dialogues(hub_folder, split="dev").dialogues) == 2
    run = subprocess.run([sys.executable, "-m", "mmdialog", "data", "check", str(hub_folder), "--json"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    splits = json.loads(run.stdout)["splits"]
    assert {k: v["dialogues"] for k, v in splits.items()} == {"train": 5, "dev": 2, "test": 3}
    assert splits["train"]["photos"] == 5


def test_a_damaged_parquet_file_is_a_bad_file_not_a_crash(hub_folder):
    (hub_folder / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    result = load_dialogues(hub_folder)
    assert len(result.dialogues) == 7 and result.report.bad_files == 1


def test_an_unknown_hub_dataset_offline_is_one_clear_error(monkeypatch):
    from mmdialog.core.errors import DataError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hf:nobody/no-such-set: cannot load from the Hugging Face Hub"):
        load_dialogues("hf:nobody/no-such-set")


def test_photo_checks_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    """A second start trusts what the first found (the photo is not decoded again) until
    the file's size or modification time changes."""
    monkeypatch.setenv("MMDIALOG_CACHE", str(tmp_path / "cache"))
    photo = tmp_path / "images" / "p1.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (40, 30), "red").save(photo)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "d1", "turns": [
        {"speaker": "a", "text": "hi"},
        {"speaker": "b", "text": "look", "photos": [{"id": "p1", "description": "red"}]}]}) + "\n")

    def corrupt() -> int:
        result = load_dialogues(data, image_dir=photo.parent, verify_images=True)
        return result.report.corrupt_images

    assert corrupt() == 0
    st = photo.stat()
    photo.write_bytes(b"\0" * st.st_size)                 # same size …
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))  # … same mtime: remembered as good
    assert corrupt() == 0
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert corrupt() == 1                                 # changed: decoded again
