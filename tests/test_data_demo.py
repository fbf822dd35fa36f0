"""Demo data and evaluation samples."""
from __future__ import annotations

from mmdialog.core.data import demo_dialogues, dialogue_samples, load_image, to_tensor, turn_samples


def test_demo_dialogues_splits():
    train = demo_dialogues("train")
    assert len(train) == 6 + 9
    with_photos = [d for d in train if d.source == "mmdialog-demo"]
    assert len(with_photos) == 6
    assert all(p.path is not None and p.path.is_file() for d in with_photos for p in d.photos)
    assert all(p.path is None for d in train if d.source == "photochat" for p in d.photos)
    assert len(demo_dialogues("dev")) == 1 + 9
    assert len(demo_dialogues("test")) == 1 + 24
    assert len(demo_dialogues(None)) == 8 + 42
    assert len(demo_dialogues("train", photochat=False)) == 6
    for d in demo_dialogues(None, photochat=False):
        assert len(d.photos) == 1 and d.photos[0].description
        share = next(t for t in d.turns if t.photos)
        assert "[img]" in share.text_with_photos()


def test_demo_photos_load():
    for d in demo_dialogues(None, photochat=False):
        p = d.photos[0].path
        im = load_image(p, size=64)
        assert im.mode == "RGB" and im.size == (64, 64)
    t = to_tensor(demo_dialogues("train", photochat=False)[0].photos[0].path, 32)
    assert t.shape == (3, 32, 32)


def test_turn_samples():
    d = demo_dialogues("train", photochat=True)[6]  # PhotoChat train/0
    assert d.id == "train/0"
    samples = turn_samples(d)
    assert len(samples) == len(d.turns) - 1
    for i, s in enumerate(samples, 1):
        assert s.index == i and s.target is d.turns[i] and list(s.context) == d.turns[:i]
        assert s.dialogue_id == "train/0" and s.key == f"train/0#{i}"
    assert {s.speaker for s in samples} == {"0", "1"}
    assert [s.index for s in samples if s.shares_photo] == [5]
    assert all(s.speaker == "0" for s in turn_samples(d, speakers=["0"]))
    allsamples = dialogue_samples(demo_dialogues("dev"))
    assert len(allsamples) == sum(len(x.turns) - 1 for x in demo_dialogues("dev"))
