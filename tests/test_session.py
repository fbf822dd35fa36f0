"""Python API: sessions keep history, take photos as files or PIL images, and cut old turns."""
import warnings

import pytest
from PIL import Image
from sharing_model import CAT_PROMPT, HELLO_PROMPT, sharing_model

from mmdialog import MMDialogError, Session, Turn
from mmdialog.core.markup import strip as strip_markup
from mmdialog.core.session import HistoryTruncatedWarning, ImageError


def test_history_is_kept_and_shared_photos_come_back_as_files(tmp_path):
    model = sharing_model()
    session = model.session(photos_dir=tmp_path, seed=0, max_new_tokens=20)
    assert isinstance(session, Session)
    reply = session.send(CAT_PROMPT)
    assert reply.shared and reply.plain == "here she is" and "[img] my tabby cat [/img]" in reply.text
    assert reply.paths[0].parent == tmp_path and Image.open(reply.paths[0]).size == reply.images[0].size
    assert [(t.speaker, t.text) for t in session.history] == [("user", CAT_PROMPT), ("assistant", "here she is")]
    assert session.history[1].photos[0].path == reply.paths[0]
    # the next prompt perceives the shared photo through the Q-Former slots
    batch = model.collator.prompt(session.history + [Turn("user", HELLO_PROMPT)], "assistant")
    assert batch.photo_slots.shape[0] == 1
    hello = session.send(HELLO_PROMPT)
    assert len(session.history) == 4 and not hello.shared and hello.paths == []
    session.reset()
    assert session.history == []


def test_user_photos_as_paths_or_pil_and_bad_ones(tmp_path, cat_photo):
    session = sharing_model().session(photos_dir=tmp_path, seed=0, max_new_tokens=8)
    reply = session.send("look at this", images=[cat_photo, Image.open(cat_photo).convert("RGB")])
    user = session.history[0]
    assert user.photos[0].path == cat_photo and user.photos[1].path.parent == tmp_path
    assert reply.text
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageError, match="broken.png"):
        session.send("and this", images=[tmp_path / "broken.png"])
    with pytest.raises(ImageError, match="does not exist"):
        session.send("and this", images=[tmp_path / "missing.jpg"])
    with pytest.raises(ImageError, match="file paths or PIL images"):
        session.send("and this", images=[b"bytes"])
    assert len(session.history) == 2        # failed sends leave no trace


def test_generation_options_are_checked_and_used():
    model = sharing_model()
    with pytest.raises(MMDialogError, match="temperature"):
        model.session(temperature=-1)
    with pytest.raises(MMDialogError, match="unknown generation option 'beams'"):
        model.session(beams=2)
    s = model.session(max_new_tokens=6, temperature=0.9, seed=3)
    assert s.send(HELLO_PROMPT).text == model.session(max_new_tokens=6, temperature=0.9, seed=3).send(HELLO_PROMPT).text
    assert s.send(HELLO_PROMPT, num_beams=2, max_new_tokens=4).text


def test_long_history_is_cut_from_the_oldest_turn_with_one_warning():
    model = sharing_model()
    filler = "tell me more about your day, " * 12
    history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i}: {filler}") for i in range(12)]
    session = model.session(history=history, max_new_tokens=8, seed=0)
    assert session.prompt_tokens() > model.config.model.max_length
    with pytest.warns(HistoryTruncatedWarning, match="dropping the oldest turns"):
        reply = session.send(HELLO_PROMPT)
    assert reply.truncated and session.dropped_turns > 0 and "dropping the oldest turns" in reply.notice
    assert session.history[0].text != history[0].text and session.history[-2].text == HELLO_PROMPT
    assert session.prompt_tokens() <= model.config.model.max_length
    session.history[:0] = history[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryTruncatedWarning)     # said once per session
        again = session.send(HELLO_PROMPT)
    assert again.truncated and again.notice is None
    with pytest.raises(MMDialogError, match="message too long"):
        session.send("word " * 2000)


def test_strip_markup():
    assert strip_markup("here [img] a cat [/img] and [img] half") == "here and"
