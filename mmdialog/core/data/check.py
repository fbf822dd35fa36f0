"""``check_dataset``: load a dataset and report what is in it and what is wrong."""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from mmdialog.core.data.loader import load_dialogues
from mmdialog.core.data.report import LoadReport


def check_dataset(
    path: str | os.PathLike,
    format: str = "auto",
    split: str | None = None,
    image_dir: str | os.PathLike | None = None,
    strict: bool = False,
    *,
    verify_images: bool = False,
    echo: bool = False,
    out: TextIO | None = None,
    max_problems: int | None = 20,
    **load_kwargs: Any,
) -> LoadReport:
    """Counts (files, dialogues, messages, turns, photos, share turns, images found,
    missing and corrupt images, bad records, bad files, warnings) and problems.

    With ``echo=True`` the report is printed (to ``out``, default stdout).
    ``strict=True`` raises ``DataError`` at the first problem.
    """
    result = load_dialogues(path, format=format, split=split, strict=strict, image_dir=image_dir,
                            verify_images=verify_images, **load_kwargs)
    report = result.report
    if echo:
        stream = out or sys.stdout
        print(f"{path}" + (f" (split {split})" if split else ""), file=stream)
        print(report.format(max_problems=max_problems), file=stream)
        if image_dir is None and report.missing_images:
            print("(no image folder given: photos without a local path count as missing; pass --image-dir)",
                  file=stream)
    return report
