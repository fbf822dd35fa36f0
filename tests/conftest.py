import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
#: Written by Python and the tools themselves, not by a test.
_TOOL_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def repository_files(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """Every file of the checkout (ignored ones too: runs/, lightning_logs/) → (size, mtime)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _TOOL_DIRS and not d.endswith(".egg-info")]
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session", autouse=True)
def _tests_never_write_into_the_repository():
    """Tests write under tmp dirs only: a user's `make demo` run (runs/tiny) and the sources stay
    as they were (a test that trained into runs/tiny failed beside the demo's run)."""
    before = repository_files()
    yield
    after = repository_files()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"the tests wrote into the repository: {changed[:10]}"


@pytest.fixture(scope="session")
def tiny():
    """The embedded default, built once (real SmolLM2 + real CLIP tokenizer)."""
    from mmdialog import build

    return build("tiny")


@pytest.fixture(scope="session")
def cat_photo() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / "chelsea.png"


def _cat_dialogue(photo: Path):
    from mmdialog import Dialogue, Photo, Turn

    return Dialogue("cat", [
        Turn("0", "hi there, how are you?"),
        Turn("1", "good! I just adopted a cat"),
        Turn("0", "oh show me"),
        Turn("1", "here she is", [Photo(description="a tabby cat lying on a wooden floor", path=photo)]),
        Turn("0", "so cute!"),
    ])


@pytest.fixture()
def cat_dialogue(cat_photo):
    return _cat_dialogue(cat_photo)


@pytest.fixture(scope="session")
def cat_dialogue_session(cat_photo):
    """The same dialogue for module-scoped fixtures (which must not change it)."""
    return _cat_dialogue(cat_photo)


@pytest.fixture(scope="module", autouse=True)
def _give_memory_back_after_each_module():
    """One process runs every test: what a module built (models, servers' threads) is freed when
    it ends, and the allocator's freed pages go back to the OS, so the suite's peak is the
    largest module's, not the sum of all (glibc keeps freed heap pages otherwise)."""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
