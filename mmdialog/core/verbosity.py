"""What the libraries under mmdialog may print: by default, nothing.

Building a model imports peft, diffusers and transformers, which log notices
at import (torchao and bitsandbytes kernels not built for this machine, torch's
pytree deprecations of their registrations), show loading bars and warn about
their own deprecations: about ten lines that say nothing about the user's
model. ``quiet()`` holds them back while mmdialog builds, loads or prepares a
model; ``MMDIALOG_VERBOSE=1`` or ``mmdialog.set_verbosity(True)`` lets them
through. The CLI routes them to the run's log instead (``route``).

Nothing heavy is imported here (the CLI's fail-fast checks import this module).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

#: The loggers of the libraries mmdialog builds on (``py.warnings``: ``warnings.warn`` once captured).
LIBRARY_LOGGERS = ("transformers", "diffusers", "lightning", "lightning.pytorch", "lightning.fabric",
                   "pytorch_lightning", "py.warnings", "torchao", "bitsandbytes", "kernels", "torch.utils._pytree")

_state: dict[str, Any] = {"verbose": None, "routed": False, "depth": 0}
_lock = threading.RLock()
F = TypeVar("F", bound=Callable[..., Any])


def set_verbosity(verbose: bool | None) -> None:
    """True: the libraries' warnings, notices and progress bars show (as ``MMDIALOG_VERBOSE=1``);
    None: ``MMDIALOG_VERBOSE`` decides again."""
    _state["verbose"] = None if verbose is None else bool(verbose)


def is_verbose() -> bool:
    if _state["verbose"] is not None:
        return _state["verbose"]
    return os.environ.get("MMDIALOG_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_logging() -> list[Any]:
    """transformers' and diffusers' logging modules (they own their bars), their stderr
    handlers installed now, so that ``quiet`` swaps them out rather than seeing them added later."""
    out = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        with contextlib.suppress(ImportError):
            module = __import__(name, fromlist=["_"])
            module.get_logger()
            out.append(module)
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back the libraries' log records, warnings and progress bars inside the block
    (unless verbose, or the CLI routes them to a log file); restore everything after."""
    with _lock:
        if is_verbose() or _state["routed"] or _state["depth"]:
            _state["depth"] += 1
            try:
                yield
            finally:
                _state["depth"] -= 1
            return
        _state["depth"] += 1
        saved = [(lg, lg.handlers, lg.propagate) for lg in map(logging.getLogger, LIBRARY_LOGGERS)]
        bars = [(m, m.is_progress_bar_enabled()) for m in _hf_logging() if hasattr(m, "is_progress_bar_enabled")]
        try:
            for lg, _, _ in saved:
                lg.handlers, lg.propagate = [logging.NullHandler()], False
            for m, _ in bars:
                m.disable_progress_bar()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warnings.filterwarnings("default", module=r"mmdialog(\.|$)")  # ours still say what to fix
                yield
        finally:
            for lg, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate
            for m, enabled in bars:
                if enabled:
                    m.enable_progress_bar()
            _state["depth"] -= 1


def quietly(fn: F) -> F:
    """``fn`` runs inside ``quiet()``."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def route(log_file: Path | None = None) -> None:
    """For the whole process (the CLI): the libraries' records and warnings go to
    ``log_file`` (or nowhere), their progress bars are off; ``quiet()`` then has nothing to do."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger
    handler: logging.Handler = logging.NullHandler()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    _state["routed"] = True
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        # diffusers adds its own stderr handler on first use (it warns when torchao is installed)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_default_handler()
    except ImportError:
        pass


@contextlib.contextmanager
def no_foreign_bars() -> Iterator[None]:
    """Progress bars a library draws on stderr with no switch of its own (transformers'
    GGUF conversion uses tqdm directly): hidden unless verbose."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stderr(open(os.devnull, "w")) as sink:  # noqa: SIM115 -- closed below
        try:
            yield
        finally:
            sink.close()
