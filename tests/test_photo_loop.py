"""The photo in the loop at inference: a reply stops at ``[/img]``, its photo is
produced and perceived as training lays it out, and the reply goes on after it;
the collator trains what the agent writes after its photo from both places
inference goes on from; replies stream.

The model: the embedded default (real SmolLM2 + LoRA, random-init Q-Former) with
the ``library`` generator, fine-tuned for a few full-batch steps on short
dialogues whose photos have pixels and whose sharer writes on after the photo.
"""
from pathlib import Path

import pytest
import skimage
import torch

from mmdialog import Dialogue, GeneratedImage, Photo, Turn
from mmdialog.core.collator import IGNORE
from mmdialog.core.data.images import to_tensor
from mmdialog.core.markup import placed
from mmdialog.core.reply import TextDeltas

DATA = Path(skimage.__file__).parent / "data"
CAT, COFFEE, HELLO = "show me your cat", "what are you drinking?", "hello there"
CAT_REPLY = "here she is [img] my tabby cat [/img] isn't she cute?"


def dialogues() -> list[Dialogue]:
    return [
        Dialogue("cat", [Turn("user", CAT), Turn("assistant", "here she is isn't she cute?", [
            Photo(description="my tabby cat", path=DATA / "chelsea.png", offset=len("here she is"))])]),
        Dialogue("coffee", [Turn("user", COFFEE), Turn("assistant", "an espresso, look so strong", [
            Photo(description="a cup of espresso coffee", path=DATA / "coffee.png", offset=len("an espresso, look"))])]),
        Dialogue("hi", [Turn("user", HELLO), Turn("assistant", "hi! how are you?")]),
    ]


