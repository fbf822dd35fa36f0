"""The training-checkpoint format, written and read in one place.

Two files come out of ``mmdialog train``, both holding only the trainable
weights and the full config (the base models stay where the config points):

* ``trainable.pt``: ``{"trainable": {name: tensor}, "config": YAML}``, at the end;
* ``checkpoints/last.ckpt``: Lightning's checkpoint (optimizer, scheduler and
  loop state) whose ``state_dict`` is cut to the trainable weights
  (``model.<name>``) and which carries the config under ``CONFIG_KEY``.

Both are written atomically and read with ``torch.load(weights_only=True)``:
opening a checkpoint someone sent you never runs code from it. Both carry a
SHA-256 over every tensor's bytes and every plain value (``DIGEST_KEY``),
checked when they are read: a file whose zip directory is intact but whose
bytes changed (a bad disk, a bit flip in a copy) is refused, not trained on.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml

from mmdialog.core.errors import ConfigError, UnsafeFileError
from mmdialog.core.files import atomic_write
from mmdialog.core.layout import BEST, LAST, TRAINABLE

if TYPE_CHECKING:
    from mmdialog.core.config import Config
    from mmdialog.core.model import DialogueModel

CONFIG_KEY = "mmdialog_config"
#: What else ``last.ckpt`` carries beside Lightning's state, for an exact resume
#: (``training/module.py`` writes and reads them): the samples trained so far
#: ("dialogue@agent" per step), the photos that could not be read, and the lr
#: plateau's state (lr scale, best dev BLEU-2, evaluations without improvement).
SAMPLES_KEY, PHOTOS_SKIPPED_KEY, PLATEAU_KEY = "mmdialog_samples", "mmdialog_photos_skipped", "mmdialog_plateau"
DIGEST_KEY = "mmdialog_sha256"
METRICS = "metrics.json"


def trainable_state(model: DialogueModel) -> dict[str, torch.Tensor]:
    """The weights the freeze policy trains, by ``DialogueModel`` parameter name
    (the same under FSDP, which inserts its wrappers into the module names)."""
    return {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: DialogueModel, path: str | Path) -> Path:
    """Write ``trainable.pt``: trainable weights + config, atomically."""
    from mmdialog.core.config import dump_config

    state = {n: p.detach().cpu() for n, p in trainable_state(model).items()}
    with atomic_write(path) as tmp:
        torch.save(with_digest({"trainable": state, "config": dump_config(model.config)}), tmp)
    return Path(path)


def content_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents except ``DIGEST_KEY``: each tensor's
    dtype, shape and bytes and each plain value, under its key path, in key order
    (the order ``torch.load`` gives back)."""
    h = hashlib.sha256()

    def walk(obj: Any, key: str) -> None:
        h.update(key.encode() + b"\0")
        if torch.is_tensor(obj):
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if k != DIGEST_KEY:
                    walk(v, f"{key}/{k!r}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")
        else:
            h.update(repr(obj).encode())

    walk(checkpoint, "")
    return h.hexdigest()


def with_digest(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with its ``content_digest`` added (in place), just before it is written."""
    checkpoint[DIGEST_KEY] = content_digest(checkpoint)
    return checkpoint


def verify(path: Path, data: Any) -> None:
    """``ConfigError`` when a loaded checkpoint's contents do not match the digest
    written with it. Files written before digests existed pass unchecked."""
    if isinstance(data, dict) and isinstance(data.get(DIGEST_KEY), str) and data[DIGEST_KEY] != content_digest(data):
        raise ConfigError(f"checkpoint '{path}' is damaged: its contents do not match the SHA-256 written with "
                          "it (a disk or copy changed its bytes); use the previous checkpoint or copy it again")


def filter_lightning_state(checkpoint: dict[str, Any], model: DialogueModel) -> None:
    """Cut a Lightning checkpoint (in place, before it is written) to the
    trainable weights, and add the config."""
    from mmdialog.core.config import dump_config

    keep = {"model." + n for n in trainable_state(model)}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint[CONFIG_KEY] = dump_config(model.config)


def previous_checkpoint(path: str | Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``last.ckpt`` → ``last.prev.ckpt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def is_complete(path: Path) -> bool:
    """A ``torch.save`` file whose zip directory is intact (cheap: reads the end of the file)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


_verified: dict[tuple[str, int, int], None] = {}  # (path, size, mtime): checked once per process


def is_intact(path: Path) -> bool:
    """A checkpoint that reads safely and whose contents match its digest (every
    byte is read: tensors are mapped, not loaded). One that holds code raises
    ``UnsafeFileError``: a planted file is reported, not quietly passed over."""
    path = Path(path)
    if not path.is_file() or not is_complete(path):
        return False
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        try:
            verify(path, safe_load(path, mmap=True))
        except UnsafeFileError:
            raise
        except ConfigError:
            return False
        _verified[key] = None
    return True


def resume_checkpoint(path: str | Path) -> tuple[Path, str | None]:
    """The checkpoint to resume from, checked before anything is built: ``path``,
    or the previous one kept beside it when ``path`` is damaged (truncated, or
    bytes that do not match its digest). Returns it and a one-line note when it
    fell back; ``ConfigError`` when neither is usable. The file is read safely
    here (tensors mapped, not loaded), because some Lightning strategies load it
    later with their own unrestricted unpickler."""
    path = Path(path).expanduser()
    prev = previous_checkpoint(path)
    if is_intact(path):
        return path, None
    what = "is damaged (truncated, unreadable or its bytes changed)" if path.is_file() else "does not exist"
    if is_intact(prev):
        return prev, f"{path} {what}; resuming from the previous checkpoint {prev}"
    raise ConfigError(f"cannot resume: {path} {what}" + (" and so is the previous one" if prev.exists() else "")
                      + "; start without --resume, or give another .ckpt")


#: Model fields that change memory or speed, never a number: a resumed run may change them.
RUNTIME_ONLY = ("gradient_checkpointing", "checkpoint_policy")


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def check_resume_config(path: str | Path, config: Config) -> None:
    """``ConfigError`` naming the first model field (``field: old → new``) whose
    value differs between the config a checkpoint was trained with and ``config``:
    other plugins or shapes cannot take its weights and optimizer state. Read
    before anything is built (tensors mapped, not loaded)."""
    from mmdialog.core.config import config_from_yaml

    data = safe_load(path, mmap=True)
    text = data.get(CONFIG_KEY) if isinstance(data, dict) else None
    if text is None:
        return
    if not isinstance(text, str):
        text = yaml.safe_dump(text, sort_keys=False)
    saved = config_from_yaml(text, f"checkpoint '{path}'")
    old = _flat(saved.model.model_dump(mode="json"), "model")
    new = _flat(config.model.model_dump(mode="json"), "model")
    unset = "(unset)"
    changed = [k for k in [*old, *(k for k in new if k not in old)]
               if old.get(k, unset) != new.get(k, unset) and k.rsplit(".", 1)[-1] not in RUNTIME_ONLY]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more field(s))" if len(changed) > 1 else ""
        raise ConfigError(f"cannot resume from {path} with another model config: {k}: {old.get(k, unset)} → "
                          f"{new.get(k, unset)}{more}; resume with the run's own settings, or start a new run "
                          "in another --out-dir")


