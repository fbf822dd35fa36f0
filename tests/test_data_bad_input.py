"""Bad input: every problem is one line naming file and record; skipped, or raised with strict."""
from __future__ import annotations

import json
import shutil

import pytest

from mmdialog.core.data import DEMO_DIR, DataError, load_dialogues

EXCERPT = DEMO_DIR / "photochat"


def _msg(text, user=0, share=False):
    return {"message": text, "share_photo": share, "user_id": user}


GOOD = {"dialogue": [_msg("hi", 1), _msg("hello"), _msg("", 0, True), _msg("nice", 1)],
        "dialogue_id": 0, "photo_description": "Objects in the photo: Cat", "photo_url": "http://x/c.jpg"}

BAD_CASES = {
    "no_dialogue": ({"dialogue_id": 1, "photo_url": "http://x"}, "missing 'dialogue'"),
    "speaker_float": ({**GOOD, "dialogue_id": 2, "dialogue": [_msg("hi", 1.5), _msg("yo", 0)]},
                      "unknown speaker type float for user_id"),
    "speaker_list": ({**GOOD, "dialogue_id": 3, "dialogue": [_msg("hi", [0])]}, "unknown speaker type list"),
    "speaker_bool": ({**GOOD, "dialogue_id": 4, "dialogue": [_msg("hi", True)]}, "unknown speaker type bool"),
    "empty": ({**GOOD, "dialogue_id": 5, "dialogue": []}, "empty dialogue"),
    "all_empty_messages": ({**GOOD, "dialogue_id": 6, "dialogue": [_msg(""), _msg("  ", 1)]}, "empty dialogue"),
    "share_without_photo": ({"dialogue_id": 7, "dialogue": [_msg("hi", 1), _msg("", 0, True)]},
                            "shares a photo but the record has no photo_url"),
    "not_an_object": ([1, 2], "record is a list"),
    "message_not_str": ({**GOOD, "dialogue_id": 9, "dialogue": [{"message": 5, "user_id": 0}]},
                        "'message' is a int"),
}


def _write(tmp_path, name, records):
    f = tmp_path / name
    f.write_text(json.dumps(records, indent=1))
    return f


def test_each_bad_record_is_skipped_and_reported(tmp_path):
    records = [GOOD] + [rec for rec, _ in BAD_CASES.values()] + [{**GOOD, "dialogue_id": 99}]
    f = _write(tmp_path, "train_00.json", records)
    r = load_dialogues(f, format="photochat")
    assert [d.id for d in r] == ["train/0", "train/99"]
    assert r.report.bad_records == len(BAD_CASES)
    problems = [p for p in r.report.problems if p.kind == "bad_record"]
    for (key, (rec, expected)), p in zip(BAD_CASES.items(), problems):
        line = str(p)
        assert "\n" not in line
        assert line.startswith(str(f)), line
        assert expected in line, (key, line)
        if isinstance(rec, dict) and "dialogue_id" in rec:
            assert f"[record {rec['dialogue_id']} (#" in line, line


@pytest.mark.parametrize("key", list(BAD_CASES))
def test_strict_raises_at_first_problem(tmp_path, key):
    rec, expected = BAD_CASES[key]
    f = _write(tmp_path, "x.json", [GOOD, rec, GOOD])
    with pytest.raises(DataError) as ei:
        load_dialogues(f, format="photochat", strict=True)
    msg = str(ei.value)
    assert expected in msg and str(f) in msg and "\n" not in msg
    assert ei.value.file == str(f)


def test_malformed_file_does_not_lose_other_files(tmp_path):
    root = tmp_path / "pc"
    root.mkdir()
    shutil.copy(EXCERPT / "train_00.first9.json", root / "train_00.json")
    text = (EXCERPT / "dev_00.first9.json").read_text()
    # cut the file in the middle of its 4th record
    cut = text.index('"dialogue_id": 3')
    (root / "dev_00.json").write_text(text[:cut])
    (root / "test_00.json").write_text("{ this is not json")
    r = load_dialogues(root)
    assert r.report.bad_files == 2
    assert len(r.split("train")) == 9
    assert [d.id for d in r.split("dev")] == ["dev/0", "dev/1", "dev/2"]  # kept what was before the error
    msgs = [str(p) for p in r.report.problems]
    assert any(m.startswith(str(root / "dev_00.json")) and "invalid JSON at line" in m
               and "kept the 3 record(s)" in m for m in msgs), msgs
    assert any(str(root / "test_00.json") in m for m in msgs), msgs
    with pytest.raises(DataError, match="dev_00.json"):
        load_dialogues(root, strict=True)


