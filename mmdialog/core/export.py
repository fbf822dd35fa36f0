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

Integrity: the manifest records the SHA-256 of ``model.safetensors`` (format
version 2; version-1 folders have none and still load), and ``load`` /
``check_folder`` refuse a folder whose weights no longer match it. Weights
holding NaN or inf are refused both when written and when read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from mmdialog.core.checkpoint import trainable_state
from mmdialog.core.config import PRESETS, SLOTS, Config, dump_config, read_json
from mmdialog.core.errors import ConfigError
from mmdialog.core.files import atomic_folder
from mmdialog.core.pretrained import require_folder

if TYPE_CHECKING:
    from mmdialog.core.model import DialogueModel

FORMAT = "mmdialog-export"
FORMAT_VERSION = 2  # 2: the manifest records "sha256": {file name: hex digest}; 1 is still read
MANIFEST, CONFIG, WEIGHTS, TOKENS, CARD, METRICS = (
    "mmdialog.json", "config.yaml", "model.safetensors", "tokenizer_additions.json", "README.md", "metrics.json")
REQUIRED = (MANIFEST, CONFIG, WEIGHTS, TOKENS)


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

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output '{out}' exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder '{out}' is not empty")
    with atomic_folder(out, replace=True) as tmp:  # the folder appears complete, or not at all
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        digest = file_sha256(tmp / WEIGHTS)  # of the bytes on disk, as load will read them
        (tmp / CONFIG).write_text(dump_config(config), encoding="utf-8")
        (tmp / TOKENS).write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "mmdialog_version": __version__,
                    "torch_version": torch.__version__.split("+")[0], "weights": WEIGHTS,
                    "num_tensors": len(tensors), "num_parameters": sum(t.numel() for t in tensors.values()),
                    "sha256": {WEIGHTS: digest}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if metrics:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(config, manifest, metrics or {}), encoding="utf-8")
    return out


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
    digest = (manifest.get("sha256") or {}).get(WEIGHTS)
    if digest:
        lines += ["", f"SHA-256 of `{WEIGHTS}`: `{digest}` (`mmdialog.load` checks it)."]
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


def _check_digests(p: Path, manifest: dict[str, Any], version: int) -> None:
    """Compare each file's SHA-256 with the manifest's (format version 2 on)."""
    digests = manifest.get("sha256")
    if digests is None and version < 2:
        return  # written before exports recorded digests
    if not isinstance(digests, dict) or not isinstance(digests.get(WEIGHTS), str):
        raise ConfigError(f"model folder '{p}': {MANIFEST} has no SHA-256 of {WEIGHTS}; the folder is damaged "
                          "or was changed after export")
    for name, expected in digests.items():
        f = p / str(name)
        if Path(str(name)).name != name or not f.is_file():
            raise ConfigError(f"model folder '{p}': {MANIFEST} lists a SHA-256 for '{name}', which is not a "
                              "file of the folder; the folder is damaged or was changed after export")
        if file_sha256(f) != str(expected).lower():
            raise ConfigError(f"model folder '{p}': {name} does not match the SHA-256 recorded in {MANIFEST}; "
                              "the folder is damaged or was changed after export (copy or export it again)")


# -- loading ----------------------------------------------------------------------------------
def check_folder(path: str | Path) -> Path:
    """Fail with one line unless ``path`` is a complete exported folder whose
    weights match the SHA-256 its manifest recorded."""
    p = require_folder(path, REQUIRED, "model", "a folder written by `mmdialog export` (or a training "
                       f"checkpoint, or a preset: {', '.join(PRESETS)})")
    manifest = read_json(p / MANIFEST, "manifest")
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"model folder '{p}': {MANIFEST} is not an mmdialog export manifest")
    try:
        version = int(manifest.get("format_version", 0))
    except (TypeError, ValueError):
        raise ConfigError(f"model folder '{p}': {MANIFEST} has a format_version that is not a number") from None
    if version > FORMAT_VERSION:
        raise ConfigError(f"model folder '{p}' was written by a newer mmdialog "
                          f"({manifest.get('mmdialog_version')}); upgrade mmdialog to load it")
    _check_digests(p, manifest, version)
    return p


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


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], str]:
    """(weights, config YAML, tokenizer additions, what to call it in errors) of
    an exported folder, checked (``check_folder``; weights finite)."""
    check_folder(folder)
    where = f"model folder '{folder}'"
    weights = _read_weights(folder / WEIGHTS, where)
    check_finite(weights, where)
    return weights, (folder / CONFIG).read_text(encoding="utf-8"), read_json(folder / TOKENS, "tokenizer additions"), where


def _read_weights(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{where}: {path.name} cannot be read ({e}); is the folder complete?") from None
