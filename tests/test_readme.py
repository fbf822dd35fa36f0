"""The README's Python blocks run as written, each in a fresh interpreter.

They run in a folder laid out as the README's five-minute section leaves it:
``my-model`` (an exported model that shares photos, as `make demo` + `mmdialog
export` give) and a ``cat.jpg``. A block preceded by ``<!-- not run: why -->``
is skipped (none is today)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sharing_model import exported_dir

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- not run: [^>]*-->\s*)?```python\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[int, str, bool]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(2), bool(m.group(1))) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks():
    assert len(blocks()) >= 3 and not any(skipped for _, _, skipped in blocks())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cat_photo):
    out = tmp_path_factory.mktemp("readme")
    shutil.copytree(exported_dir(), out / "my-model")
    Image.open(cat_photo).convert("RGB").save(out / "cat.jpg")
    return out


@pytest.mark.parametrize("line,code,skipped", blocks(), ids=[f"README.md:{n}" for n, _, _ in blocks()])
def test_readme_block_runs(line, code, skipped, workdir):
    if skipped:
        pytest.skip("marked not run")
    run = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, f"README.md:{line} failed:\n{run.stderr[-3000:]}"
