"""PhotoChat reader on the real 42-dialogue excerpt shipped as demo data."""
from __future__ import annotations

import json
import shutil

import pytest

from mmdialog.core.data import DEMO_DIR, clean_description, detect_format, load_dialogues

EXCERPT = DEMO_DIR / "photochat"


def test_excerpt_counts():
    r = load_dialogues(EXCERPT)
    rep = r.report
    assert rep.files == 3
    assert rep.dialogues == len(r.dialogues) == 42
    assert rep.messages == 557  # before merging
    assert rep.share_turns == 42 and rep.photos == 42
    assert rep.bad_records == rep.bad_files == rep.warnings == 0
    assert rep.missing_images == 42  # no image folder
    assert rep.turns < 557
    assert {d.split for d in r} == {"train", "dev", "test"}
    assert [len(r.split(s)) for s in ("train", "dev", "test")] == [9, 9, 24]
    assert all(d.source == "photochat" for d in r)
    # every dialogue: speakers are "0"/"1", no two consecutive turns by one speaker
    for d in r:
        assert set(d.speakers) <= {"0", "1"}
        assert all(a.speaker != b.speaker for a, b in zip(d.turns, d.turns[1:]))
        sharers = [t.speaker for t in d.turns if t.photos]
        assert sharers == ["0"]


def test_train_dialogue_0_exact():
    d = load_dialogues(EXCERPT, split="train").by_id()["train/0"]
    got = [(t.speaker, t.text, [p.description for p in t.photos]) for t in d.turns]
    assert got == [
        ("1", "whats up", []),
        ("0", "i am with friends", []),
        ("1", "thats cool", []),
        ("0", "just small gettogether yeah", []),  # two messages merged with a space
        ("1", "yeah", []),
        ("0", "", ["Clothing, Woman, Drink, Man"]),
        ("1", "nice", []),
    ]
    photo = d.turns[5].photos[0]
    assert photo.url == "https://farm6.staticflickr.com/3789/8804001147_d92eb75fff_o.jpg"
    assert photo.id is None and photo.path is None and photo.offset == 0
    assert d.turns[5].text_with_photos() == "[img] Clothing, Woman, Drink, Man [/img]"


def test_share_merged_with_adjacent_messages_of_sharer():
    d = load_dialogues(EXCERPT / "train_00.first9.json").by_id()["train/1"]
    last = d.turns[-1]
    before = "Let me see if I can share the photo of the table with the cake."
    after = "It was very nice and beautiful. Her theme was spring flowers."
    assert last.speaker == "0" and last.text == f"{before} {after}"
    assert last.photos[0].offset == len(before)
    desc = "Food, Dessert, Tableware, Flower, Cake, Baked goods"
    assert last.photos[0].description == desc
    assert last.text_with_photos() == f"{before} [img] {desc} [/img] {after}"
    assert len(d.turns) == 10


@pytest.mark.parametrize(
    "style,person,expected",
    [
        ("raw", "drop", "The photo has your uncle Kairo. Objects in the photo: Suit, Man, Face"),
        ("objects", "drop", "Suit, Man, Face"),
        ("objects", "keep", "my uncle Kairo, Suit, Man, Face"),
        ("sentence", "drop", "A photo of suit, man and face."),
        ("sentence", "keep", "A photo of my uncle Kairo with suit, man and face."),
    ],
)
def test_description_styles_on_real_record(style, person, expected):
    r = load_dialogues(EXCERPT, split="train", description_style=style, person=person)
    assert r.by_id()["train/2"].photos[0].description == expected


def test_clean_description_edge_cases():
    assert clean_description("Objects in the photo: Chukar, Animal, \u9ce5") == "Chukar, Animal, \u9ce5"
    assert clean_description("Objects in the photo: Belt", "sentence") == "A photo of belt."
    assert clean_description("  a free-form caption ") == "a free-form caption"
    assert clean_description(None) == ""
    with pytest.raises(ValueError):
        clean_description("x", style="bogus")


def test_split_folder_root_and_single_file(tmp_path):
    root = tmp_path / "photochat"
    for split, name in (("train", "train_00.first9.json"), ("dev", "dev_00.first9.json"),
                        ("test", "test_00.first24.json")):
        (root / split).mkdir(parents=True)
        shutil.copy(EXCERPT / name, root / split / f"{split}_00.json")
    assert len(load_dialogues(root)) == 42
    assert len(load_dialogues(root, split="dev")) == 9
    assert len(load_dialogues(root, split="valid")) == 9  # alias
    assert len(load_dialogues(root / "test")) == 24
    single = load_dialogues(root / "train" / "train_00.json", format="photochat")
    assert len(single) == 9 and single[0].id == "train/0"
    # a file whose name carries no split: plain ids
    plain = tmp_path / "mine.json"
    shutil.copy(EXCERPT / "dev_00.first9.json", plain)
    assert load_dialogues(plain)[0].id == "0"
    assert detect_format(root) == "photochat"


def test_photo_id_is_kept_and_resolves(tmp_path):
    recs = json.loads((EXCERPT / "train_00.first9.json").read_text())[:2]
    recs[0]["photo_id"] = "train/a1a9d7a530eade0b"
    f = tmp_path / "train_00.json"
    f.write_text(json.dumps(recs))
    imgs = tmp_path / "images" / "train"
    imgs.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(imgs / "a1a9d7a530eade0b.jpg")
    r = load_dialogues(f, image_dir=tmp_path / "images")
    p = r[0].photos[0]
    assert p.id == "train/a1a9d7a530eade0b" and p.path == imgs / "a1a9d7a530eade0b.jpg"
    assert r.report.images_found == 1 and r.report.missing_images == 1
    assert sum(1 for x in r.report.problems if x.kind == "missing_image") == 1


def test_limit_and_string_user_ids(tmp_path):
    assert len(load_dialogues(EXCERPT, limit=5)) == 5
    recs = json.loads((EXCERPT / "train_00.first9.json").read_text())[:1]
    for m in recs[0]["dialogue"]:
        m["user_id"] = str(m["user_id"])
    f = tmp_path / "s.json"
    f.write_text(json.dumps(recs))
    d = load_dialogues(f)[0]
    assert d.speakers == ["1", "0"] and len(d.turns) == 7
