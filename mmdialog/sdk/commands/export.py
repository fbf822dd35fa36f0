"""``mmdialog export``: a self-contained model folder from a training checkpoint."""
from __future__ import annotations

from pathlib import Path

import typer

from mmdialog.core.errors import MMDialogError
from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import TRUST_REMOTE_CODE, quiet


def export(
    ckpt: str | None = typer.Argument(None, help="trainable.pt, a Lightning .ckpt, or a run folder"),
    out_dir: str | None = typer.Argument(None, help="new folder to write"),
    metrics: str | None = typer.Option(None, help="JSON file of evaluation metrics for the model card"),
    force: bool = typer.Option(False, "--force", help="replace OUT_DIR if it is not empty"),
    upgrade: str | None = typer.Option(None, "--upgrade", metavar="FOLDER",
                                       help="instead: re-hash an exported folder written by an older mmdialog "
                                            "(manifest format 1 or 2) in place, so it loads verified; only one "
                                            "you trust"),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Write a self-contained model folder: config, trainable weights, tokenizer additions, model card."""
    if upgrade is not None:
        from mmdialog.core.export import read_manifest, upgrade_folder

        if ckpt is not None or out_dir is not None:
            raise MMDialogError("--upgrade FOLDER re-hashes that folder in place; give no CKPT or OUT_DIR with it")
        folder, before = upgrade_folder(Path(upgrade).expanduser())
        typer.echo(f"{folder}: manifest format {before} → {read_manifest(folder).format_version}; every file "
                   "that decides what loads has its SHA-256 recorded")
        return
    if ckpt is None or out_dir is None:
        raise MMDialogError("give CKPT and OUT_DIR (mmdialog export RUN/trainable.pt OUT), or --upgrade FOLDER")
    precheck.checkpoints([ckpt])  # before torch: a typo should not cost seconds
    from mmdialog.core.export import check_destination, check_folder, read_manifest

    check_destination(out_dir, force)  # before the model builds: a typo should not cost a minute
    quiet()
    from mmdialog.core.assembler import export as run

    out = run(ckpt, out_dir, metrics, overwrite=force, trust_remote_code=trust_remote_code)
    check_folder(out)
    manifest = read_manifest(out)
    typer.echo(f"exported {manifest.model_extra['num_tensors']} trainable tensors "
               f"({manifest.model_extra['num_parameters']:,} parameters) to {out}")
    typer.echo(f"use it: mmdialog chat {out}   |   mmdialog.load({str(out)!r}).session()")