@pytest.fixture(scope="module")
def model():
    from mmdialog import build

    m = build("tiny", generator="library")
    batch = m.collator([(d, "assistant") for d in dialogues()])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    m.train()
    for _ in range(16):
        loss = m(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


class Spy:
    """Records what the real ``llm.generate`` is given, and calls it."""

    def __init__(self, llm) -> None:
        self.llm, self.real, self.calls = llm, llm.generate, []

    def __enter__(self):
        def generate(emb, mask, **kw):
            self.calls.append((emb.clone(), mask.clone()))
            return self.real(emb, mask, **kw)

        self.llm.generate = generate
        return self

    def __exit__(self, *_):
        del self.llm.generate


def test_a_reply_goes_on_after_the_photo_it_perceived(model):
    with Spy(model.llm) as spy:
        reply = model.respond([Turn("user", CAT)], max_new_tokens=24, seed=0)
    assert reply.text == CAT_REPLY and reply.plain == "here she is isn't she cute?"
    assert reply.descriptions == ["my tabby cat"] and not reply.length_capped
    assert reply.photos[0].source == "retrieved" and reply.photos[0].file.name == "chelsea.png"
    # Two pieces: the prompt, then prompt + "here she is [img] my tabby cat [/img]" + the photo's
    # K perceiver embeddings, exactly the input training builds for that turn.
    assert len(spy.calls) == 2
    emb, mask = spy.calls[1]
    context = emb[0, mask[0].bool()]                                              # (T, D)
    turn = Turn("assistant", "here she is", [Photo(description="my tabby cat", path=reply.photos[0].file)])
    batch = model.collator([(Dialogue("x", [Turn("user", CAT), turn]), "assistant")])
    slots = batch.input_ids[0] == model.llm.image_token_id
    end = int(slots.nonzero().max()) + 1                                          # after the last slot
    assert context.shape[0] == end
    assert torch.allclose(context, model.input_embeddings(batch)[0, :end], atol=1e-5)
    # the photo the perceiver saw is the photo shared
    pixels = to_tensor(reply.photos[0].image, model.perceiver.image_size)
    assert torch.allclose(context[slots[:end]], model.perceiver(pixels[None])[0], atol=1e-5)


def test_streamed_deltas_make_the_text_and_photos_arrive_in_order(model):
    pieces: list = []
    reply = model.respond([Turn("user", CAT)], max_new_tokens=24, seed=0, stream=pieces.append)
    texts = [p for p in pieces if isinstance(p, str)]
    assert len(texts) > 5 and "".join(texts) == reply.text == CAT_REPLY   # token by token
    photo_at = next(i for i, p in enumerate(pieces) if isinstance(p, GeneratedImage))
    assert "".join(pieces[:photo_at]).endswith("[/img]")                     # the text up to it came first
    assert [p for p in pieces if isinstance(p, GeneratedImage)] == reply.photos


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_batch_of_rows_with_and_without_photos(model, num_beams):
    """Rows that stop at [/img] go on together; a row that ended is done. Beam search
    (no token-by-token streaming in transformers) delivers each piece's text at its end."""
    prompts = (CAT, HELLO, COFFEE) if num_beams == 1 else (HELLO, CAT)   # beam search: slow on CPU
    pieces: dict[int, list] = {i: [] for i in range(len(prompts))}
    replies = model.respond_batch([([Turn("user", q)], "assistant") for q in prompts], max_new_tokens=20,
                                  seed=0, num_beams=num_beams, stream=lambda i, p: pieces[i].append(p))
    cat, hello = replies[prompts.index(CAT)], replies[prompts.index(HELLO)]
    assert cat.text == CAT_REPLY and [p.file.name for p in cat.photos] == ["chelsea.png"]
    assert not hello.shared and not hello.photos and "[img]" not in hello.text and hello.text
    if num_beams == 1:
        coffee = replies[2]
        assert coffee.text == "an espresso, look [img] a cup of espresso coffee [/img] so strong"
        assert [p.file.name for p in coffee.photos] == ["coffee.png"]
    for i, r in enumerate(replies):
        assert "".join(p for p in pieces[i] if isinstance(p, str)) == r.text
        assert [p for p in pieces[i] if isinstance(p, GeneratedImage)] == r.photos


def test_without_drawing_the_reply_goes_on_after_the_description(model):
    """draw=False: no photo to perceive; the reply goes on from [/img] itself, which the
    collator now trains on the words after the photo (before, nothing was trained there)."""
    reply = model.respond([Turn("user", CAT)], max_new_tokens=24, seed=0, draw=False)
    assert reply.text == CAT_REPLY and reply.descriptions == ["my tabby cat"] and reply.photos == []


def test_photos_per_reply_are_bounded(model):
    none = model.respond([Turn("user", CAT)], max_new_tokens=20, seed=0, max_photos=0)
    assert not none.shared and "[img]" not in none.text and "[/img]" not in none.text
    capped = model.respond([Turn("user", CAT)], max_new_tokens=8, seed=0)
    assert capped.length_capped and len(model.llm.tokenizer(capped.text, add_special_tokens=False)["input_ids"]) <= 8


def test_a_session_keeps_the_photo_where_it_was_shared(model, tmp_path):
    pieces: list = []
    session = model.session(photos_dir=tmp_path, seed=0, max_new_tokens=24)
    reply = session.send(CAT, stream=pieces.append)
    assert "".join(p for p in pieces if isinstance(p, str)) == reply.text == CAT_REPLY
    turn = session.history[-1]
    assert turn.text == "here she is isn't she cute?" and turn.photos[0].path == reply.paths[0]
    assert turn.text_with_photos() == CAT_REPLY       # the next prompt lays the turn out as it was written


def test_placed_gives_the_plain_text_and_where_each_photo_was():
    assert placed("a b [img] x [/img] c d [img] y [/img]") == ("a b c d", [3, 7])
    assert placed("[img] x [/img]  hi") == ("hi", [0])
    assert placed("no photo") == ("no photo", [])


# -- training: what the agent writes after its photo ----------------------------------------------

def _after_photo(model, batch):
    """(position of the agent's [/img], position of its last slot, id of the first token after the slots)."""
    ids = batch.input_ids[0].tolist()
    close = ids.index(model.llm.img_close_id)
    last = close + model.perceiver.num_tokens
    assert ids[close + 1:last + 1] == [model.llm.image_token_id] * model.perceiver.num_tokens
    return close, last, ids[last + 1]


def test_the_words_after_a_shared_photo_are_trained_from_the_photo_and_from_img_close(model):
    batch = model.collator([(dialogues()[0], "assistant")])
    close, last, after = _after_photo(model, batch)
    assert model.llm.tokenizer.decode([after]) == " isn"
    targets = batch.labels[0, 1:]                      # position t predicts labels[t + 1]
    assert targets[last] == after                      # inference goes on here after perceiving the photo
    assert targets[close] == after                     # and here when there is no photo (draw=False)
    assert (targets[close + 1:last] == IGNORE).all()   # no other slot predicts anything


def test_a_photo_that_cannot_be_read_is_not_predicted_from(model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    d = dialogues()[0]
    d.turns[1].photos[0].path = broken
    batch = model.collator([(d, "assistant")])
    close, last, after = _after_photo(model, batch)
    assert batch.stats["photos_unreadable"] >= 1 and batch.photo_slots.numel() == 0
    assert not batch.attention_mask[0, close + 1:last + 1].any()
    targets = batch.labels[0, 1:]
    assert targets[close] == after and targets[last] == IGNORE    # not from a hidden slot


# -- incremental text ----------------------------------------------------------------------------

TEXT = "Café crème? Ça va 😺 — 東京の猫 «ok» naïve  end"


def _streamed(tokenizer, ids: list[int]) -> list[str]:
    deltas = TextDeltas(lambda x: tokenizer.decode(x, skip_special_tokens=True))
    out = [deltas.update(ids[:n]) for n in range(1, len(ids) + 1)]
    return out + [deltas.update(ids, final=True)]


def _check(tokenizer, ids: list[int]) -> list[str]:
    out = _streamed(tokenizer, ids)
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True).strip()
    return out


def test_text_deltas_never_split_a_character_smollm2(model):
    tok = model.llm.tokenizer
    ids = tok(" " + TEXT + " ", add_special_tokens=False)["input_ids"]
    out = _check(tok, ids)
    assert not any("\ufffd" in d for d in out) and len([d for d in out if d]) > 10
    assert _check(tok, ids[:-3])                       # ends inside a character: given at the end


def test_text_deltas_never_split_a_character_llama2(tmp_path):
    from llama2 import tokenizer_folder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder(tmp_path))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)   # byte-fallback pieces
    out = _check(tok, ids)
    assert not any("\ufffd" in d for d in out)
    torch.manual_seed(0)
    _check(tok, torch.randint(3, 32000, (300,)).tolist())    # any sequence, bytes and pieces mixed
