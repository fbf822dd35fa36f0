"""Prompt formats (``model.llm.prompt_format``): the authors' reference format
with the genuine Llama-2 tokenizer and with the embedded SmolLM2, the default
template format, and a format a plugin registers."""
import pytest
import torch
import torch.nn.functional as F
from llama2 import tiny_llama2_folder

from mmdialog import ConfigError, Dialogue, PromptFormat, Turn, build, load_config
from mmdialog.core.collator import IGNORE
from mmdialog.core.data import demo_dialogues, dialogue_samples
from mmdialog.core.prompts import REFERENCE_SYSTEM_PROMPT, TemplateFormat
from mmdialog.core.registry import default_registry

SYS = ("You are a multi-modal dialogue chatbot. Given the dialogue context, please generate the corresponding "
       "response.\n\nThe text between [img] and [/img] is the image description.")
# The demo dialogue "demo/new-cat" (chat.jsonl) as the authors' code writes it: the first speaker ("0")
# is the user, the system prompt opens the first user turn, every turn ends with </s>, and the photo
# is its description where it was shared.
NEW_CAT = (
    "<s>[INST] <<SYS>>\n" + SYS + "\n<</SYS>>\n\nguess what, we adopted a cat! [/INST]</s>"
    " no way! what is her name? </s>"
    "<s>[INST] Chelsea. here she is [img] Cat, Tabby cat, Face, Whiskers, Eye [/img] [/INST]</s>"
    " she is adorable, those green eyes! </s>"
    "<s>[INST] she stares at me like that all day [/INST]</s>")


@pytest.fixture(scope="module")
def llama2_reference(tmp_path_factory):
    """The paper's LLM under the reference recipe; no perceiver, as the authors' code."""
    folder = tiny_llama2_folder(tmp_path_factory.mktemp("llama2"))
    return build(load_config("tiny", {"model.llm.path": str(folder), "model.max_length": 1024},
                             reference_recipe=True, perceiver="caption"))


@pytest.fixture(scope="module")
def smollm2_reference():
    return build("tiny", overrides={"model.llm.prompt_format": "reference"})


def new_cat() -> Dialogue:
    return next(d for d in demo_dialogues("train", photochat=False) if d.id == "demo/new-cat")


def test_reference_format_renders_a_dialogue_as_the_authors_code(llama2_reference):
    c = llama2_reference.collator
    (dialogue, agent), = c.samples([new_cat()])                  # one sample per dialogue
    assert c.format.render(c.messages(dialogue.turns, agent)) == NEW_CAT
    assert c.format.system_prompt == REFERENCE_SYSTEM_PROMPT == SYS
    # Tokenized as the reference asserts it is ("<s>[INST]" → <s> ▁[ INST ]), every token labelled.
    e = c.encode(dialogue, agent)
    assert e["ids"][:4] == [1, 518, 25580, 29962] and e["labels"] == e["ids"]
    assert e["ids"] == llama2_reference.llm.tokenizer(NEW_CAT, add_special_tokens=False)["input_ids"]
    # The one description span is the photo's, not the "[img] and [/img]" the system prompt names.
    assert len(e["opens"]) == 1 and e["agent_photos"][0].description.startswith("Cat, Tabby")


@pytest.mark.parametrize("which", ["llama2_reference", "smollm2_reference"])
def test_every_excerpt_dialogue_is_one_sample_with_every_token_labelled(which, request):
    model = request.getfixturevalue(which)
    dialogues = demo_dialogues(None)                             # all splits: 42 excerpt + 8 demo dialogues
    samples = model.collator.samples(dialogues, both_speakers=True)
    assert [d.id for d, _ in samples] == [d.id for d in dialogues]
    batch = model.collator(samples)
    slot = batch.input_ids == model.llm.image_token_id
    real = batch.attention_mask.bool() & ~slot
    # The first slot after a shared photo's [/img] predicts the token after the photo (what the
    # reply goes on with once the photo is perceived); no other slot is a position that predicts.
    first = slot & F.pad(batch.input_ids[:, :-1] == model.llm.img_close_id, (1, 0), value=False)
    assert torch.equal(batch.labels != IGNORE, real | first)     # all non-pad tokens
    assert torch.equal(batch.labels[real], batch.input_ids[real])
    b, t = first.nonzero(as_tuple=True)
    if model.perceiver.kind == "pixels":  # a text perceiver adds no slots
        assert len(b) and torch.equal(batch.labels[b, t], batch.input_ids[b, t + model.perceiver.num_tokens])
    photos = [p for d in dialogues for t in d.turns for p in t.photos]
    assert len(batch.desc_index) == len(photos)                  # every shared photo, either speaker
    with_files = sum(p.path is not None for p in photos)
    assert with_files and int(batch.desc_has_image.sum()) == with_files
    first = next(i for i, (d, _) in enumerate(samples) if any(p.path for t in d.turns for p in t.photos))
    loss = model(model.collator(samples[first:first + 2]))      # two samples: the logits of all 50 are GBs
    assert torch.isfinite(loss["loss"]) and loss["image_samples"] >= 1


