"""Image lookup and loading with real files written by Pillow."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmdialog.core.data import (
    DataError,
    ImageIndex,
    Photo,
    load_dialogues,
    load_image,
    resolve_image,
    to_tensor,
    url_filename,
)
from mmdialog.core.data.images import verify_image


def test_url_filename():
    url = "https://farm6.staticflickr.com/3789/8804001147_d92eb75fff_o.jpg"
    assert url_filename(url) == hashlib.sha1(url.encode()).hexdigest()[:16] + ".jpg"
    assert url_filename("http://x/a.PNG?size=2").endswith(".png")
    assert url_filename("http://x/image?id=3").endswith(".jpg")  # no extension → .jpg


def test_resolve_by_id_basename_and_url(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a1a9d7a530eade0b.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "ca7f1c22d5781c58.png")
    url = "https://farm7.staticflickr.com/3948/15705071685_5d905852c2_o.jpg"
    Image.new("RGB", (4, 4)).save(tmp_path / url_filename(url))
    Image.new("RGB", (4, 4)).save(tmp_path / "own_name_o.jpg")
    idx = ImageIndex(tmp_path)
    assert idx.find(Photo(id="train/a1a9d7a530eade0b")) == tmp_path / "train" / "a1a9d7a530eade0b.jpg"
    assert idx.find(Photo(id="validation/ca7f1c22d5781c58")) == tmp_path / "ca7f1c22d5781c58.png"  # basename
    assert idx.find(Photo(url=url)) == tmp_path / url_filename(url)
    assert idx.find(Photo(url="http://h/x/own_name_o.jpg")) == tmp_path / "own_name_o.jpg"
    assert idx.find(Photo(id="../../etc/passwd")) is None
    assert idx.find(Photo(id="nope", url="http://h/missing.jpg")) is None
    assert resolve_image(Photo(id="train/a1a9d7a530eade0b"), tmp_path) is not None
    assert resolve_image(Photo(id="x")) is None


def test_alpha_png_composited_on_white(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))
    f = tmp_path / "alpha.png"
    im.save(f)
    out = load_image(f)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    la = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 128)).save(la)
    px = load_image(la).getpixel((0, 0))
    assert px[0] == px[1] == px[2] and 120 <= px[0] <= 135


def test_palette_with_transparency_and_greyscale(tmp_path):
    p = Image.new("P", (6, 6), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((0, 0), 0)
    f = tmp_path / "pal.png"
    p.save(f, transparency=0)
    out = load_image(f)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 3)) == (0, 255, 0)
    g = tmp_path / "grey.jpg"
    Image.new("L", (8, 6), 77).save(g)
    out = load_image(g)
    assert out.mode == "RGB" and out.size == (8, 6) and abs(out.getpixel((2, 2))[0] - 77) <= 2
    one = tmp_path / "bit.png"
    Image.new("1", (5, 5), 1).save(one)
    assert load_image(one).getpixel((0, 0)) == (255, 255, 255)
    s16 = tmp_path / "16.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(s16)
    assert load_image(s16).getpixel((0, 0)) == (255, 255, 255)


def test_truncated_and_garbage_files(tmp_path):
    f = tmp_path / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(f, quality=90)
    data = f.read_bytes()
    t = tmp_path / "trunc.jpg"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.jpg"):
        load_image(t)
    with pytest.raises(DataError, match="trunc.jpg"):
        verify_image(t)
    png = tmp_path / "full.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    tp = tmp_path / "trunc.png"
    tp.write_bytes(png.read_bytes()[:-300])
    with pytest.raises(DataError, match="trunc.png"):
        load_image(tp)
    g = tmp_path / "garbage.png"
    g.write_bytes(b"<html>not an image</html>")
    with pytest.raises(DataError, match="garbage.png"):
        load_image(g)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    assert load_image(f).size == (200, 200)


def test_huge_image_rejected_before_decoding(tmp_path):
    f = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(f)
    with pytest.raises(DataError, match=r"too large \(300x200 = 60,000 pixels > limit 50,000\)"):
        load_image(f, max_pixels=50_000)
    assert load_image(f, max_pixels=None).size == (300, 200)
    # a real bomb: 12000 x 12000 1-bit PNG (~18 KB file, 144 M pixels) at the default limit
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=False)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(DataError, match="bomb.png: image too large"):
        load_image(bomb)


def test_size_crop_and_to_tensor(tmp_path):
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, :50] = (255, 0, 0)  # left quarter red: cropped away by a center crop
    arr[:, 50:150] = (0, 255, 0)
    f = tmp_path / "wide.png"
    Image.fromarray(arr).save(f)
    im = load_image(f, size=64)
    assert im.size == (64, 64) and im.getpixel((0, 32))[1] > 200
    t = to_tensor(f, 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert float(t[1].mean()) > 0.95 and float(t[0].mean()) < 0.05
    t2 = to_tensor(Image.new("L", (40, 90), 255), 16)  # PIL input, grey, tall
    assert t2.shape == (3, 16, 16) and torch.allclose(t2, torch.ones_like(t2))
    jpg = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (10, 20, 200)).save(jpg)
    assert load_image(jpg, size=100).size == (100, 100)  # JPEG draft path


def test_load_dialogues_verify_images(tmp_path):
    import json

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:20])
    recs = [{"id": name, "turns": [{"speaker": "0", "text": "x", "photos": [{"path": f"{name}.png"}]}]}
            for name in ("good", "bad")]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    r = load_dialogues(f, verify_images=True)
    assert r.report.corrupt_images == 1 and r.report.images_found == 1
    assert r.by_id()["bad"].photos[0].path is None and r.by_id()["good"].photos[0].path == good
    (p,) = r.report.problems
    assert p.kind == "corrupt_image" and "bad.png" in str(p) and "[record bad]" in str(p)
    with pytest.raises(DataError, match="bad.png"):
        load_dialogues(f, verify_images=True, strict=True)