def test_non_utf8_file(tmp_path):
    good = json.dumps([GOOD, {**GOOD, "dialogue_id": 1, "dialogue": [_msg("caf\u00e9", 1), _msg("ok")]},
                       {**GOOD, "dialogue_id": 2}], ensure_ascii=False)
    raw = good.encode("utf-8").replace("caf\u00e9".encode(), b"caf\xe9")  # latin-1 byte
    f = tmp_path / "latin.json"
    f.write_bytes(raw)
    r = load_dialogues(f)
    assert [d.id for d in r] == ["0", "2"]
    (p,) = r.report.problems
    assert p.kind == "bad_record" and p.record == "1 (#1)"
    assert "invalid UTF-8" in p.message and "0xE9" in p.message and str(f) in str(p)
    with pytest.raises(DataError, match="invalid UTF-8"):
        load_dialogues(f, strict=True)


def test_non_utf8_jsonl_line_and_bad_json_line(tmp_path):
    lines = [json.dumps({"id": "a", "turns": [{"speaker": "0", "text": "ok"}]}).encode(),
             b'{"id": "b", "turns": [{"speaker": "0", "text": "\xff\xfe"}]}',
             b'{"id": "c", "turns": [',
             json.dumps({"id": "d", "turns": [{"speaker": "0", "text": "fine"}]}).encode()]
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    r = load_dialogues(f)
    assert [d.id for d in r] == ["a", "d"]
    got = sorted((p.record, p.kind) for p in r.report.problems)
    assert got == [("b (line 2)", "bad_record"), ("line 3", "bad_record")]


def test_utf8_bom_and_utf16(tmp_path):
    data = json.dumps([GOOD], ensure_ascii=False)
    a = tmp_path / "bom.json"
    a.write_bytes(b"\xef\xbb\xbf" + data.encode())
    b = tmp_path / "u16.json"
    b.write_bytes(data.encode("utf-16"))
    assert len(load_dialogues(a)) == 1 and len(load_dialogues(b)) == 1


def test_jsonl_bad_records(tmp_path):
    recs = [
        {"id": "ok", "turns": [{"speaker": "0", "text": "hi"}]},
        {"id": "no-turns"},
        {"id": "empty", "turns": []},
        {"id": "spk", "turns": [{"speaker": {"name": "x"}, "text": "hi"}]},
        {"id": "photo", "turns": [{"speaker": "0", "text": "hi", "photos": [{}]}]},
        {"id": "blank", "turns": [{"speaker": "0", "text": "  "}]},
        {"turns": [{"speaker": "0", "text": "hi"}]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    r = load_dialogues(f, format="jsonl")
    assert [d.id for d in r] == ["ok"]
    msgs = [str(p) for p in r.report.problems]
    assert len(msgs) == 6
    for needle in ("missing 'turns'", "empty dialogue", "unknown speaker type dict",
                   "has no id, url, description or path", "neither text nor photos", "missing 'id'"):
        assert any(needle in m for m in msgs), (needle, msgs)
    assert "[record no-turns (line 2)]" in msgs[0]


def test_unknown_format_and_user_errors(tmp_path):
    f = tmp_path / "weird.json"
    f.write_text(json.dumps([{"foo": 1}]))
    r = load_dialogues(f)
    assert len(r) == 0 and r.report.bad_records == 1 and "cannot detect the format" in str(r.report.problems[0])
    with pytest.raises(DataError, match="no such file"):
        load_dialogues(tmp_path / "nope")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_dialogues(tmp_path / "emptydir")
    with pytest.raises(ValueError):
        load_dialogues(f, format="bogus")
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    r = load_dialogues(empty)
    assert r.report.bad_files == 0 and r.report.warnings == 1 and "empty file" in str(r.report.problems[0])
    single = tmp_path / "dev_00.json"
    single.write_text(json.dumps([GOOD]))
    r = load_dialogues(single, split="train")
    assert len(r) == 0 and "belong to another split" in r.report.problems[0].message


def test_photo_data_without_share_is_a_warning(tmp_path):
    rec = {**GOOD, "dialogue": [_msg("hi", 1), _msg("hello")]}
    r = load_dialogues(_write(tmp_path, "w.json", [rec]), strict=True)  # warnings do not raise
    assert len(r) == 1 and r.report.warnings == 1 and r[0].photos == []


def test_duplicate_ids_warned(tmp_path):
    r = load_dialogues(_write(tmp_path, "d.json", [GOOD, GOOD]))
    assert len(r) == 2 and r.report.warnings == 1 and "duplicate dialogue id" in r.report.problems[0].message
