"""PhotoChat (Zang et al., ACL 2021) reader.

Input: the official JSON files of ``google-research/multimodalchat/photochat``,
each a top-level list of records::

    {"dialogue": [{"message": str, "share_photo": bool, "user_id": 0|1}, ...],
     "dialogue_id": int, "photo_description": str, "photo_url": str,
     "photo_id": "train/a1a9d7a530eade0b"}          # photo_id: newer files only

``path`` may be one file, a split folder (``train/*.json``) or the root folder
(``{train,dev,test}/*.json``; pass ``split=`` to load one split).

Mapping onto ``mmdialog.core.data.schema.Dialogue``:

* **Turns.** Consecutive messages of one speaker are merged into one
  ``Turn``, joined with a single **space** (messages are stripped first;
  a space keeps the merged turn a normal sentence sequence for the LM and for
  BLEU/ROUGE, unlike a newline). Speakers are the ``user_id`` as a string,
  ``"0"``/``"1"``.
* **Photo.** The ``share_photo`` message (empty text) attaches
  ``Photo(id=photo_id, url=photo_url, description=cleaned)`` to the sharer's
  turn, i.e. merged with that speaker's adjacent messages. ``Photo.offset`` is
  where in the merged text the photo was shared, so
  ``Turn.text_with_photos`` renders ``"… cake. [img] Food, Cake [/img] It was …"``.
* **Ids.** ``Dialogue.id`` is ``"<split>/<dialogue_id>"`` (``"train/0"``) when the
  split is known from the folder or file name (``train_00.json``,
  ``dev/…``), else ``str(dialogue_id)``; ids restart at 0 in every split.

Description cleaning (``description_style``, ``person``)
--------------------------------------------------------
Descriptions are ``"Objects in the photo: Drink, Head, Face"`` or
``"The photo has your brother Tom. Objects in the photo: Man, Face"``.

``description_style``:

* ``"objects"`` (default): the object labels only, ``"Drink, Head, Face"``. The
  ``"Objects in the photo:"`` prefix is the same in every record, so it carries
  no information and only lengthens the description the model must predict and
  the generator must read.
* ``"raw"``: the description verbatim (``person`` is ignored).
* ``"sentence"``: ``"A photo of drink, head and face."`` (labels lower-cased).
* ``"reference"``: the form the authors' preprocessing leaves (their
  ``filter_dialogues`` cuts the ``"The photo has your …"`` sentence):
  ``"Objects in the photo: Drink, Head, Face"`` (``person`` is ignored).
* any other name: that field of the record, verbatim (e.g. ``photo_caption``,
  the field the reference's loader reads from its preprocessed files).

``person`` (only for ``objects``/``sentence``):

* ``"drop"`` (default): drop the ``"The photo has your <relation> <Name>."``
  part. The name is an invented label the annotator was given; it is not
  visible in the pixels.
* ``"keep"``: keep it from the sharer's point of view, ``"my brother Tom, Man,
  Face"`` / ``"A photo of my brother Tom with man and face."``.

Descriptions in neither format are kept verbatim (stripped).
"""
from __future__ import annotations

import re
from typing import Any

from mmdialog.core.data.records import RawRecord, RecordError, add_message, object_list, text_field
from mmdialog.core.data.report import WARNING, LoadReport
from mmdialog.core.data.schema import Dialogue, Photo, Turn
from mmdialog.core.hookspecs import DatasetFormat, hookimpl

DESCRIPTION_STYLES = ("objects", "raw", "sentence", "reference")
PERSON_MODES = ("drop", "keep")

_DESC_RE = re.compile(
    r"^\s*(?:The photo has your (?P<person>.+?)\.\s*)?Objects in the photo:\s*(?P<objects>.*?)\s*$",
    re.S,
)


def clean_description(description: str | None, style: str = "objects", person: str = "drop") -> str:
    """Clean a PhotoChat ``photo_description`` (see the module docs for the options)."""
    if style not in DESCRIPTION_STYLES:
        raise ValueError(f"description_style must be one of {DESCRIPTION_STYLES}, not {style!r}")
    if person not in PERSON_MODES:
        raise ValueError(f"person must be one of {PERSON_MODES}, not {person!r}")
    text = (description or "").strip()
    if style == "raw":
        return text
    m = _DESC_RE.match(text)
    if not m:
        return text
    if style == "reference":
        return text[text.find("Objects in the photo"):]  # their filter_dialogues' re.search(…).group()
    objects = [o.strip() for o in m.group("objects").split(",") if o.strip()]
    who = f"my {m.group('person').strip()}" if person == "keep" and m.group("person") else None
    if style == "objects":
        return ", ".join(([who] if who else []) + objects)
    # sentence
    labels = [o.lower() for o in objects]
    listed = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1] if labels else ""
    if who and listed:
        return f"A photo of {who} with {listed}."
    if who:
        return f"A photo of {who}."
    return f"A photo of {listed}." if listed else "A photo."


