"""Errors that need no model come before torch is imported, and the library is quiet:
real subprocesses, as users run them."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI and says, last on stderr, whether torch was imported.
CLI = ("import sys\nsys.argv = ['mmdialog', *sys.argv[1:]]\nfrom mmdialog.sdk.cli import main\n"
       "try:\n    main()\nfinally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")


def env(**extra: str) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path, **extra}


def timed(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)
    return out, time.perf_counter() - start


def test_errors_that_need_no_model_come_before_torch(tmp_path):
    """A wrong --data, an earlier run, an option out of range, a missing model, checkpoint or
    photo: one line, exit 2, torch never imported; each takes less than `import torch` alone
    (on 2 idle cores: under 2 s, where importing torch takes longer)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainable.pt").write_bytes(b"an earlier run")
    cases = {
        ("train", "--data", "no/such.jsonl"): "error: --data 'no/such.jsonl' does not exist",
        ("train", "--out-dir", str(tmp_path / "run")): f"error: {tmp_path / 'run'} holds an earlier run",
        ("chat", "--temperature", "-1"): "error: --temperature: Input should be greater than or equal to 0",
        ("chat", "no/such/model", "-m", "hi"): "error: model 'no/such/model' does not exist",
        ("chat", "tiny", "-m", "hi", "--image", "no/such.png"): "error: image 'no/such.png' does not exist",
        ("serve", "no/such/model"): "error: model 'no/such/model' does not exist",
        ("eval", "no/such.pt"): "error: checkpoint 'no/such.pt' does not exist",
        ("export", "no/such.pt", str(tmp_path / "out")): "error: checkpoint 'no/such.pt' does not exist",
    }
    _, torch_s = timed(["-c", "import torch"], tmp_path)
    for args, message in cases.items():
        out, seconds = timed(["-c", CLI, *args], tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and lines[-2].startswith(message), (args, out.stderr[-1500:])
        assert lines[-1] == "torch imported: False", args
        assert seconds < torch_s, (args, seconds, torch_s)
    assert not (tmp_path / "out").exists() and [p.name for p in (tmp_path / "run").iterdir()] == ["trainable.pt"]


BUILD = "import mmdialog\nmodel = mmdialog.build('tiny')\nprint('built', type(model).__name__)\n"


@pytest.mark.slow
def test_build_prints_nothing_but_verbose_shows_the_libraries(tmp_path):
    """`mmdialog.build` in Python: no torchao/bitsandbytes notices, no transformers warnings,
    no loading bars (about ten lines before); MMDIALOG_VERBOSE=1 lets them through."""
    quiet = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, env=env(),
                           cwd=tmp_path, timeout=900)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout == "built DialogueModel\n" and quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True,
                          env=env(MMDIALOG_VERBOSE="1"), cwd=tmp_path, timeout=900)
    assert loud.returncode == 0 and loud.stdout == "built DialogueModel\n"
    assert "Loading weights" in loud.stderr


def test_the_verbosity_switch_restores_what_it_silenced():
    """`quiet()` holds the libraries' loggers and warnings back inside the block only; a user's
    own logging of them is as it was after it."""
    import logging
    import warnings

    from mmdialog.core.verbosity import quiet, set_verbosity

    logger = logging.getLogger("transformers")
    mine = logging.StreamHandler()
    logger.addHandler(mine)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet():
                warnings.warn("held back")
                warnings.warn_explicit("mmdialog's own", UserWarning, "library.py", 1,
                                       module="mmdialog.plugins.generators.library")
                assert mine not in logger.handlers
            warnings.warn("shown")
            set_verbosity(True)
            with quiet():
                assert mine in logger.handlers
                warnings.warn("shown when verbose")
        assert [str(w.message) for w in caught] == ["mmdialog's own", "shown", "shown when verbose"]
        assert mine in logger.handlers
    finally:
        set_verbosity(None)
        logger.removeHandler(mine)
