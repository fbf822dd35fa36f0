"""DialogueModel inference and batching on the embedded default."""
import torch

from mmdialog import Photo, Reply, Turn
from mmdialog.core.collator import IGNORE
from mmdialog.core.markup import spans as description_spans


def test_respond_writes_a_reply_and_perceives_history_photos(tiny, cat_photo):
    history = [Turn("user", "look at my cat", [Photo(description="a cat", path=cat_photo)]),
               Turn("assistant", "she is lovely"), Turn("user", "what colour is she?")]
    batch = tiny.collator.prompt(history, "assistant")
    assert batch.photo_slots.tolist() == [[0, batch.photo_slots[0, 1].item()]]
    assert (batch.input_ids[0] == tiny.llm.image_token_id).sum() == tiny.perceiver.num_tokens
    reply = tiny.respond(history, max_new_tokens=12, seed=0)
    assert isinstance(reply, Reply) and reply.text and isinstance(reply.shared, bool)
    assert reply.shared == bool(reply.images)
    again = tiny.respond(history, max_new_tokens=12, seed=0)
    assert again.text == reply.text


def test_description_spans():
    o, c = 100, 101
    assert description_spans([1, o, 5, 6, c, 2, o, 7, c], o, c) == [[5, 6], [7]]
    assert description_spans([1, o, 5, 6], o, c) == [[5, 6]]   # cut off by max tokens
    assert description_spans([1, c, 2], o, c) == []


def test_batch_marks_descriptions_labels_and_missing_photos(tiny, cat_dialogue):
    cat_dialogue.turns[1].photos.append(Photo(description="my old cat", path=None))  # photo file missing
    b = tiny.collator([(cat_dialogue, "1"), (cat_dialogue, "0")])
    assert b.desc_index.tolist() == [0, 0]           # only the agent's own photos are described
    assert b.desc_has_image.tolist() == [False, True] and b.stats["photos_missing"] == 1
    tok = tiny.llm.tokenizer
    spans = [tok.decode(b.input_ids[0, s:s + n]) for s, n in zip(b.desc_start.tolist(), b.desc_len.tolist())]
    assert spans == [" my old cat ", " a tabby cat lying on a wooden floor "]
    # labels cover the agent's turns only, never the image placeholders; the first slot's
    # label is the token after the photo (predicted from [/img] as well, test_photo_loop.py)
    lab = b.labels[0]
    slots = (b.input_ids[0] == tiny.llm.image_token_id).nonzero()[:, 0]
    assert (lab[slots[1:]] == IGNORE).all() and lab[slots[0]] == lab[slots[-1] + 1] != IGNORE
    trained = tok.decode(b.input_ids[0][lab != IGNORE])
    assert "good! I just adopted a cat" in trained and "so cute" not in trained
    # speaker 0 sees speaker 1's photo as K perceived embeddings, not as text
    assert b.photo_slots[:, 0].tolist() == [0, 1]
    assert "tabby" not in tok.decode(b.input_ids[1])
    out = tiny(b)
    assert torch.isfinite(out["loss"]) and out["image_samples"] == 1


def test_caption_perceiver_reads_descriptions_as_text(cat_dialogue):
    from mmdialog import build

    m = build("tiny", perceiver="caption", bridge="text")
    b = m.collator([(cat_dialogue, "0")])
    assert b.photo_slots.numel() == 0
    assert "[img] a tabby cat lying on a wooden floor [/img]" in m.llm.tokenizer.decode(b.input_ids[0])


def test_scoring_only_labelled_positions_matches_full_logits(tiny, cat_dialogue):
    batch = tiny.collator([(cat_dialogue, "1"), (cat_dialogue, "0")])
    tiny.eval()
    with torch.no_grad():
        out = tiny(batch)
        full = tiny.llm(tiny.input_embeddings(batch), batch.attention_mask)          # (B, T, V)
        ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]).float(),
                                                batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    tiny.train()
    assert torch.allclose(out["text_loss"], ref, atol=1e-5)