def is_photochat_record(rec: Any) -> bool:
    if not isinstance(rec, dict):
        return False
    if "photo_description" in rec or "photo_url" in rec:
        return True
    msgs = rec.get("dialogue")
    return isinstance(msgs, list) and bool(msgs) and isinstance(msgs[0], dict) and (
        "user_id" in msgs[0] or "share_photo" in msgs[0] or "message" in msgs[0])


def record_id(rec: Any, raw: RawRecord) -> str:
    if isinstance(rec, dict) and rec.get("dialogue_id") is not None:
        return f"{rec['dialogue_id']} ({raw.label})"
    return raw.label


def _speaker(value: Any, i: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RecordError(f"message {i}: unknown speaker type {type(value).__name__} for user_id "
                          f"({value!r}); expected an int or a string")
    s = str(value).strip()
    if not s:
        raise RecordError(f"message {i}: empty user_id")
    return s


def _opt_str(rec: dict, key: str) -> str | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise RecordError(f"{key} is a {type(v).__name__}, expected a string")
    v = str(v).strip()
    return v or None


def parse_record(raw: RawRecord, *, file: str, report: LoadReport, split: str | None = None,
                 description_style: str = "objects", person: str = "drop") -> tuple[Dialogue, int]:
    """One PhotoChat record → (Dialogue, number of raw messages). Raises RecordError."""
    rec = raw.value
    messages = object_list(rec, "dialogue", "message")
    did = rec.get("dialogue_id")
    if isinstance(did, (dict, list, bool)) or did is None or str(did).strip() == "":
        did = raw.label.replace(" ", "")  # "#3" / "line7": position in the file
    did = str(did).strip()

    url = _opt_str(rec, "photo_url")
    pid = _opt_str(rec, "photo_id")
    named = description_style not in DESCRIPTION_STYLES  # a field of the record, verbatim
    field = description_style if named else "photo_description"
    desc_raw = rec.get(field)
    if desc_raw is not None and not isinstance(desc_raw, str):
        raise RecordError(f"{field} is a {type(desc_raw).__name__}, expected a string")
    if named and desc_raw is None and any(m.get("share_photo") for m in messages if isinstance(m, dict)):
        raise RecordError(f"no '{field}' field to describe the photo with (data.description)")
    description = (desc_raw or "").strip() if named else clean_description(desc_raw, description_style, person)

    turns: list[Turn] = []
    shared = False
    for i, msg in enumerate(messages):
        if "user_id" not in msg:
            raise RecordError(f"message {i}: missing user_id")
        speaker = _speaker(msg["user_id"], i)
        text = text_field(msg.get("message"), f"message {i}: 'message'")
        share = msg.get("share_photo", False)
        if share in (0, 1, "true", "false", "True", "False") and not isinstance(share, bool):
            share = str(share).lower() in ("1", "true")
        if not isinstance(share, bool):
            raise RecordError(f"message {i}: share_photo is {share!r}, expected true/false")
        if share and not (url or pid or description):
            raise RecordError(f"message {i} shares a photo but the record has no photo_url, "
                              "photo_id or photo_description")
        if text or share:
            add_message(turns, speaker, text, [Photo(id=pid, url=url, description=description)] if share else [])
            shared = shared or share
    if not turns:
        raise RecordError("empty dialogue (every message is empty)")
    did_full = f"{split}/{did}" if split else did
    if not shared and (url or pid):
        report.add_problem(WARNING, file, record_id(rec, raw),
                           "has photo data but no message with share_photo=true; photo ignored")
    return Dialogue(id=did_full, turns=turns, source="photochat", split=split), len(messages)


def check_options(description_style: str, person: str) -> None:
    """A bad option value is a ``ValueError``, before any record is read. A style that
    is not one of the cleanings names a field of the record."""
    clean_description("", description_style if description_style in DESCRIPTION_STYLES else "raw", person)


@hookimpl(trylast=True)  # after installed formats: ``format: auto`` tries the more specific first
def mmdialog_dataset_formats() -> list[DatasetFormat]:
    return [DatasetFormat("photochat", is_photochat_record, record_id, parse_record,
                          "PhotoChat official JSON (google-research/multimodalchat)", ("description_style", "person"),
                          check_options)]
