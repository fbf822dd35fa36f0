"""``mmdialog plugins`` and ``mmdialog config show``: what is installed, what a config resolves to."""
from __future__ import annotations

import json
from typing import Optional

import typer

from mmdialog.sdk.commands.common import CONFIG, REFERENCE_RECIPE, SET, config_from_cli

config_app = typer.Typer(help="Show and check configs.", no_args_is_help=True)


def plugins(as_json: bool = typer.Option(False, "--json")) -> None:
    """List every plugin found (built-in and installed packages): components, dataset and prompt formats."""
    from mmdialog.core.registry import default_registry

    reg = default_registry()
    rows = [{"kind": p.kind, "name": p.name, "module": p.module, "description": p.description}
            for p in reg.all()]
    rows += [{"kind": "dataset", "name": name, "module": fmt.parse.__module__, "description": fmt.description}
             for name in reg.dataset_formats() for fmt in [reg.dataset_format(name)]]
    rows += [{"kind": "prompt", "name": name, "module": cls.__module__, "description": cls.description}
             for name in reg.prompt_formats() for cls in [reg.prompt_format(name)]]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['kind']:<10} {r['name']:<12} {r['description']}  [{r['module']}]")


@config_app.command("show")
def config_show(config: str = CONFIG, llm: Optional[str] = None, perceiver: Optional[str] = None,
                bridge: Optional[str] = None, generator: Optional[str] = None, sets: list[str] = SET,
                reference_recipe: bool = REFERENCE_RECIPE) -> None:
    """Print the fully resolved, validated config as YAML (with --reference-recipe: as `train` runs it)."""
    from mmdialog.core.config import dump_config

    typer.echo(dump_config(config_from_cli(config, llm, perceiver, bridge, generator, sets, reference_recipe)))
