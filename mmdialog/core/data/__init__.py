"""Dataset layer: readers (PhotoChat, DialogCC, mmdialog JSONL; each registered
through the ``mmdialog_dataset_formats`` hook, as a user's own format is), the dialogue
schema, image lookup/loading, downloads, checks and evaluation samples.

Entry point::

    from mmdialog.core.data import load_dialogues
    result = load_dialogues("photochat/", split="train", image_dir="images/")
    result.dialogues          # list[Dialogue]
    print(result.report.format())

Nothing here imports torch (``to_tensor`` imports it when called) or typer
(the ``mmdialog data`` commands live in ``mmdialog.sdk.commands.data``).
"""
from mmdialog.core.data.check import check_dataset
from mmdialog.core.data.demo import DEMO_DIR, demo_dialogues
from mmdialog.core.data.fetch import FetchReport, fetch_images, fetch_urls
from mmdialog.core.data.images import (
    ImageIndex,
    center_crop_resize,
    load_image,
    resolve_image,
    to_tensor,
    url_filename,
)
from mmdialog.core.data.jsonl import write_jsonl
from mmdialog.core.data.loader import detect_format, formats, load_dialogues
from mmdialog.core.data.photochat import clean_description
from mmdialog.core.data.report import LoadReport, LoadResult, Problem
from mmdialog.core.data.samples import TurnSample, dialogue_samples, turn_samples
from mmdialog.core.data.schema import Dialogue, Photo, Turn
from mmdialog.core.data.source import read_dialogues
from mmdialog.core.errors import DataError

__all__ = [
    "DEMO_DIR", "DataError", "Dialogue", "FetchReport", "ImageIndex", "LoadReport",
    "LoadResult", "Photo", "Problem", "Turn", "TurnSample", "center_crop_resize", "check_dataset",
    "clean_description", "demo_dialogues", "detect_format", "dialogue_samples", "fetch_images",
    "fetch_urls", "formats", "load_dialogues", "load_image", "read_dialogues", "resolve_image", "to_tensor", "turn_samples",
    "url_filename", "write_jsonl",
]