def test_reference_prompts_follow_the_reference_and_replies_are_stripped(llama2_reference):
    c = llama2_reference.collator
    turns = new_cat().turns
    # Context ends with the user's turn: the model writes the assistant's after "[/INST]</s>".
    assert c.prompt_text(turns[:1], turns[1].speaker).endswith("guess what, we adopted a cat! [/INST]</s>")
    # Context ends with the assistant's turn: "<s>[INST]" is appended, the model writes the user's.
    assert c.prompt_text(turns[:2], turns[2].speaker).endswith(" no way! what is her name? </s><s>[INST]")
    assert c.format.clean(" here she is [/INST]") == "here she is"
    for s in dialogue_samples(demo_dialogues("test")):           # both speakers' turns: no prompt fails
        row = c.prompt(list(s.context), s.speaker).input_ids[0].tolist()
        assert row[:4] == [1, 518, 25580, 29962]
    reply = llama2_reference.respond(list(turns[:2]), agent=turns[2].speaker, max_new_tokens=4)
    assert "[INST]" not in reply.text and "[/INST]" not in reply.text


def test_template_format_keeps_one_sample_per_speaker_and_the_agents_turns(tiny):
    c = tiny.collator
    assert isinstance(c.format, TemplateFormat) and c.format.system_prompt is None
    dialogue = new_cat()
    samples = c.samples([dialogue])
    assert [a for _, a in samples] == ["0", "1"]
    e = c.encode(dialogue, "1")
    labelled = tiny.llm.tokenizer.decode([i for i in e["labels"] if i != IGNORE])
    assert "no way" in labelled and "guess what" not in labelled


def test_a_prompt_format_from_a_plugin_is_a_config_value():
    class Shouting(TemplateFormat):
        name = "shouting"

        def render(self, messages):
            return super().render(messages).upper()

    with pytest.raises(ConfigError, match="unknown prompt format 'shouting'; use template, reference"):
        load_config("tiny", {"model.llm.prompt_format": "shouting"})
    reg = default_registry()
    reg.register_prompt_format(Shouting)
    try:
        model = build("tiny", overrides={"model.llm.prompt_format": "shouting"})
        assert isinstance(model.collator.format, PromptFormat)
        turns = [Turn("0", "hi"), Turn("1", "hello there")]
        assert "HELLO THERE" in model.collator.format.render(model.collator.messages(turns, "1"))
    finally:
        reg._prompt_formats.pop("shouting")


def per_prefix_spans(fmt, messages, text):
    """The definition of assistant_spans: what each assistant message adds to the rendered prefix."""
    spans, prev = [], len(fmt.render(messages[:0]))
    for i, m in enumerate(messages):
        end = len(fmt.render(messages[: i + 1]))
        if m["role"] == "assistant":
            start = text.find(m["content"], prev)
            spans.append((start if start >= 0 else prev, end))
        prev = end
    return spans


@pytest.fixture(scope="module")
def llama2_template(tmp_path_factory):
    folder = tiny_llama2_folder(tmp_path_factory.mktemp("llama2t"))
    return build(load_config("tiny", {"model.llm.path": str(folder), "model.max_length": 1024},
                             perceiver="caption"))


@pytest.mark.parametrize("which", ["tiny", "llama2_template"])
def test_labelled_spans_from_one_rendering_equal_the_spans_of_every_prefix(which, request):
    """The collator renders a sample once: the spans found in that text equal the
    definition's (one rendering per message prefix), with SmolLM2's and Llama-2's templates,
    for every demo dialogue and agent, and for contents the template may not keep as given."""
    c = request.getfixturevalue(which).collator
    dialogues = demo_dialogues(None)
    odd = Dialogue("odd", [Turn("0", "  padded  "), Turn("1", "user"), Turn("0", "assistant"), Turn("1", "[/INST]")])
    checked = 0
    for d, agent in c.samples([*dialogues, odd]):
        msgs = c.messages(d.turns, agent)
        text = c.format.render(msgs)
        assert c.format.assistant_spans(msgs, text) == per_prefix_spans(c.format, msgs, text), d.id
        checked += 1
    assert checked > 80
