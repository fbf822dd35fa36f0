"""What several commands share: the config options, the generation options
(checked by ``GenerationOptions``, their one definition) and quiet loading.
Nothing heavy is imported here: ``mmdialog --help`` stays fast."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from mmdialog.core.errors import MMDialogError

CONFIG = typer.Option("tiny", "--config", "-c", help="preset name (tiny, paper) or YAML file")
SET = typer.Option([], "--set", help="override any field: --set model.bridge.tau=0.5 (repeatable)")
MODEL_ARG = typer.Argument("tiny", help="an exported folder, a training checkpoint (trainable.pt, .ckpt, run "
                                        "folder), a preset (tiny, paper) or a YAML config")
GENERATOR = typer.Option(None, "--generator", "-g",
                         help="swap the generator: library (share real photos), library,sd (retrieve, else "
                              "draw), sd, …")
LIBRARY = typer.Option(None, "--library", help="photo folder for the library generator (captions.json or "
                                               "file names); default: the embedded photos")
TRUST_REMOTE_CODE = typer.Option(
    False, "--trust-remote-code", help="let the LLM's base checkpoint run its own Python code (a custom class in "
                                       "its auto_map, a Hub attention kernel); only for a source you trust. A "
                                       "config or model folder can never turn this on")
ALLOW_UNVERIFIED = typer.Option(
    False, "--allow-unverified", help="load an exported folder whose manifest predates SHA-256 digests of every "
                                      "file (format 1 or 2); only one you trust (`mmdialog export --upgrade "
                                      "FOLDER` re-hashes it once)")
#: Flags of the commands that load a model and generate: GenerationOptions field → (type, option).
GENERATION_FLAGS = {
    "max_new_tokens": (int, typer.Option(64, "--max-new-tokens", help="reply length limit (tokens)")),
    "temperature": (float, typer.Option(0.0, "--temperature", help="0 = greedy")),
    "num_beams": (int, typer.Option(1, "--beams", help="beam search width")),
    "num_inference_steps": (Optional[int], typer.Option(None, "--steps", help="diffusion steps "
                                                                               "(default: the generator's)")),
    "guidance_scale": (Optional[float], typer.Option(None, "--guidance", help="classifier-free guidance scale")),
    "seed": (Optional[int], typer.Option(None, "--seed", help="fix sampling and diffusion noise")),
    "max_photos": (int, typer.Option(4, "--max-photos", help="photos per reply (0: never share)")),
}


@dataclass
class ModelUse:
    """What the model flags say: the generator chain to swap in (``load``'s
    ``generator`` and ``retriever``; empty: the model's own) and the generation
    options, parsed once (``GenerationOptions``)."""

    chain: dict[str, Any]
    generation: Any  # GenerationOptions: torch is imported only when a command runs
    trust_remote_code: bool = False
    allow_unverified: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The generation options as keywords (``create_app``'s)."""
        return self.generation.model_dump()


def model_flags(command):
    """Add ``--generator``, ``--library``, the trust flags and the generation flags to
    ``command``, which receives them checked, as ``use: ModelUse`` (a bad value is one line)."""
    flags = {"generator": (Optional[str], GENERATOR), "library": (Optional[str], LIBRARY),
             "trust_remote_code": (bool, TRUST_REMOTE_CODE), "allow_unverified": (bool, ALLOW_UNVERIFIED),
             **GENERATION_FLAGS}

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        from mmdialog.core.reply import GenerationOptions  # torch: only when the command runs

        given = {name: kwargs.pop(name) for name in flags}
        chain = generator_spec(given.pop("generator"), given.pop("library"))
        trust = {"trust_remote_code": given.pop("trust_remote_code"), "allow_unverified": given.pop("allow_unverified")}
        try:
            options = GenerationOptions.parse(given)
        except MMDialogError as e:  # name the flag, not the field
            for name, (_, option) in GENERATION_FLAGS.items():
                e = MMDialogError(str(e).replace(f"generation option {name}", option.param_decls[0]))
            raise e from None
        return command(**kwargs, use=ModelUse(chain, options, **trust))

    params = [p for p in inspect.signature(command).parameters.values() if p.name != "use"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
               for name, (kind, option) in flags.items()]
    wrapper.__signature__ = inspect.Signature(params)
    return wrapper


def parse_sets(sets: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MMDialogError(f"--set expects key=value (e.g. train.lr=1e-4), got '{item}'")
        out[key] = yaml.safe_load(value)
    return out


REFERENCE_RECIPE = typer.Option(False, "--reference-recipe",
                                help="the authors' training recipe over the config: their prompt format and "
                                     "DVTM, length-sorted batches, dev BLEU-2 every epoch, clipping 400, … "
                                     "(README: 'The reference recipe'); other flags still override it")


def config_from_cli(config: str, llm, perceiver, bridge, generator, sets: list[str],
                    reference_recipe: bool = False, plugins: bool = True, **fields: Any):
    """The validated config of a command: the preset or YAML, the reference recipe
    if asked, the plugin flags, the command's own flags (dotted keys) and ``--set``."""
    overrides = {k: v for k, v in fields.items() if v is not None}
    overrides.update(parse_sets(sets))
    from mmdialog.core.config import load_config

    return load_config(config, overrides, reference_recipe=reference_recipe, plugins=plugins,
                       llm=llm, perceiver=perceiver, bridge=bridge, generator=generator)


def generator_spec(generator: str | None, library: str | None = None) -> dict[str, Any]:
    """``--generator`` (``sd``, ``library``, ``library,sd``) with ``--library FOLDER`` as the
    library's folder, as ``load``'s ``generator`` and ``retriever``: a chain with a folder is
    ``{generator: {name: sd}, retriever: {name: library, folder}}`` (the chain's one shape)."""
    from mmdialog.core.config import generator_chain
    from mmdialog.core.errors import ConfigError

    if generator is None and library is None:
        return {}
    try:
        retriever, drawer = generator_chain(generator or "library")
    except ConfigError as e:
        raise MMDialogError(f"--{e}") from None
    if library is None:
        return {"generator": generator}
    if "library" not in (retriever, drawer):
        raise MMDialogError("--library needs the library generator: --generator library[,sd]")
    folder = Path(library).expanduser()
    if not folder.is_dir():
        raise MMDialogError(f"--library '{library}' is not a folder of photos")
    spec = {"name": "library", "folder": str(folder.resolve())}
    # A dict generator keeps the retriever slot; the library's options from the config stay under the folder.
    return {"generator": {"name": drawer}, "retriever": spec} if retriever else {"generator": spec}


def quiet(log_file: Path | None = None) -> None:
    """Only mmdialog's own lines on the terminal: library warnings, notices and
    loading bars go to ``log_file`` (the run's log) or nowhere (``--verbose`` skips this)."""
    from mmdialog.core.verbosity import route

    route(log_file)


def progress_line(label: str):
    """``progress(done, total)`` for long loops: one line on stderr with the
    elapsed time and an ETA, rewritten in place on a terminal, else printed at
    most every 30 s (logs stay short)."""
    import sys
    import time

    start, last = time.monotonic(), [0.0]
    tty = sys.stderr.isatty()

    def clock(s: float) -> str:
        return f"{int(s // 60)}m{int(s % 60):02d}s"

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not tty and done not in (0, total) and now - last[0] < 30:
            return
        last[0] = now
        elapsed = now - start
        eta = f", ETA {clock(elapsed / done * (total - done))}" if 0 < done < total else ""
        begin, end = ("\r" if tty else ""), ("\n" if done == total or not tty else "")
        sys.stderr.write(f"{begin}{label}: {done}/{total} turns, {clock(elapsed)}{eta}  {end}")
        sys.stderr.flush()

    return progress


def load_model(model: str, use: ModelUse):
    """The model a command uses, loaded quietly with the chain and trust flags it was given."""
    from mmdialog.core.assembler import load

    quiet()
    typer.echo(f"loading {model} …", err=True)
    return load(model, **use.chain, trust_remote_code=use.trust_remote_code, allow_unverified=use.allow_unverified)
