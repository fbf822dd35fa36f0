"""mmdialog JSONL: round trips and path resolution."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmdialog.core.data import DEMO_DIR, Dialogue, Photo, Turn, load_dialogues, write_jsonl
from mmdialog.core.data.jsonl import resolve_package_path


def _dialogues(img: Path) -> list[Dialogue]:
    return [
        Dialogue("a", [Turn("0", "hi there"), Turn("1", "look at this",
                       [Photo(id="p1", url="http://x/p1.jpg", description="A red square", path=img, offset=4)]),
                       Turn("0", "nice \u00e9t\u00e9 \u2028 ok")], source="mine", split="train"),
        Dialogue("b", [Turn("A", "", [Photo(description="only a description")]), Turn("B", "ok"),
                       Turn("B", "consecutive turns are kept")]),
    ]


def test_jsonl_round_trip(tmp_path):
    img = tmp_path / "img" / "p1.png"
    img.parent.mkdir()
    Image.new("RGB", (4, 4), "red").save(img)
    ds = _dialogues(img)
    out = tmp_path / "data" / "d.jsonl"
    assert write_jsonl(ds, out) == 2
    assert not list(out.parent.glob(".*.tmp"))
    back = load_dialogues(out)
    assert back.report.bad_records == 0
    ds[1].source = "jsonl"  # the default source of the reader
    assert back.dialogues == ds
    assert back.report.messages == back.report.turns == 6
    # relative paths: resolved against the JSONL file's folder
    out2 = tmp_path / "data" / "rel.jsonl"
    write_jsonl(ds, out2, relative_paths=True)
    line = json.loads(out2.read_text().split("\n")[0])
    assert line["turns"][1]["photos"][0]["path"] == "../img/p1.png"
    assert load_dialogues(out2).dialogues == ds
    # a JSON list of the same objects is read too, and gz
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([json.loads(x) for x in out.read_text().split("\n") if x]))
    assert load_dialogues(as_list).dialogues == ds


def test_gzip_jsonl(tmp_path):
    import gzip

    ds = _dialogues(tmp_path / "none.png")
    out = tmp_path / "d.jsonl"
    write_jsonl(ds, out)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(out.read_bytes()))
    r = load_dialogues(gz)
    assert [d.id for d in r] == ["a", "b"]
    # the image path does not exist: photo kept, path None, reported as missing
    assert r[0].photos[0].path is None and r.report.missing_images == 2
    assert any(p.kind == "missing_image" and "does not exist" in p.message for p in r.report.problems)


def test_package_paths():
    p = resolve_package_path("pkg:skimage/data/chelsea.png")
    assert p is not None and p.is_file()
    assert resolve_package_path("pkg:no_such_package_xyz/a.png") is None


def test_demo_jsonl_photos_resolve():
    r = load_dialogues(DEMO_DIR / "chat.jsonl")
    assert r.report.bad_records == 0 and len(r) == 8
    assert r.report.images_found == 8 and r.report.missing_images == 0