def safe_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only. A
    file that needs unpickling of anything else is refused, never executed.
    ``mmap=True`` maps the tensors instead of reading them: a cheap check of a
    file that something else (a Lightning strategy) will load."""
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        # torch's message carries terminal colours and advice to retry with weights_only=False:
        # keep only the reason, which follows "WeightsUnpickler error:"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        text = text.split("WeightsUnpickler error:", 1)[-1].strip()
        name = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if name:
            raise UnsafeFileError(f"checkpoint '{path}' is refused: it holds Python objects besides tensors and plain "
                              f"data, and unpickling them could run code (it would import {name.group(1)}); "
                              "mmdialog never does, so give a trainable.pt or .ckpt written by `mmdialog train`"
                              ) from None
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise ConfigError(f"checkpoint '{path}' cannot be read safely ({first[:160]}); mmdialog reads only "
                          "tensors and plain data, so give a trainable.pt or .ckpt written by `mmdialog train`"
                          ) from None


def find_checkpoint(ckpt: str | Path, weights: Literal["best", "last"] = "best") -> Path:
    """A checkpoint file, or the one inside a run folder. ``weights="best"``: the
    best dev BLEU-2 (checkpoints/best.ckpt, when the run evaluated on dev), else
    trainable.pt, else checkpoints/last.ckpt. ``"last"``: the weights training
    ended with (trainable.pt), else checkpoints/last.ckpt — what the reference
    scores (its test path evaluates the model still in memory after training)."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        order = (BEST, TRAINABLE, LAST) if weights == "best" else (TRAINABLE, LAST)
        found = [path / name for name in order if (path / name).is_file()]
        if not found:
            raise ConfigError(f"checkpoint folder '{path}' has no {BEST}, {TRAINABLE} or {LAST}; "
                              "give the file written by `mmdialog train`")
        return found[0]
    if not path.exists():
        raise ConfigError(f"checkpoint '{path}' does not exist; give the {TRAINABLE} or .ckpt "
                          "written by `mmdialog train`")
    return path


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(trainable weights by parameter name, config YAML, metrics) of a
    ``trainable.pt``, a Lightning ``.ckpt`` or a run folder holding either.
    Metrics come from the checkpoint's ``metrics`` key or a ``metrics.json`` beside it."""
    from mmdialog.core.config import read_json

    path = find_checkpoint(ckpt)
    data = safe_load(path)
    verify(path, data)
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' is not an mmdialog checkpoint (no trainable weights + config)")
    if "trainable" in data and "config" in data:
        weights, config = data["trainable"], data["config"]
    elif "state_dict" in data and CONFIG_KEY in data:
        config = data[CONFIG_KEY]
        weights = {k.removeprefix("model."): v for k, v in data["state_dict"].items()}
    else:
        raise ConfigError(f"'{path}' is not an mmdialog checkpoint: expected 'trainable' + 'config' "
                          f"({TRAINABLE}) or 'state_dict' + '{CONFIG_KEY}' (Lightning .ckpt)")
    if not isinstance(config, str):
        config = yaml.safe_dump(config, sort_keys=False)
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    side = path.parent / METRICS
    if not metrics and side.is_file():
        metrics = read_json(side, "metrics")
    return {k: v for k, v in weights.items() if torch.is_tensor(v)}, config, metrics


def weights_digest(model: DialogueModel) -> str:
    """SHA-1 of the trainable weights, for comparing runs and ranks."""
    h = hashlib.sha1()
    for n, p in trainable_state(model).items():
        h.update(n.encode())
        # A copy: a NumPy view would pin the storage, which FSDP frees after gathering it.
        h.update(p.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
    return h.hexdigest()
