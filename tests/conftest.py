import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
