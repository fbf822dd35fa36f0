"""What a command can check before it imports torch (seconds) or builds a model
(minutes at paper scale): paths, run folders, option ranges. Each check raises
``MMDialogError`` (one line); nothing heavy is imported here."""
from __future__ import annotations

from pathlib import Path

from mmdialog.core.errors import MMDialogError
from mmdialog.core.layout import LAST, TRAINABLE


def out_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """A run never trains over an earlier one unless told."""
    earlier = [p for p in (out / TRAINABLE, out / LAST) if p.exists()]
    if earlier and not resume and not overwrite:
        raise MMDialogError(f"{out} holds an earlier run ({earlier[0].name}); continue it with --resume last, "
                            "or choose another --out-dir, or --overwrite")


def writable(out: Path) -> None:
    """The run's folder can be created and written (made here, once the config is known good)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise MMDialogError(f"cannot write to the output folder {out}: {e.strerror or e}; choose --out-dir") from None


def data(path: str, image_dir: str | None = None, flag: str = "--data") -> None:
    """A dataset path exists (``embedded:`` names are checked by the loader, instantly)."""
    if not path.startswith("embedded:") and not Path(path).expanduser().exists():
        raise MMDialogError(f"{flag} '{path}' does not exist; give a dataset file or folder "
                            "(`mmdialog data check PATH` says what it holds) or embedded:demo-share")
    if image_dir is not None and not Path(image_dir).expanduser().is_dir():
        raise MMDialogError(f"image folder '{image_dir}' does not exist")


def checkpoints(paths: list[str]) -> None:
    for path in paths:
        if not Path(path).expanduser().exists():
            raise MMDialogError(f"checkpoint '{path}' does not exist; give the trainable.pt or .ckpt written by "
                                "`mmdialog train`, or a run folder")


def model(name: str) -> None:
    """A model argument is a preset or an existing path."""
    from mmdialog.core.config import PRESETS

    if name not in PRESETS and not Path(name).expanduser().exists():
        raise MMDialogError(f"model '{name}' does not exist; give an exported folder (`mmdialog export`), "
                            f"a training checkpoint, or a preset ({', '.join(PRESETS)})")