def test_frozen_parts_stay_in_eval_mode_while_training(cat_photo):
    """The frozen Q-Former's dropout (p=0.1) is off in training; trainable parts train."""
    from mmdialog import build
    from mmdialog.core.collator import default_image_loader

    px = default_image_loader(cat_photo, 64)[None]
    frozen = build("tiny").train()
    assert not frozen.perceiver.qformer.training and not frozen.generator.text_encoders.training
    assert frozen.training and frozen.generator.unet.training and frozen.perceiver.projection.training
    lora_dropout = [m for n, m in frozen.llm.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_dropout and all(m.training for m in lora_dropout)
    assert torch.equal(frozen.perceiver(px), frozen.perceiver(px))
    tuned = build("tiny", overrides={"model.trainable": {"perceiver.qformer": True}}).train()
    assert tuned.perceiver.qformer.training
    torch.manual_seed(0)
    assert not torch.equal(tuned.perceiver(px), tuned.perceiver(px))
    assert not frozen.eval().generator.unet.training


def test_perceiver_features_of_a_frozen_trunk_are_computed_once_per_photo(cat_photo, tmp_path):
    from mmdialog import build
    from mmdialog.core.caching import content_key
    from mmdialog.core.collator import default_image_loader

    px = default_image_loader(cat_photo, 64)[None]
    m = build("tiny").train()
    p = m.perceiver
    store, key = p.feature_store(tmp_path), content_key(cat_photo)
    calls = []
    p.vision.register_forward_hook(lambda *a: calls.append(1))
    first = p(px, [key])
    second = p(px, [key])
    assert calls == [1] and store.encoded == 1 and store.complete(key)
    assert torch.equal(first, second) and torch.equal(first, p.projection(p.features(px)))
    second.sum().backward()
    assert p.projection.weight.grad is not None  # the trainable projection still learns
    with torch.no_grad():
        p(px, [key])                         # inference: computed, not stored
        p(px, [""])                          # no file: computed
    assert len(calls) == 4 and store.encoded == 1
    # Another process (the store opened anew) reads the photo from disk: no pixels needed.
    p.__dict__.pop("_feature_store")
    again = p.feature_store(tmp_path)
    assert again.folder == store.folder and torch.equal(p(torch.zeros(1, 3, 0, 0), [key]), first)
    assert len(calls) == 4 and again.encoded == 0
    tuned = build("tiny", overrides={"model.trainable": {"perceiver.qformer": True}}).train()
    assert tuned.perceiver.feature_store(tmp_path) is None  # a trained Q-Former is never stored


def test_build_on_a_device_creates_parameters_there_and_keeps_cpu_state_on_cpu(tiny):
    """``build(device=...)`` makes the device the default while plugins build (the meta
    device stands in for a GPU here); the vocabulary maps and noise schedules stay CPU state."""
    from mmdialog import build

    random = {"model.llm.random_weights": True}  # loading weights onto meta is refused, rightly
    m = build("tiny", random, device="meta")
    assert {p.device.type for p in m.parameters()} == {"meta"}
    assert {b.device.type for b in m.buffers()} == {"meta"}
    assert all(x.device.type == "cpu" and x.is_sparse for x in m.bridge.maps)
    assert m.generator.train_scheduler.alphas_cumprod.device.type == "cpu"
    trainable = lambda model: sorted(n for n, p in model.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(m) == trainable(tiny)
    assert all(torch.equal(a.indices(), b.indices()) and torch.equal(a.values(), b.values())
               for a, b in zip(m.bridge.maps, tiny.bridge.maps))


def test_a_photo_is_written_where_it_was_shared_in_the_turn(tiny, cat_photo):
    """PhotoChat merges a speaker's messages into a turn and records where the photo
    came (``Photo.offset``); the sharer's text after the photo stays after it."""
    from mmdialog import Dialogue, Photo

    text = "I adopted a cat. She loves the sofa"
    d = Dialogue("mid", [Turn("0", "how was your week?"),
                         Turn("1", text, [Photo(description="a tabby cat", path=cat_photo, offset=16)])])
    batch = tiny.collator([(d, "1")])
    decoded = tiny.llm.tokenizer.decode(batch.input_ids[0])
    k = tiny.perceiver.num_tokens
    assert f"I adopted a cat. [img] a tabby cat [/img]{'<image>' * k} She loves the sofa" in decoded
    # the description span and the photo slots are found where the photo sits
    start, length = int(batch.desc_start[0]), int(batch.desc_len[0])
    assert tiny.llm.tokenizer.decode(batch.input_ids[0, start:start + length]).strip() == "a tabby cat"
    assert batch.desc_has_image.tolist() == [True]
    # the text after the photo is trained too
    labels = batch.labels[0]
    sofa = tiny.llm.tokenizer(" sofa", add_special_tokens=False)["input_ids"][-1]
    assert sofa in labels.tolist()


def test_a_reply_cut_by_the_token_limit_says_so_and_a_finished_one_does_not(tiny):
    history = [Turn("user", "tell me a long story about your weekend, with many details")]
    short = tiny.respond(history, max_new_tokens=3, seed=0, draw=False)
    assert short.length_capped and len(tiny.llm.tokenizer(short.text, add_special_tokens=False)["input_ids"]) <= 3
    full = tiny.respond([Turn("user", "hi")], max_new_tokens=200, seed=0, draw=False)
    assert not full.length_capped   # it ended its turn (<|im_end|>) before the limit


INIT_DIGEST = """
import hashlib
from mmdialog import build
for _ in range(2):  # the first build prepares the embedded LLM into the empty cache, the second reads it
    h = hashlib.sha1()
    for name, p in sorted(build("tiny").named_parameters()):
        if p.requires_grad:
            h.update(name.encode() + p.detach().float().numpy().tobytes())
    print(h.hexdigest())
"""


def test_a_first_run_that_prepares_the_embedded_llm_initialises_as_later_runs(tmp_path):
    """Converting the embedded LLM (once per cache) draws random numbers of its own; the
    random-init weights (LoRA, perceiver projection, new token rows) must not see them, or
    `make demo` on a new machine trains another model than every later run."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MMDIALOG_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", INIT_DIGEST], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    first, later = out.stdout.split()
    assert first == later
    assert "preparing the embedded SmolLM2" in out.stderr
