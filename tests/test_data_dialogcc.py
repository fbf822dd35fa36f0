"""DialogCC reader: records written in the Hugging Face layout (JSON list and JSON lines)."""
from __future__ import annotations

import json

import pytest

from mmdialog.core.data import detect_format, load_dialogues, write_jsonl

RECORDS = [
    {
        "dialogue_id": "wow:986",
        "split": "train",
        "dialogue": [
            {"utterance_idx": 1, "utterance": "I love hiking in the Alps.", "speaker": "Kitzie",
             "rationale": "r", "shared_image": [], "description": ""},
            {"utterance_idx": 2, "utterance": "Here are two shots from last summer.", "speaker": "Kitzie",
             "rationale": "share",
             "shared_image": [{"image_url": "http://cc3m.example/a.jpg", "caption": "a mountain lake"},
                              {"url": "http://cc3m.example/b.png", "image_id": "wow:986_1"}],
             "description": "A photo of a mountain lake under snowy peaks."},
            {"utterance_idx": 3, "utterance": "Wow, beautiful!", "speaker": "Bram",
             "rationale": "", "shared_image": [], "description": ""},
            {"utterance_idx": 4, "utterance": "My dog came too.", "speaker": "Kitzie", "rationale": "",
             "shared_image": ["http://cc3m.example/dog.jpg"], "description": None},
        ],
    },
    {
        "dialogue_id": "daily:7",
        "split": "valid",
        "dialogue": [
            # out of order on purpose: sorted by utterance_idx
            {"utterance_idx": 2, "utterance": "Sure, look.", "speaker": "B",
             "shared_image": [{"id": "daily:7_0", "caption": "a red bicycle"}], "description": ""},
            {"utterance_idx": 1, "utterance": "Show me your bike?", "speaker": "A",
             "shared_image": [], "description": ""},
        ],
    },
]


def _check(result):
    rep = result.report
    assert rep.dialogues == 2 and rep.bad_records == 0 and rep.bad_files == 0
    assert rep.messages == 6 and rep.photos == 4 and rep.share_turns == 3
    d = result.by_id()["wow:986"]
    assert d.source == "dialogcc" and d.split == "train"
    assert [t.speaker for t in d.turns] == ["Kitzie", "Bram", "Kitzie"]
    first = d.turns[0]
    assert first.text == "I love hiking in the Alps. Here are two shots from last summer."
    assert [(p.url, p.id, p.description) for p in first.photos] == [
        ("http://cc3m.example/a.jpg", None, "A photo of a mountain lake under snowy peaks."),
        ("http://cc3m.example/b.png", "wow:986_1", "A photo of a mountain lake under snowy peaks."),
    ]
    assert all(p.offset == len(first.text) for p in first.photos)
    last = d.turns[-1]
    assert [(p.url, p.description) for p in last.photos] == [("http://cc3m.example/dog.jpg", "")]
    d2 = result.by_id()["daily:7"]
    assert d2.split == "dev"  # valid → dev
    assert [(t.speaker, t.text) for t in d2.turns] == [("A", "Show me your bike?"), ("B", "Sure, look.")]
    assert d2.turns[1].photos[0].description == "a red bicycle"  # caption fallback
    assert d2.turns[1].photos[0].id == "daily:7_0"


@pytest.mark.parametrize("layout", ["list", "lines"])
def test_dialogcc_both_layouts(tmp_path, layout):
    f = tmp_path / "train.json"
    if layout == "list":
        f.write_text(json.dumps(RECORDS, indent=1))
    else:
        f.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert detect_format(f) == "dialogcc"
    _check(load_dialogues(f))
    _check(load_dialogues(f, format="dialogcc"))


def test_dialogcc_round_trip_through_jsonl(tmp_path):
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / "train.json").write_text(json.dumps(RECORDS[:1]))
    (tmp_path / "cc" / "valid.json").write_text(json.dumps(RECORDS[1:]))
    (tmp_path / "cc" / "test.json").write_text("[]")
    r = load_dialogues(tmp_path / "cc")
    _check(r)
    assert [d.id for d in load_dialogues(tmp_path / "cc", split="dev")] == ["daily:7"]
    out = tmp_path / "all.jsonl"
    write_jsonl(r.dialogues, out)
    back = load_dialogues(out)
    assert back.dialogues == r.dialogues


def test_speaker_index_mode(tmp_path):
    f = tmp_path / "test.json"
    f.write_text(json.dumps(RECORDS))
    d = load_dialogues(f, speaker_names="index").by_id()["wow:986"]
    assert [t.speaker for t in d.turns] == ["0", "1", "0"]


def test_dialogcc_bad_images(tmp_path):
    recs = json.loads(json.dumps(RECORDS))
    recs[0]["dialogue"][1]["shared_image"] = [{"foo": 1}]
    recs[0]["dialogue"][1]["description"] = ""
    recs[1]["dialogue"][0]["shared_image"] = [42]
    f = tmp_path / "valid.json"
    f.write_text(json.dumps(recs))
    r = load_dialogues(f)
    assert len(r) == 0 and r.report.bad_records == 2
    msgs = [str(p) for p in r.report.problems]
    assert "[record wow:986 (#0)]" in msgs[0] and "no url, id, caption or description" in msgs[0]
    assert "[record daily:7 (#1)]" in msgs[1] and "is a int" in msgs[1]
