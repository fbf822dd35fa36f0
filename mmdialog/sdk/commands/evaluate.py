"""``mmdialog eval``: the paper's per-turn evaluation of trained checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import (
    ALLOW_UNVERIFIED,
    CONFIG,
    SET,
    TRUST_REMOTE_CODE,
    config_from_cli,
    progress_line,
)


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
