"""The ``mmdialog`` command: train, plugins, config, data.

User errors (bad config, unknown plugin, missing checkpoint, bad data) print
one line and exit with status 2; bugs keep their traceback.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
import yaml

from mmdialog.core.data.cli import data_app
from mmdialog.core.errors import MMDialogError
from mmdialog.sdk.commands import register as register_use_commands

app = typer.Typer(help="Photo-sharing multimodal dialogue: train, inspect, run.",
                  pretty_exceptions_enable=False, no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Show and check configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
register_use_commands(app)  # chat, serve, export


def _parse_sets(sets: list[str]) -> dict:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MMDialogError(f"--set expects key=value (e.g. train.lr=1e-4), got '{item}'")
        out[key] = yaml.safe_load(value)
    return out


def _config(config: str, llm, perceiver, bridge, generator, sets: list[str], **fields):
    from mmdialog.core.config import load_config

    overrides = {k: v for k, v in fields.items() if v is not None}
    overrides.update(_parse_sets(sets))
    return load_config(config, overrides, llm=llm, perceiver=perceiver, bridge=bridge, generator=generator)


CONFIG = typer.Option("tiny", "--config", "-c", help="preset name (tiny, paper) or YAML file")
SET = typer.Option([], "--set", help="override any field: --set model.bridge.tau=0.5 (repeatable)")


@app.command()
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
    sets: list[str] = SET,
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train a model (the end-to-end one by default) and print its losses."""
    cfg = _config(config, llm, perceiver, bridge, generator, sets, **{
        "data.path": data, "train.max_steps": max_steps, "data.batch_size": batch_size, "train.lr": lr,
        "train.accumulate": accumulate, "train.precision": precision,
        "train.devices": int(devices) if devices and devices.isdigit() else devices,
        "train.num_nodes": num_nodes, "train.strategy": strategy, "train.out_dir": out_dir,
        **({"model.llm.gradient_checkpointing": True} if gradient_checkpointing else {})})
    from mmdialog.core.assembler import build
    from mmdialog.core.config import load_config
    from mmdialog.core.training import train as run

    if gradient_checkpointing:  # the UNet: the generator's own, or its fallback's (library,sd)
        key = "model.generator.fallback" if cfg.model.generator.options.get("fallback") else "model.generator"
        cfg = load_config(cfg, {f"{key}.gradient_checkpointing": True})

    m = cfg.model
    typer.echo(f"building llm={m.llm.name} perceiver={m.perceiver.name} bridge={m.bridge.name} "
               f"generator={m.generator.name}", err=True)
    model = build(cfg)
    typer.echo(f"trainable groups: {', '.join(model.trainable_groups)}", err=True)
    result = run(model, progress=not quiet, resume=True if resume == "last" else resume)
    if not result["global_zero"]:
        return
    typer.echo(f"data: {result['data']}")
    for row in result["history"]:
        typer.echo(f"step {row['step']:>4}  text_loss {row.get('text_loss', float('nan')):.4f}  "
                   f"image_loss {row.get('image_loss', float('nan')):.4f}")
    if result["interrupted"]:
        typer.echo(f"interrupted at step {result['steps']}; continue with --resume last", err=True)
    if "weights" in result:
        typer.echo(f"trainable weights: {result['weights']}")
        typer.echo(f"checkpoint: {result['checkpoint']}")


@app.command("eval")
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
    max_new_tokens: int = typer.Option(48),
    steps: Optional[int] = typer.Option(None, help="diffusion steps per photo"),
    no_images: bool = typer.Option(False, help="decide and describe, but draw no photos"),
    inception_weights: Optional[str] = typer.Option(None, help="local Inception-v3 weights for comparable FID/IS"),
    clip_model: Optional[str] = typer.Option(None, help="local CLIP folder: adds the CLIP score of shared photos"),
    sets: list[str] = SET,
) -> None:
    """Per-turn evaluation (gold context, both speakers): BLEU-1/2, ROUGE-L, intent F1, FID/IS."""
    from mmdialog.core.assembler import build
    from mmdialog.core.evaluation import evaluate as run_eval
    from mmdialog.core.evaluation import write_results
    from mmdialog.core.training import read_dialogues
    from mmdialog.sdk.export import load

    rows = []
    for i, ckpt in enumerate(checkpoints or [None]):
        if ckpt is None:
            model = build(_config(config, None, perceiver, bridge, None, sets))
            label = f"{model.config.model.perceiver.name}+{model.config.model.bridge.name} (untrained)"
        else:
            model = load(ckpt)
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
                             max_new_tokens=max_new_tokens,
                             num_inference_steps=steps, seed=cfg.model.seed))
    _, md = write_results(rows, out)
    typer.echo(md.read_text())
    typer.echo(f"results: {os.path.join(out, 'results.json')}")


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json")) -> None:
    """List every plugin found (built-in and installed packages)."""
    from mmdialog.core.registry import default_registry

    rows = [{"kind": p.kind, "name": p.name, "module": p.factory.__module__, "description": p.description}
            for p in default_registry().all()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['kind']:<10} {r['name']:<12} {r['description']}  [{r['module']}]")


@config_app.command("show")
def config_show(config: str = CONFIG, llm: Optional[str] = None, perceiver: Optional[str] = None,
                bridge: Optional[str] = None, generator: Optional[str] = None, sets: list[str] = SET) -> None:
    """Print the fully resolved, validated config as YAML."""
    from mmdialog.core.config import dump_config

    typer.echo(dump_config(_config(config, llm, perceiver, bridge, generator, sets)))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except MMDialogError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
