"""`mmdialog data …` commands (in the main CLI's app) and check_dataset."""
from __future__ import annotations

import io
import json

from typer.testing import CliRunner

from mmdialog.core.data import DEMO_DIR, DataError, check_dataset
from mmdialog.sdk.cli import app

runner = CliRunner()
EXCERPT = DEMO_DIR / "photochat"


def _app():
    return app


def test_check_dataset_counts():
    buf = io.StringIO()
    rep = check_dataset(EXCERPT, echo=True, out=buf)
    assert (rep.dialogues, rep.messages, rep.share_turns, rep.photos, rep.bad_records) == (42, 557, 42, 42, 0)
    text = buf.getvalue()
    assert "dialogues       42" in text and "share turns     42" in text and "missing images  42" in text
    assert check_dataset(EXCERPT, split="dev").dialogues == 9


def test_cli_check_ok_and_json():
    res = runner.invoke(_app(), ["data", "check", str(EXCERPT), "--split", "train"])
    assert res.exit_code == 0, res.output
    assert "dialogues       9" in res.output and "messages        99" in res.output
    res = runner.invoke(_app(), ["data", "check", str(DEMO_DIR / "chat.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["dialogues"] == 8 and data["images_found"] == 8 and data["problems"] == []


def test_cli_check_bad_data_and_strict(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([
        {"dialogue_id": 0, "dialogue": [{"message": "hi", "share_photo": False, "user_id": 0}]},
        {"dialogue_id": 1},
    ]))
    res = runner.invoke(_app(), ["data", "check", str(f)])
    assert res.exit_code == 1
    assert "bad records     1" in res.output and f"{f} [record 1 (#1)]: photochat: missing 'dialogue'" in res.output
    res = runner.invoke(_app(), ["data", "check", str(f), "--strict"])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: {f} [record 1 (#1)]: photochat: missing 'dialogue'"
    assert "Traceback" not in res.output


def test_cli_user_errors(tmp_path):
    res = runner.invoke(_app(), ["data", "check", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no such file" in res.stderr
    res = runner.invoke(_app(), ["data", "check", str(EXCERPT), "--format", "xml"])
    assert res.exit_code == 2 and "--format must be one of" in res.stderr
    res = runner.invoke(_app(), ["data", "check", str(EXCERPT), "--image-dir", str(tmp_path / "none")])
    assert res.exit_code == 2 and "image folder does not exist" in res.stderr
    res = runner.invoke(_app(), ["data", "fetch-images", str(EXCERPT)])  # --out missing
    assert res.exit_code == 2


def test_cli_convert(tmp_path):
    out = tmp_path / "pc.jsonl"
    res = runner.invoke(_app(), ["data", "convert", str(EXCERPT), "--out", str(out)])
    assert res.exit_code == 0 and "wrote 42 dialogues" in res.output
    assert check_dataset(out).dialogues == 42


def test_strict_check_raises():
    import pytest

    with pytest.raises(DataError):
        check_dataset(DEMO_DIR / "photochat", image_dir=DEMO_DIR, strict=True)  # images missing


def test_cli_check_counts_per_split_on_photochats_layout():
    """PhotoChat's released layout (train/ dev/ test/ folders, or split-named files): totals and per split."""
    import json

    res = runner.invoke(_app(), ["data", "check", str(EXCERPT)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    start = lines.index("per split        dialogues  turns  photos")
    assert [line.split()[:2] for line in lines[start + 1:start + 4]] == [["train", "9"], ["dev", "9"], ["test", "24"]]
    counts = json.loads(runner.invoke(_app(), ["data", "check", str(EXCERPT), "--json"]).output)
    assert counts["dialogues"] == 42 and {k: v["dialogues"] for k, v in counts["splits"].items()} == \
        {"train": 9, "dev": 9, "test": 24}
