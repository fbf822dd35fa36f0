"""The exported model folder: written by ``save_pretrained`` (and ``mmdialog
export``), read back by ``mmdialog.load`` (``core/assembler.py``, which rebuilds
the model it describes).

An exported folder holds only what training changed; the base checkpoints
(the LLM, BLIP-2, Stable Diffusion) stay references — a hub id, a local
folder or an ``embedded:`` asset named in the config — as peft adapters do::

    OUT_DIR/
      mmdialog.json              format, versions, parameter count, SHA-256 of the weights
      config.yaml                the full, validated Config (base checkpoints by reference)
      model.safetensors          the trainable weights, by DialogueModel parameter name
      tokenizer_additions.json   the tokens added to the LLM's tokenizer, with their ids
      README.md                  a model card: components, training config, metrics
      metrics.json               (when metrics were given)

``load`` rebuilds the model with ``mmdialog.build(config)`` — same seed, so
random-init components come out identical — and copies the weights on top.

Integrity: the manifest records the SHA-256 of every file that decides what
loads — the weights, ``config.yaml``, ``tokenizer_additions.json`` (and
``metrics.json``) — format version 3. ``load`` / ``check_folder`` refuse a
folder whose files no longer match, and one whose manifest covers less (format
1 had no digests, 2 the weights only): that folder loads only when the caller
says so (``allow_unverified=True``, ``--allow-unverified``) or after ``mmdialog
export --upgrade`` re-hashed it, so rewriting the manifest to an older version
cannot switch the check off. Every file is read through ``core/reading.py``
(regular files inside the folder, bounded). Weights holding NaN or inf are
refused both when written and when read. An export names no path of the
machine it was written on (``train.out_dir`` is reset).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from mmdialog.core.checkpoint import trainable_state
from mmdialog.core.config import PRESETS, SLOTS, Config, TrainConfig, config_from_yaml, dump_config
from mmdialog.core.errors import ConfigError, validation_message
from mmdialog.core.files import atomic_folder, atomic_write
from mmdialog.core.pretrained import require_folder
from mmdialog.core.reading import CONFIG_BYTES, MANIFEST_BYTES, check_file, parse_yaml, read_json, read_text

if TYPE_CHECKING:
    from mmdialog.core.model import DialogueModel

FORMAT = "mmdialog-export"
#: 1: no digests; 2: "sha256" of the weights; 3: "sha256" of every file in COVERED (and metrics.json).
FORMAT_VERSION = 3
MANIFEST, CONFIG, WEIGHTS, TOKENS, CARD, METRICS = (
    "mmdialog.json", "config.yaml", "model.safetensors", "tokenizer_additions.json", "README.md", "metrics.json")
REQUIRED = (MANIFEST, CONFIG, WEIGHTS, TOKENS)
#: The files that decide what loads: each one's SHA-256 is in the manifest. The card does not.
COVERED = (WEIGHTS, CONFIG, TOKENS)
UNVERIFIED_HELP = ("re-hash a folder you trust with `mmdialog export --upgrade FOLDER`, or load it as it is with "
                   "--allow-unverified (Python: allow_unverified=True)")


class Manifest(BaseModel):
    """``mmdialog.json``: what ``check_folder`` relies on, type-checked (a huge or
    fractional ``format_version`` is an error, not a traceback)."""

    model_config = ConfigDict(extra="allow")
    format: Literal["mmdialog-export"]
    format_version: StrictInt = Field(ge=1)
    mmdialog_version: StrictStr | None = None
    sha256: dict[StrictStr, StrictStr] | None = None


class TokenAdditions(BaseModel):
    """``tokenizer_additions.json``: the tokens added to the LLM's tokenizer, with their ids."""

    model_config = ConfigDict(extra="allow")
    base_vocab: StrictInt | None = None
    added_tokens: dict[StrictStr, StrictInt] = Field(default_factory=dict)


