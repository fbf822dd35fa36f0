"""``mmdialog data …``: check, download the photos of, and convert datasets.

Exit codes: 0 = fine; 1 = the data has problems (``check``: bad records or
files, corrupt or missing images; ``fetch-images``: some downloads failed);
2 = user error (path not found, bad option, ``--strict`` problem), printed as
one line on stderr without a stack trace.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmdialog.core.data.limits import MAX_RECORD_CHARS, MAX_TURN_CHARS
from mmdialog.core.errors import MMDialogError

data_app = typer.Typer(
    help="Datasets: check PhotoChat / DialogCC / JSONL files, download their photos, convert to JSONL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_FORMAT_HELP = "auto (detect from content), photochat, dialogcc, jsonl, or a format a plugin registers"


def _load(path: Path | str, fmt: str, split: Optional[str], strict: bool, image_dir: Optional[Path], **kw):
    from mmdialog.core.data.loader import load_dialogues

    return load_dialogues(path, format=fmt, split=split, strict=strict, image_dir=image_dir, **kw)


def split_counts(dialogues) -> dict[str, dict[str, int]]:
    """Dialogues, turns and photos per split (``-`` for dialogues of no known split)."""
    out: dict[str, dict[str, int]] = {}
    for d in dialogues:
        c = out.setdefault(d.split or "-", {"dialogues": 0, "turns": 0, "photos": 0})
        c["dialogues"] += 1
        c["turns"] += len(d.turns)
        c["photos"] += len(d.photos)
    return dict(sorted(out.items(), key=lambda kv: ("train", "dev", "test", "-").index(kv[0])
                       if kv[0] in ("train", "dev", "test", "-") else 4))


@data_app.command("check")
def check_cmd(
    path: Path = typer.Argument(..., help="Data file or folder."),
    format: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="train, dev (valid) or test; default all."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", "-i", help="Folder of local images."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first problem (exit code 2)."),
    verify_images: bool = typer.Option(False, "--verify-images", help="Decode every found image."),
    description_style: str = typer.Option("objects", help="PhotoChat descriptions: objects, raw or sentence."),
    max_problems: int = typer.Option(20, help="Problems to list (all are counted)."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts and problems as JSON."),
    max_turn_chars: int = typer.Option(MAX_TURN_CHARS, min=1, help="Skip (and count) a record with a longer "
                                       "turn, as training does (data.max_turn_chars)."),
    max_record_chars: int = typer.Option(MAX_RECORD_CHARS, min=1, help="Skip (and count) a longer record, as "
                                         "training does (data.max_record_chars)."),
) -> None:
    """Count dialogues, turns, photos, share turns, missing images and bad records."""
    result = _load(path, format, split, strict, image_dir, verify_images=verify_images,
                   description_style=description_style, max_turn_chars=max_turn_chars,
                   max_record_chars=max_record_chars)
    rep = result.report
    splits = split_counts(result.dialogues)
    if as_json:
        payload = dict(rep.counts(), splits=splits, problems=[dict(kind=p.kind, file=p.file, record=p.record,
                                                                   message=p.message) for p in rep.problems])
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        typer.echo(f"{path}" + (f" (split {split})" if split else ""))
        typer.echo(rep.format(max_problems=max_problems))
        if len(splits) > 1:
            typer.echo("per split        dialogues  turns  photos")
            for name, c in splits.items():
                typer.echo(f"  {name:<14} {c['dialogues']:>9}  {c['turns']:>5}  {c['photos']:>6}")
        if image_dir is None and rep.missing_images:
            typer.echo("(no --image-dir: photos without a local path count as missing)")
    bad = not rep.ok or (image_dir is not None and rep.missing_images)
    raise typer.Exit(code=1 if bad else 0)


@data_app.command("fetch-images")
def fetch_cmd(
    path: Path = typer.Argument(..., help="Data file or folder whose photo URLs to download."),
    out: Path = typer.Option(..., "--out", "-o", help="Image folder to download into."),
    workers: int = typer.Option(8, "--workers", "-w", min=1, max=256, help="Parallel downloads."),
    retries: int = typer.Option(3, "--retries", "-r", min=0, max=20, help="Retries per URL."),
    timeout: float = typer.Option(30.0, help="Seconds per request."),
    backoff: float = typer.Option(1.0, help="First retry delay in seconds (doubles each retry)."),
    rate_limit: Optional[float] = typer.Option(None, help="Max requests per second (all workers)."),
    format: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="train, dev (valid) or test; default all."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Download every photo URL to OUT/<sha1(url)[:16]><ext> (resumable, retried)."""
    from mmdialog.core.data.fetch import fetch_images

    result = _load(path, format, split, False, None)
    if result.report.bad_records or result.report.bad_files:
        typer.echo(f"note: {result.report.bad_records} bad record(s), {result.report.bad_files} bad "
                   "file(s) skipped (run `mmdialog data check` for details)", err=True)

    last = [-1]

    def progress(done: int, total: int) -> None:
        step = max(1, total // 20)
        if not quiet and (done == total or done - last[0] >= step):
            last[0] = done
            typer.echo(f"\r{done}/{total} urls", nl=done == total, err=True)

    try:
        rep = fetch_images(result.dialogues, out, workers=workers, retries=retries, timeout=timeout,
                           backoff=backoff, rate_limit=rate_limit, progress=progress)
    except OSError as e:
        raise MMDialogError(f"{out}: {e}") from None
    typer.echo(rep.summary())
    for f in rep.failures[:20]:
        typer.echo(f"failed: {f}")
    if len(rep.failures) > 20:
        typer.echo(f"... and {len(rep.failures) - 20} more failures")
    raise typer.Exit(code=0 if rep.ok else 1)


@data_app.command("convert")
def convert_cmd(
    path: Path = typer.Argument(..., help="Data file or folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .jsonl file."),
    format: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="train, dev (valid) or test; default all."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", "-i", help="Resolve photo paths here."),
    description_style: str = typer.Option("objects", help="PhotoChat descriptions: objects, raw or sentence."),
) -> None:
    """Convert PhotoChat / DialogCC / JSONL data to mmdialog JSONL."""
    from mmdialog.core.data.jsonl import write_jsonl

    result = _load(path, format, split, False, image_dir, description_style=description_style)
    try:
        n = write_jsonl(result.dialogues, out)
    except OSError as e:
        raise MMDialogError(f"{out}: {e}") from None
    typer.echo(f"wrote {n} dialogues to {out} ({result.report.bad_records} bad records skipped)")


@data_app.command("cache")
def cache_cmd(
    path: str = typer.Argument(..., help="Data file or folder (or hf:OWNER/NAME) whose photos to encode."),
    config: str = typer.Option("tiny", "--config", "-c", help="preset name (tiny, paper) or YAML file: the "
                                                             "model whose frozen encoders fill the store"),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="train, dev (valid) or test; default all."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", "-i", help="Folder of local images."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, … (auto: the first GPU, else CPU)"),
    feature_store: Optional[Path] = typer.Option(None, "--feature-store", help="store folder (default: the "
                                                 "config's data.feature_store, else $MMDIALOG_CACHE/features)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fill the feature store ahead of training: each photo's Q-Former features and VAE
    posterior, encoded once (a photo already stored is skipped; a killed fill resumes)."""
    import torch

    from mmdialog.core.assembler import build
    from mmdialog.core.caching import fill_stores
    from mmdialog.core.training import resolve_precision
    from mmdialog.sdk.commands.common import config_from_cli

    cfg = config_from_cli(config, None, None, None, None, [], **{
        "data.path": path, "data.split": split, "data.image_dir": str(image_dir) if image_dir else None})
    result = _load(path, cfg.data.format, split, False, cfg.data.image_dir)
    photos = [p.path for d in result.dialogues for p in d.photos if p.path is not None]
    dev = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    model = build(cfg, device=str(dev)).eval()
    stores = model.use_feature_stores(str(feature_store) if feature_store else cfg.data.feature_store)
    if not stores:
        raise MMDialogError(f"{config}: no frozen encoder keeps per-photo outputs (perceiver and generator "
                            "trained, or their caches off): nothing to store")
    # The precision training runs in: autocast changes the encoders' numbers.
    precision = resolve_precision(cfg.train.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    components = {kind: getattr(model, kind) for kind in stores}
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None), \
            typer.progressbar(length=len(photos), label="encoding photos", hidden=quiet) as bar:
        counts = fill_stores(components, stores, photos, dev, bar.update)
    for kind, store in stores.items():
        typer.echo(f"{kind}: {counts[kind]} photo(s) encoded into {store.folder}")
    if counts["unreadable"]:
        typer.echo(f"{counts['unreadable']} photo(s) unreadable (run `mmdialog data check --verify-images`)")
