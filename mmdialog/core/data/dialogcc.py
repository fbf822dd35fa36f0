"""DialogCC (Lee et al., NAACL 2024) reader.

Input: the Hugging Face files of ``passing2961/dialogcc`` (``train.json``,
``valid.json``, ``test.json``), each a JSON list **or** JSON lines, of records::

    {"dialogue_id": "wow:986", "split": "train",
     "dialogue": [{"utterance_idx": 0, "utterance": str, "speaker": "Kitzie",
                   "rationale": str, "shared_image": [...], "description": str}, ...]}

Mapping:

* Utterances are ordered by ``utterance_idx`` (when every one has an int
  index), then consecutive utterances of one speaker are merged into a turn
  joined by a space, as for PhotoChat.
* ``speaker`` names are kept (``speaker_names="keep"``, default) or replaced by
  their order of appearance ``"0"``, ``"1"``, … (``speaker_names="index"``).
* Every element of ``shared_image`` becomes a ``Photo`` on that
  utterance's turn (several per turn and per dialogue are fine; ``offset`` marks
  the end of that utterance's text). An element may be a URL string or an
  object with any of ``image_url``/``url``/``img_url`` (URL),
  ``image_id``/``id`` (id) and ``caption``/``image_caption`` (CC3M caption).
  The photo description is the turn's ``description`` (a string, or a list
  with one entry per image), else the image's caption, else ``""``.
* ``Dialogue.id`` is ``dialogue_id``; ``split`` comes from the record's
  ``split`` (``valid`` → ``dev``) or from the file name.
* ``rationale`` is not used.
"""
from __future__ import annotations

from typing import Any

from mmdialog.core.data.records import RawRecord, RecordError, add_message, normalize_split, object_list, text_field
from mmdialog.core.data.report import LoadReport
from mmdialog.core.data.schema import Dialogue, Photo, Turn
from mmdialog.core.hookspecs import DatasetFormat, hookimpl

URL_KEYS = ("image_url", "url", "img_url")
ID_KEYS = ("image_id", "id", "img_id")
CAPTION_KEYS = ("caption", "image_caption")
SPEAKER_MODES = ("keep", "index")


def is_dialogcc_record(rec: Any) -> bool:
    if not isinstance(rec, dict):
        return False
    utts = rec.get("dialogue")
    return isinstance(utts, list) and bool(utts) and isinstance(utts[0], dict) and any(
        k in utts[0] for k in ("utterance", "utterance_idx", "shared_image", "speaker"))


def record_id(rec: Any, raw: RawRecord) -> str:
    if isinstance(rec, dict) and rec.get("dialogue_id") is not None:
        return f"{rec['dialogue_id']} ({raw.label})"
    return raw.label


def _first(d: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
            return str(v).strip()
    return None


def _photos(images: Any, description: Any, where: str) -> list[Photo]:
    if images is None:
        return []
    if isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list):
        raise RecordError(f"{where}: shared_image is a {type(images).__name__}, expected a list")
    if isinstance(description, list):
        per_image = description if len(description) == len(images) else None
        shared_desc = None if per_image else " ".join(str(x) for x in description if x)
    else:
        per_image, shared_desc = None, description
    photos = []
    for j, img in enumerate(images):
        if isinstance(img, str):
            url, pid, caption = (img.strip() or None), None, None
        elif isinstance(img, dict):
            url, pid, caption = _first(img, URL_KEYS), _first(img, ID_KEYS), _first(img, CAPTION_KEYS)
        else:
            raise RecordError(f"{where}: shared_image[{j}] is a {type(img).__name__}, "
                              "expected a URL string or an object")
        desc = per_image[j] if per_image else shared_desc
        if desc is not None and not isinstance(desc, str):
            raise RecordError(f"{where}: description is a {type(desc).__name__}, expected a string")
        desc = (desc or "").strip() or (caption or "")
        if not (url or pid or desc):
            raise RecordError(f"{where}: shared_image[{j}] has no url, id, caption or description")
        photos.append(Photo(id=pid, url=url, description=desc))
    return photos


def parse_record(raw: RawRecord, *, file: str, report: LoadReport, split: str | None = None,
                 speaker_names: str = "keep") -> tuple[Dialogue, int]:
    """One DialogCC record → (Dialogue, number of utterances). Raises RecordError."""
    check_options(speaker_names)
    rec = raw.value
    utts = object_list(rec, "dialogue", "utterance")
    idx = [u.get("utterance_idx") for u in utts]
    if all(isinstance(x, int) and not isinstance(x, bool) for x in idx):
        utts = [u for _, u in sorted(zip(idx, utts), key=lambda p: p[0])]

    index_of: dict[str, str] = {}
    turns: list[Turn] = []
    for i, u in enumerate(utts):
        where = f"utterance {u.get('utterance_idx', i)}"
        spk = u.get("speaker")
        if isinstance(spk, bool) or not isinstance(spk, (str, int)) or not str(spk).strip():
            raise RecordError(f"{where}: unknown speaker type {type(spk).__name__} ({spk!r}); "
                              "expected a name or an int")
        spk = str(spk).strip()
        if speaker_names == "index":
            spk = index_of.setdefault(spk, str(len(index_of)))
        text = text_field(u.get("utterance"), f"{where}: utterance")
        photos = _photos(u.get("shared_image"), u.get("description"), where)
        if text or photos:
            add_message(turns, spk, text, photos)
    if not turns:
        raise RecordError("empty dialogue (every utterance is empty)")
    did = rec.get("dialogue_id")
    did = str(did).strip() if isinstance(did, (str, int)) and not isinstance(did, bool) and str(did).strip() \
        else raw.label.replace(" ", "")
    rsplit = normalize_split(rec.get("split")) if isinstance(rec.get("split"), str) else None
    return Dialogue(id=did, turns=turns, source="dialogcc", split=rsplit or split), len(utts)


def check_options(speaker_names: str) -> None:
    """A bad option value is a ``ValueError``, before any record is read."""
    if speaker_names not in SPEAKER_MODES:
        raise ValueError(f"speaker_names must be one of {SPEAKER_MODES}, not {speaker_names!r}")


@hookimpl(trylast=True)  # after installed formats: ``format: auto`` tries the more specific first
def mmdialog_dataset_formats() -> list[DatasetFormat]:
    return [DatasetFormat("dialogcc", is_dialogcc_record, record_id, parse_record,
                          "DialogCC (Hugging Face JSON; several photos per dialogue)", ("speaker_names",),
                          check_options)]