# -- writing ----------------------------------------------------------------------------------
def save_pretrained(model: DialogueModel, out_dir: str | Path, metrics: dict[str, Any] | None = None,
                    *, overwrite: bool = True) -> Path:
    """Write ``model``'s trainable weights, config, tokenizer additions and card to ``out_dir``."""
    weights = trainable_state(model)
    check_finite(weights, "refusing to save the model")
    return _write(weights, model.config, _token_additions(model), out_dir, metrics, overwrite)


def _token_additions(model: DialogueModel) -> dict[str, Any]:
    llm = model.llm
    tok = llm.tokenizer
    base = len(tok) if llm.base_vocab is None else llm.base_vocab
    added = {t: i for t, i in sorted(tok.get_added_vocab().items(), key=lambda kv: kv[1]) if i >= base}
    return {"base_vocab": llm.base_vocab, "added_tokens": added,
            "img_open": tok.convert_ids_to_tokens(llm.img_open_id),
            "img_close": tok.convert_ids_to_tokens(llm.img_close_id),
            "image_token": tok.convert_ids_to_tokens(llm.image_token_id)}


def _write(weights: dict[str, torch.Tensor], config: Config, tokens: dict[str, Any], out_dir: str | Path,
           metrics: dict[str, Any] | None, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    from mmdialog import __version__

    out = check_destination(out_dir, overwrite)
    config = portable(config)
    with atomic_folder(out, replace=True) as tmp:  # the folder appears complete, or not at all
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(dump_config(config), encoding="utf-8")
        (tmp / TOKENS).write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if metrics:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "mmdialog_version": __version__,
                    "torch_version": torch.__version__.split("+")[0], "weights": WEIGHTS,
                    "num_tensors": len(tensors), "num_parameters": sum(t.numel() for t in tensors.values()),
                    "sha256": _digests(tmp)}  # of the bytes on disk, as load will read them
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(config, manifest, metrics or {}), encoding="utf-8")
    return out


