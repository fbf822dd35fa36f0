"""The paper's own LLM, Llama-2-7b-chat, as its users load it: the genuine
tokenizer and chat template (roles must alternate, the user first) on a tiny
random-init Llama with the real 32 000-token vocabulary."""
import pytest
import torch
from llama2 import tiny_llama2_folder

from mmdialog import Turn, build
from mmdialog.core.collator import IGNORE, training_samples
from mmdialog.core.data import demo_dialogues, dialogue_samples


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    folder = tiny_llama2_folder(tmp_path_factory.mktemp("llama2"))
    return build("tiny", overrides={"model.llm.path": str(folder), "model.max_length": 1024})


def test_the_tokenizer_and_template_are_llama2s(llama2):
    tok = llama2.llm.tokenizer
    assert tok("Hello world!")["input_ids"] == [1, 15043, 3186, 29991]
    assert llama2.llm.user_first and llama2.llm.stop_ids == [2]
    assert llama2.llm.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) == \
        "<s>[INST] hi [/INST] yo </s>"


def test_every_training_sample_of_both_speakers_renders_and_trains(llama2):
    samples = training_samples(demo_dialogues("train"))          # both speakers: half speak first
    agent_first = [(d, a) for d, a in samples if d.turns[0].speaker == a]
    assert len(agent_first) >= len(samples) // 3
    batch = llama2.collator(samples)                             # raised "Conversation roles must alternate"
    out = llama2(batch)
    assert torch.isfinite(out["loss"]) and out["image_samples"] > 0
    row = llama2.collator([agent_first[0]]).input_ids[0].tolist()
    text = llama2.llm.tokenizer.decode(row)
    assert text.startswith("<s>[INST]  [/INST]")                 # an empty user turn opens the conversation
    labels = llama2.collator([agent_first[0]]).labels[0]
    first = next(i for i, x in enumerate(labels.tolist()) if x != IGNORE)
    assert llama2.llm.tokenizer.decode(row[first:first + 3]).strip() == \
        llama2.llm.tokenizer.decode(llama2.llm.tokenizer(agent_first[0][0].turns[0].text,
                                                         add_special_tokens=False)["input_ids"][:3]).strip()


def test_every_evaluation_prompt_renders_and_the_model_replies(llama2):
    samples = dialogue_samples(demo_dialogues("test"))
    for s in samples:                                            # 154 of 328 raised before
        llama2.collator.prompt(list(s.context), s.speaker)
    reply = llama2.respond([Turn("assistant", "I just got back from the beach!"), Turn("user", "show me")],
                           max_new_tokens=6)
    assert isinstance(reply.text, str)
