"""Under ``--reference-recipe`` the Llama-2 token ids are the reference's: those its
transformers 4.4x gives with the genuine Llama-2 tokenizer
(``fixtures/reference_token_ids.json``, written by ``fixtures/make_reference_token_ids.py``
in a side environment; its provenance is inside), for every training sample and every
evaluation prompt of the embedded PhotoChat excerpt. transformers 5 as loaded (even
with ``legacy``) matched none of them."""
import json
from pathlib import Path

import pytest
from fixtures.make_reference_token_ids import DESCRIPTION_STYLE, excerpt_messages, reference_model
from llama2 import tiny_llama2_folder

from mmdialog.core.data import demo_dialogues, dialogue_samples
from mmdialog.core.markup import IMG_CLOSE, IMG_OPEN
from mmdialog.plugins.llms.hf import HFLanguageModel, HFOptions

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "reference_token_ids.json").read_text(encoding="utf-8"))
SAMPLES = {s["key"]: s for s in FIXTURE["samples"]}
REGENERATE = "the text changed: regenerate the fixture (tests/fixtures/make_reference_token_ids.py)"


def expected_prompt(p: dict) -> list[int]:
    return SAMPLES[p["sample"]]["ids"][: p["length"]] + p["then"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama2_folder(tmp_path_factory.mktemp("llama2"))


@pytest.fixture(scope="module")
def reference(folder):
    """The paper's LLM under the reference recipe; no perceiver, as the authors' code."""
    return reference_model(folder)


def excerpt(split: str):
    return demo_dialogues(split, photos=False, description_style=DESCRIPTION_STYLE)


def test_every_training_sample_has_the_references_ids(reference):
    c = reference.collator
    assert c.max_length >= max(len(s["ids"]) for s in FIXTURE["samples"])
    texts = {s["key"]: s["text"] for s in excerpt_messages(reference)["samples"]}
    assert texts == {k: s["text"] for k, s in SAMPLES.items()}, REGENERATE
    ours = {}
    for split in ("train", "dev", "test"):
        for d, agent in c.samples(excerpt(split)):
            e = c.encode(d, agent)
            assert e["labels"] == e["ids"]                           # every token is trained
            ours[f"{d.id}@{agent}"] = e["ids"]
    same = [k for k, s in SAMPLES.items() if ours[k] == s["ids"]]
    assert len(same) == len(SAMPLES) == 42, f"{len(same)} of {len(SAMPLES)} samples have the reference's ids"


def test_every_evaluation_prompt_has_the_references_ids(reference):
    c = reference.collator
    expected = {p["key"]: expected_prompt(p) for p in FIXTURE["prompts"]}
    ours = {}
    for split in ("train", "dev", "test"):
        for s in dialogue_samples(excerpt(split)):
            ours[s.key] = c.prompt(list(s.context), s.speaker).input_ids[0].tolist()
    assert ours.keys() == expected.keys(), REGENERATE
    same = [k for k in expected if ours[k] == expected[k]]
    assert len(same) == len(expected) == 378, f"{len(same)} of {len(expected)} prompts have the reference's ids"


def test_where_transformers_4_and_5_differ(reference):
    """The three places, with transformers 4.46's ids: an added token takes the space before it;
    the text after </s> starts with a '▁' of its own; "<s>[INST]" is <s> ▁[ INST ] (what the
    reference asserts)."""
    tok = reference.llm.tokenizer
    ids = tok("<s>[INST] nice [img] a dog [/img] [/INST]</s> hi </s>", add_special_tokens=False)["input_ids"]
    img, close = tok.convert_tokens_to_ids([IMG_OPEN, IMG_CLOSE])
    space, hi, nice, a, dog = 29871, 7251, 7575, 263, 11203
    assert ids == [1, 518, 25580, 29962, nice, img, a, dog, close, 518, 29914, 25580, 29962, 2, space, hi, space, 2]


def test_description_spans_and_labels_keep_their_meaning(reference):
    """Offsets under the transformers 4 pipeline: each shared photo's span is its description
    (not the "[img] and [/img]" the system prompt names), and the spans train the image loss."""
    c = reference.collator
    dialogues = excerpt("train")
    batch = c(c.samples(dialogues))
    photos = [p for d in dialogues for t in d.turns for p in t.photos]
    assert len(batch.desc_index) == len(photos) == 9
    tok = reference.llm.tokenizer
    for b, start, n, photo in zip(batch.desc_index, batch.desc_start, batch.desc_len, photos):
        row = batch.input_ids[b].tolist()
        assert row[start - 1] == reference.llm.img_open_id and row[start + n] == reference.llm.img_close_id
        assert tok.decode(row[start:start + n]).strip() == photo.description


def test_the_pipeline_is_opt_in_and_leaves_byte_level_tokenizers_alone(folder):
    text = "<s>[INST] nice [img] a dog [/img] [/INST]</s> hi </s>"
    llama = {p: HFLanguageModel(HFOptions(path=str(folder), tokenizer_pipeline=p, lora={"r": 0})).tokenizer
             for p in ("as_loaded", "transformers4")}
    ids = {p: t(text, add_special_tokens=False)["input_ids"] for p, t in llama.items()}
    assert ids["as_loaded"] != ids["transformers4"]                  # transformers 5's own, by default
    assert ids["as_loaded"][4:7] == [7575, 29871, ids["transformers4"][5]]   # nice ▁ [img]
    smollm2 = {p: HFLanguageModel(HFOptions(tokenizer_pipeline=p, lora={"r": 0})).tokenizer
               for p in ("as_loaded", "transformers4")}
    texts = [s["text"] for s in FIXTURE["samples"][:3]]
    assert smollm2["as_loaded"](texts)["input_ids"] == smollm2["transformers4"](texts)["input_ids"]