def check_destination(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir`` as a folder an export may be written to, checked before any
    model is built: not a link (dangling or not), not a file, empty unless
    ``overwrite``, and under a folder that can be written."""
    out = Path(out_dir).expanduser()
    if out.is_symlink():
        dangling = "" if out.exists() else " that points nowhere"
        raise ConfigError(f"output '{out}' is a symbolic link{dangling}; give the path of a new folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output '{out}' exists and is not a folder; give the path of a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder '{out}' is not empty; choose a new folder (or --force)")
    parent = out.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create '{out}': '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create '{out}': the folder '{parent}' is not writable")
    return out


def portable(config: Config) -> Config:
    """``config`` without the paths only the training machine has: the run's
    ``out_dir`` goes back to its default."""
    train = config.train.model_copy(update={"out_dir": TrainConfig.model_fields["out_dir"].default})
    return config.model_copy(update={"train": train})


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of ``folder`` that decides what loads."""
    return {name: file_sha256(folder / name) for name in (*COVERED, METRICS) if (folder / name).is_file()}


def model_card(config: Config, manifest: dict[str, Any], metrics: dict[str, Any]) -> str:
    m = config.model
    bases = {slot: getattr(m, slot).options.get("path") for slot in SLOTS if getattr(m, slot) is not None}
    front = {"library_name": "mmdialog", "tags": ["photo-sharing", "multimodal-dialogue", "mmdialog"],
             "base_model": [b for b in bases.values() if b and not str(b).startswith("embedded:")] or None}
    lines = ["---", yaml.safe_dump({k: v for k, v in front.items() if v}, sort_keys=False).strip(), "---", "",
             "# mmdialog model", "",
             "A photo-sharing dialogue agent (Guo et al., arXiv 2408.08650, as implemented by mmdialog): "
             "it chats, decides when to share a photo, and produces it.", "",
             "## Components", "", "| component | plugin | base checkpoint (by reference) |", "|---|---|---|"]
    for slot in SLOTS:
        spec = getattr(m, slot)
        if spec is None:
            continue
        opts = spec.options
        base = opts.get("path") or opts.get("folder") or ("-" if slot == "bridge" else "random-init / built-in")
        lines.append(f"| {slot} | `{spec.name}` | `{base}` |")
    lines += ["", f"This folder holds only the trainable weights ({manifest['num_tensors']} tensors, "
              f"{manifest['num_parameters']:,} parameters, `{WEIGHTS}`); the base checkpoints above are "
              "loaded from where the config points (a hub id, a local folder, or an asset embedded in "
              "mmdialog's dependencies)."]
    digests = manifest.get("sha256") or {}
    if digests:
        lines += ["", "SHA-256 of the files that decide what loads (`mmdialog.load` checks them):", ""]
        lines += [f"- `{name}`: `{digest}`" for name, digest in digests.items()]
    lines += ["", "## Use", "", "```python", "import mmdialog", "",
              "session = mmdialog.load(\"path/to/this/folder\").session(seed=0)",
              "reply = session.send(\"what did you do this weekend?\")",
              "print(reply.text, reply.images)", "```", "",
              "```bash", "mmdialog chat path/to/this/folder", "mmdialog serve path/to/this/folder", "```", ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in metrics.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    else:
        lines.append("No evaluation metrics were recorded for this checkpoint.")
    lines += ["", "## Training config", "", "```yaml", dump_config(config).rstrip(), "```", ""]
    return "\n".join(lines)


# -- integrity --------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    """One line naming the first weight holding NaN / inf, and how many do."""
    bad = {}
    for name, t in weights.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad[name] = n
    if bad:
        first, n = next(iter(bad.items()))
        raise ConfigError(f"{where}: weight '{first}' holds {n:,} NaN/inf values ({len(bad)} of {len(weights)} "
                          "tensors are not finite); training diverged or the weights are damaged — use an "
                          "earlier checkpoint")


def _check_digests(p: Path, digests: dict[str, str], version: int, allow_unverified: bool) -> None:
    """Compare each listed file's SHA-256 with the manifest's; a manifest that
    covers less than ``COVERED`` is refused unless ``allow_unverified``."""
    missing = [name for name in COVERED if name not in digests]
    if (WEIGHTS in missing and version >= 2) or (missing and version >= 3):
        raise ConfigError(f"model folder '{p}': {MANIFEST} has no SHA-256 of {missing[0]}; the folder is damaged "
                          "or was changed after export")
    if missing and not allow_unverified:
        raise ConfigError(f"model folder '{p}': its {MANIFEST} (format version {version}) records no SHA-256 of "
                          f"{', '.join(missing)}, so nothing shows they are the files that were exported; "
                          + UNVERIFIED_HELP.replace("FOLDER", str(p)))
    for name, expected in digests.items():
        if Path(name).name != name or name in (".", ".."):
            raise ConfigError(f"model folder '{p}': {MANIFEST} lists a SHA-256 for '{name}', which is not a "
                              "file of the folder; the folder is damaged or was changed after export")
        f = check_file(p / name, f"model folder file {name}", root=p)
        if file_sha256(f) != expected.lower():
            raise ConfigError(f"model folder '{p}': {name} does not match the SHA-256 recorded in {MANIFEST}; "
                              "the folder is damaged or was changed after export (copy or export it again)")


# -- loading ----------------------------------------------------------------------------------
def read_manifest(p: Path) -> Manifest:
    """The checked manifest of folder ``p`` (bounded read, typed fields)."""
    raw = read_json(p / MANIFEST, "manifest", root=p, max_bytes=MANIFEST_BYTES)
    if raw.get("format") != FORMAT:
        raise ConfigError(f"model folder '{p}': {MANIFEST} is not an mmdialog export manifest")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"model folder '{p}': {MANIFEST} field {validation_message(e)}") from None
    if manifest.format_version > FORMAT_VERSION:
        raise ConfigError(f"model folder '{p}' was written by a newer mmdialog "
                          f"({manifest.mmdialog_version}); upgrade mmdialog to load it")
    return manifest


def check_folder(path: str | Path, *, allow_unverified: bool = False) -> Path:
    """Fail with one line unless ``path`` is a complete exported folder whose
    files match the SHA-256 digests its manifest recorded. A manifest older
    than format 3 (not every file covered) passes only with ``allow_unverified``."""
    p = require_folder(path, REQUIRED, "model", "a folder written by `mmdialog export` (or a training "
                       f"checkpoint, or a preset: {', '.join(PRESETS)})")
    manifest = read_manifest(p)
    _check_digests(p, manifest.sha256 or {}, manifest.format_version, allow_unverified)
    return p


def upgrade_folder(path: str | Path) -> tuple[Path, int]:
    """Re-hash an older exported folder in place (``mmdialog export --upgrade``):
    the files are checked as ``load`` reads them, the digests the manifest has
    must still match, and the manifest is rewritten at ``FORMAT_VERSION`` with
    the SHA-256 of every covered file. Returns (folder, the version it had)."""
    p = check_folder(path, allow_unverified=True)
    raw = read_json(p / MANIFEST, "manifest", root=p, max_bytes=MANIFEST_BYTES)
    before = raw["format_version"]
    config_from_yaml(read_folder_config(p), f"model folder '{p}'")
    read_tokens(p)
    _read_weights(check_file(p / WEIGHTS, "weights", root=p), f"model folder '{p}'")
    with atomic_write(p / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**raw, "format_version": FORMAT_VERSION, "sha256": _digests(p)}, indent=2)
                       + "\n", encoding="utf-8")
    check_folder(p)
    return p, before


