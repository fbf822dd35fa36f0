"""Replies are text and whole description spans: the markup is a grammar the decoder keeps."""
import sys

import torch
from sharing_model import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_demo import clean  # noqa: E402


def test_the_decoder_writes_the_markup_as_a_grammar(tiny):
    """Even a model that would write [/img] at every step (a head biased towards it, as a
    model just shown a photo leans) opens a span before it closes one, closes it once, and
    never writes the <image> slot token."""
    llm = tiny.llm
    head = llm.base_model.get_output_embeddings()
    ids = torch.tensor([llm.tokenizer("can I see your cat?", add_special_tokens=False)["input_ids"]])

    def bias(module, args, logits):  # (B, T, V)
        logits = logits.clone()
        logits[..., llm.img_close_id] += 100.0
        logits[..., llm.image_token_id] += 90.0
        logits[..., llm.img_open_id] += 50.0
        return logits

    hook = head.register_forward_hook(bias)
    try:
        out = llm.generate(llm.embed(ids), torch.ones_like(ids), max_new_tokens=6)[0].tolist()
    finally:
        hook.remove()
    o, c = llm.img_open_id, llm.img_close_id
    assert out == [o, c, o, c, o, c]


def test_what_clean_means():
    assert clean("yes, here it is [img] my tabby cat [/img]") and clean("hi") and clean("a [img] x [/img] b [img] y [/img]")
    for broken in ("here [img] a cat [/img] [/img]", "look [/img]", "a <image> b", "bye <|im_end|>", "[img] [img] x [/img]"):
        assert not clean(broken), broken
