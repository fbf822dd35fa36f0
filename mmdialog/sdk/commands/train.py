"""``mmdialog train`` and ``mmdialog eval``."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import typer

from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import (
    ALLOW_UNVERIFIED,
    CONFIG,
    REFERENCE_RECIPE,
    SET,
    TRUST_REMOTE_CODE,
    config_from_cli,
    progress_line,
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


def evaluate(
    checkpoints: list[str] = typer.Argument(None, help="trainable.pt / last.ckpt files; none: the config's base model"),
    config: str = CONFIG,
    perceiver: Optional[str] = typer.Option(None, help="perceiver plugin (base model only)"),
    bridge: Optional[str] = typer.Option(None, help="bridge plugin (base model only)"),
    data: Optional[str] = typer.Option(None, help="dataset path (default: the config's)"),
    split: str = typer.Option("test", help="split to evaluate"),
    out: str = typer.Option("runs/eval", help="folder for results.json, results.md, replies, photos"),
    name: list[str] = typer.Option([], help="row name per checkpoint (default: file name)"),
    limit: Optional[int] = typer.Option(None, help="evaluate the first N turns only"),
    batch_size: int = typer.Option(8),
    weights: str = typer.Option("best", help="from a run folder: best (best dev BLEU-2, else the final weights) "
                                             "or last (the weights training ended with, as the reference scores)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="reply length limit (default 48; 30 with "
                                                            "--reference-recipe)"),
    steps: Optional[int] = typer.Option(None, help="diffusion steps per photo (default: the generator's; 20 with "
                                                   "--reference-recipe)"),
    reference_recipe: bool = typer.Option(False, "--reference-recipe", help="the reference's decoding and scoring: one "
                                          "2-beam search per turn across [/img], 30 new tokens, 20 diffusion steps "
                                          "at guidance 7.5, its text clean-up"),
    no_images: bool = typer.Option(False, help="decide and describe, but draw no photos"),
    inception_weights: Optional[str] = typer.Option(None, help="local Inception-v3 weights for comparable FID/IS"),
    clip_model: Optional[str] = typer.Option(None, help="local CLIP folder: adds the CLIP score of shared photos"),
    sets: list[str] = SET,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    allow_unverified: bool = ALLOW_UNVERIFIED,
) -> None:
    """Per-turn evaluation (gold context, both speakers): BLEU-1/2, ROUGE-L, intent F1, FID/KID/IS."""
    precheck.checkpoints(checkpoints or [])  # before torch: a typo should not cost seconds
    if data:
        precheck.data(data)
    from mmdialog.core.assembler import build, load
    from mmdialog.core.checkpoint import find_checkpoint
    from mmdialog.core.config import recipe
    from mmdialog.core.data.source import read_dialogues
    from mmdialog.core.errors import MMDialogError
    from mmdialog.core.evaluation import evaluate as run_eval
    from mmdialog.core.evaluation import write_results
    from mmdialog.core.evaluation.metrics.fidelity import load_inception_weights, require_torch_fidelity
    from mmdialog.core.export import MANIFEST

    if weights not in ("best", "last"):
        raise MMDialogError(f"--weights must be best or last, not {weights!r}")
    if inception_weights and not no_images:  # before minutes of generation, not after
        require_torch_fidelity()
        load_inception_weights(inception_weights)
    options = {**(recipe("reference")["decoding"] if reference_recipe else {"max_new_tokens": 48}),
               **{k: v for k, v in {"max_new_tokens": max_new_tokens, "num_inference_steps": steps}.items()
                  if v is not None}}

    rows = []
    for i, ckpt in enumerate(checkpoints or [None]):
        if ckpt is None:
            model = build(config_from_cli(config, None, perceiver, bridge, None, sets),
                          trust_remote_code=trust_remote_code)
            label = f"{model.config.model.perceiver.name}+{model.config.model.bridge.name} (untrained)"
        else:
            if Path(ckpt).is_dir() and not (Path(ckpt) / MANIFEST).exists():  # a run folder
                ckpt = str(find_checkpoint(ckpt, weights))  # type: ignore[arg-type]
            model = load(ckpt, trust_remote_code=trust_remote_code, allow_unverified=allow_unverified)
            label = os.path.basename(os.path.dirname(os.path.abspath(ckpt))) or ckpt
        label = name[i] if i < len(name) else label
        cfg = model.config
        if data:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data})})
        dialogues, summary = read_dialogues(cfg.data, split)
        typer.echo(f"{label}: {summary}", err=True)
        rows.append(run_eval(model, dialogues, out, name=label, dataset=f"{cfg.data.path}:{split}",
                             limit=limit, batch_size=batch_size, draw=not no_images,
                             inception_weights=inception_weights, clip_model=clip_model,
                             progress=progress_line(f"eval {label}"), **options, seed=cfg.model.seed,
                             scoring="reference" if reference_recipe else "ours"))
    _, md = write_results(rows, out)
    typer.echo(md.read_text())
    typer.echo(f"results: {os.path.join(out, 'results.json')}")