def load_weights(model: DialogueModel, weights: dict[str, torch.Tensor], where: str,
                  swapped: tuple[str, ...] = ()) -> None:
    """Copy ``weights`` into ``model``; those of the slots in ``swapped`` (a
    component the caller replaced with another plugin) are left out."""
    params = dict(model.named_parameters())
    weights = {k: v for k, v in weights.items() if k.split(".", 1)[0] not in swapped}
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise ConfigError(f"{where}: weight '{unknown[0]}' has no place in the model its config builds "
                          f"({len(unknown)} such); was it written with other plugins?")
    bad = [k for k, v in weights.items() if tuple(v.shape) != tuple(params[k].shape)]
    if bad:
        raise ConfigError(f"{where}: weight '{bad[0]}' has shape {tuple(weights[bad[0]].shape)}, the model "
                          f"expects {tuple(params[bad[0]].shape)}; is the base checkpoint the same?")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].dtype))


def check_tokens(model: DialogueModel, saved: dict[str, Any], where: str) -> None:
    now = _token_additions(model)["added_tokens"]
    for token, idx in (saved.get("added_tokens") or {}).items():
        if now.get(token) != idx:
            raise ConfigError(f"{where}: token '{token}' had id {idx} in training but {now.get(token)} "
                              "now; the LLM's tokenizer differs from the one it was trained with")


def read_tokens(folder: Path) -> dict[str, Any]:
    raw = read_json(folder / TOKENS, "tokenizer additions", root=folder)
    try:
        return TokenAdditions.model_validate(raw).model_dump()
    except ValidationError as e:
        raise ConfigError(f"model folder '{folder}': {TOKENS} field {validation_message(e)}") from None


def read_folder(folder: Path, *, allow_unverified: bool = False
                ) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], str]:
    """(weights, config YAML, tokenizer additions, what to call it in errors) of
    an exported folder, checked (``check_folder``; weights finite)."""
    check_folder(folder, allow_unverified=allow_unverified)
    where = f"model folder '{folder}'"
    weights = _read_weights(check_file(folder / WEIGHTS, "weights", root=folder), where)
    check_finite(weights, where)
    return weights, read_folder_config(folder), read_tokens(folder), where


def read_folder_config(folder: Path) -> str:
    """The YAML text of ``config.yaml``, checked to parse within the bounds (errors name the file)."""
    path = folder / CONFIG
    text = read_text(path, "config", root=folder, max_bytes=CONFIG_BYTES)
    if not isinstance(parse_yaml(text, f"config '{path}'"), dict):
        raise ConfigError(f"config '{path}' must be a mapping with 'model', 'data', 'train'")
    return text


def _read_weights(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{where}: {path.name} cannot be read ({e}); is the folder complete?") from None
