"""``mmdialog train``."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import (
    CONFIG,
    REFERENCE_RECIPE,
    SET,
    TRUST_REMOTE_CODE,
    config_from_cli,
)
from mmdialog.sdk.commands.common import quiet as quiet_libraries


def train(
    config: str = CONFIG,
    llm: Optional[str] = typer.Option(None, help="llm plugin"),
    perceiver: Optional[str] = typer.Option(None, help="perceiver plugin: qformer, caption, …"),
    bridge: Optional[str] = typer.Option(None, help="bridge plugin: gumbel, text, …"),
    generator: Optional[str] = typer.Option(None, help="generator plugin: sd, sdxl, …"),
    data: Optional[str] = typer.Option(None, help="dataset path (or embedded:demo)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps"),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    accumulate: Optional[int] = typer.Option(None, help="gradient accumulation"),
    precision: Optional[str] = typer.Option(None, help="32-true, bf16-mixed, …"),
    devices: Optional[str] = typer.Option(None, help="number of devices or 'auto'"),
    num_nodes: Optional[int] = typer.Option(None),
    strategy: Optional[str] = typer.Option(None, help="auto, ddp, fsdp, deepspeed"),
    out_dir: Optional[str] = typer.Option(None),
    gradient_checkpointing: bool = typer.Option(False, help="recompute LLM and UNet activations (less memory)"),
    resume: Optional[str] = typer.Option(None, help="'last' (out_dir/checkpoints/last.ckpt) or a .ckpt path"),
    strict: bool = typer.Option(False, "--strict", help="a bad record or photo is an error before any step "
                                                         "(default: skipped for the image loss and counted)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="train into an out-dir that holds an earlier run"),
    sets: list[str] = SET,
    reference_recipe: bool = REFERENCE_RECIPE,
    quiet: bool = typer.Option(False, help="no progress bar"),
    verbose: bool = typer.Option(False, "--verbose", help="show library warnings and notices (otherwise in "
                                                         "OUT_DIR/log.txt)"),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Train a model (the end-to-end one by default) and print its losses.

    SIGTERM and Ctrl-C write a checkpoint and exit with 143 / 130; continue with --resume last."""
    cfg = config_from_cli(config, llm, perceiver, bridge, generator, sets, reference_recipe, plugins=False, **{
        "data.path": data, "train.max_steps": max_steps, "data.batch_size": batch_size, "train.lr": lr,
        "train.accumulate": accumulate, "train.precision": precision,
        "train.devices": int(devices) if devices and devices.isdigit() else devices,
        "train.num_nodes": num_nodes, "train.strategy": strategy, "train.out_dir": out_dir,
        "data.strict": strict or None,
        **({"model.llm.gradient_checkpointing": True, "model.generator.gradient_checkpointing": True}
           if gradient_checkpointing else {})})
    # Everything a user can get wrong is checked before torch is imported (seconds) and the model
    # builds (minutes at paper scale).
    out = Path(cfg.train.out_dir)
    precheck.data(cfg.data.path, cfg.data.image_dir)
    precheck.out_dir(out, resume, overwrite)
    from mmdialog.core.assembler import build
    from mmdialog.core.checkpoint import LAST, check_resume_config, resume_checkpoint
    from mmdialog.core.config import plugin_options
    from mmdialog.core.data.source import read_dialogues
    from mmdialog.core.files import lock_folder
    from mmdialog.core.training import is_launching_process
    from mmdialog.core.training import train as run

    if is_launching_process():  # one training per out-dir, until this process ends
        lock_folder(out, "training")
    plugin_options(cfg)  # the plugins' options (imports them), validated once for the whole command
    precheck.writable(out)
    checkpoint = None
    if resume:
        checkpoint = resume_checkpoint(out / LAST if resume == "last" else resume)  # checked once, here
        if checkpoint[1]:
            typer.echo(f"note: {checkpoint[1]}", err=True)
        check_resume_config(checkpoint[0], cfg)
    dialogues, summary = read_dialogues(cfg.data, cfg.data.split or "train")
    typer.echo(f"data: {summary}", err=True)
    if not verbose:
        quiet_libraries(out / "log.txt")
    m = cfg.model
    chain = f"{m.retriever.name},{m.generator.name}" if m.retriever else m.generator.name
    typer.echo(f"building llm={m.llm.name} perceiver={m.perceiver.name} bridge={m.bridge.name} "
               f"generator={chain}", err=True)
    model = build(cfg, trust_remote_code=trust_remote_code)
    typer.echo(f"trainable groups: {', '.join(model.trainable_groups)}", err=True)
    result = run(model, progress=not quiet, resume=checkpoint, data=(dialogues, summary))
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if not result.global_zero:
        raise typer.Exit(128 + result.signal if result.signal else 0)
    typer.echo(f"data: {summary}")
    for row in result.history:
        typer.echo(f"step {row['step']:>4}  text_loss {row.get('text_loss', float('nan')):.4f}  "
                   f"image_loss {row.get('image_loss', float('nan')):.4f}")
    if result.photos_skipped:
        typer.echo(f"note: {result.photos_skipped} photo(s) could not be read during training; their samples "
                   "trained the text only (manifest_rank*.json)", err=True)
    if result.weights is not None:
        typer.echo(f"trainable weights: {result.weights}")
        typer.echo(f"checkpoint: {result.checkpoint}")
    if result.best is not None:
        typer.echo(f"best dev BLEU-2 {result.best_bleu2:.2f}: {result.best} "
                   "(what `export`, `chat` and `eval` read from the run folder)")
    if result.signal:
        name = signal.Signals(result.signal).name
        typer.echo(f"stopped by {name} at step {result.steps}: checkpoint {result.checkpoint}; "
                   "continue with --resume last", err=True)
        raise typer.Exit(128 + result.signal)
