"""``read_dialogues``: what a data config (``data:``) names → dialogues and a
one-line summary; training and evaluation both read their splits here."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mmdialog.core.data.demo import demo_dialogues, share_dialogues
from mmdialog.core.data.loader import load_dialogues
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.errors import MMDialogError

if TYPE_CHECKING:
    from mmdialog.core.config import DataConfig

#: The embedded sets a data config may name (``data.path``).
EMBEDDED_DEMO, EMBEDDED_SHARE = "embedded:demo", "embedded:demo-share"


def read_dialogues(cfg: DataConfig, split: str | None = None) -> tuple[list[Dialogue], str]:
    """Dialogues for a data config, and a one-line summary of what was read.

    Every photo is decoded once here (cheaply): one that is missing, corrupt or
    over the pixel limit loses its path, so its sample trains the text only, and
    is counted in the summary; ``cfg.strict`` makes it a one-line error instead.
    """
    split = split or cfg.split
    if cfg.path in (EMBEDDED_DEMO, EMBEDDED_SHARE):
        dialogues = (demo_dialogues(split or "train", description_style=cfg.description) if cfg.path == EMBEDDED_DEMO
                     else share_dialogues(split or "train"))
        return dialogues, f"{cfg.path} ({split or 'train'}): {len(dialogues)} dialogues"
    result = load_dialogues(cfg.path, format=cfg.format, split=split, image_dir=cfg.image_dir,
                            strict=cfg.strict, verify_images=True, description_style=cfg.description,
                            max_turn_chars=cfg.max_turn_chars,
                            max_record_chars=cfg.max_record_chars)
    if not result.dialogues:
        raise MMDialogError(f"no usable dialogues in {cfg.path} (split {split}): "
                            f"run `mmdialog data check {cfg.path}`")
    return result.dialogues, result.report.headline()
