"""Between two vocabularies: decoding LLM description tokens with character
offsets, re-tokenising them for a generator's text tower, and the static
sparse map M ∈ R^{|V_llm|×|V_tower|} of docs/design.md §3 (cached on disk).

M is never dense: SmolLM2 × CLIP would be 49 155 × 49 408 floats (9.7 GB);
its ~66k non-zeros are 0.8 MB.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdialog.core.errors import ConfigError
from mmdialog.core.files import atomic_write
from mmdialog.core.interfaces import PromptTokens, TextTower
from mmdialog.core.reading import cache_file


def check_bridgeable(tokenizer, what: str) -> None:
    """A tower tokenizer must give character offsets (a fast tokenizer)."""
    try:
        enc = tokenizer("a photo", return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise ConfigError(f"{what}: its tokenizer {type(tokenizer).__name__} gives no character offsets "
                          f"({e}); use a fast (tokenizers-backed) tokenizer") from None
    if "offset_mapping" not in enc:
        raise ConfigError(f"{what}: its tokenizer {type(tokenizer).__name__} gives no character "
                          "offsets; use a fast (tokenizers-backed) tokenizer")


def decode_text(tokenizer, ids: list[int]) -> str:
    """The one decoding every bridge uses, so all hand the generator the same text."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_with_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode ``ids`` and give each token its character span in the text.

    Spans come from decoding growing prefixes, which is exact for byte-level
    and SentencePiece tokenizers alike (cost O(L²) for L ≲ 64 tokens).
    """
    text = decode_text(tokenizer, ids)
    spans, prev = [], 0
    for t in range(1, len(ids) + 1):
        end = len(decode_text(tokenizer, ids[:t]))
        end = max(prev, min(end, len(text)))
        spans.append((prev, end))
        prev = end
    return text, spans


@dataclass
class TowerTokens:
    input_ids: torch.Tensor           # (N, S)
    offsets: list[list[tuple[int, int]]]  # per sample, per position; (0, 0) for specials/padding
    texts: list[str]
    attention_mask: torch.Tensor | None = None  # (N, S): 1 on BOS, the text and EOS; 0 on padding


def tokenize_for_tower(tokenizer, texts: list[str], max_length: int) -> TowerTokens:
    """Exactly what the generator's pipeline would feed its text encoder."""
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    return_offsets_mapping=True, return_tensors="pt")
    offsets = [[tuple(map(int, o)) for o in row] for row in enc["offset_mapping"].tolist()]
    return TowerTokens(enc["input_ids"], offsets, texts, enc.get("attention_mask"))


def embed_for_tower(tower: TextTower, texts: list[str]) -> tuple[TowerTokens, PromptTokens]:
    """``texts`` tokenised for ``tower`` (``tokenize_for_tower``) and embedded by its
    table: the tokens (offsets, mask) and the prompt (ids on the table's device,
    float embeddings (N, S, d)) that exactly re-tokenised text gives."""
    tt = tokenize_for_tower(tower.tokenizer, texts, tower.max_length)
    ids = tt.input_ids.to(tower.embedding.weight.device)
    return tt, PromptTokens(ids, tower.embedding(ids).float(), texts)          # (N, S, d)


def _vocab_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha1(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def build_static_map(llm_tokenizer, tower_tokenizer, n_llm: int) -> torch.Tensor:
    """Sparse (n_llm, V_tower): row v = 1/k on each of the k tower tokens of
    LLM token v's text. Added and special tokens get empty rows."""
    specials = set(llm_tokenizer.all_special_ids) | set(range(len(llm_tokenizer.get_vocab()), n_llm))
    added = set(getattr(llm_tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in range(n_llm) if i not in specials and i not in added]
    texts = llm_tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
    enc = tower_tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    rows, cols, vals = [], [], []
    for i, toks in zip(ids, enc):
        for c in toks:
            rows.append(i)
            cols.append(c)
            vals.append(1.0 / len(toks))
    idx = torch.tensor([rows, cols], dtype=torch.long, device="cpu")
    return torch.sparse_coo_tensor(idx, torch.tensor(vals, device="cpu"), (n_llm, len(tower_tokenizer)),
                                   check_invariants=False).coalesce()


def static_map(llm_tokenizer, tower_tokenizer, n_llm: int, cache_dir: str | Path | None) -> torch.Tensor:
    """``build_static_map``, cached under ``cache_dir/vocab_maps`` by both vocabularies."""
    if cache_dir is None:
        return build_static_map(llm_tokenizer, tower_tokenizer, n_llm)
    from safetensors.torch import load_file, save_file

    key = f"{_vocab_fingerprint(llm_tokenizer)}-{_vocab_fingerprint(tower_tokenizer)}-{n_llm}"
    path = Path(cache_dir) / "vocab_maps" / f"{key}.safetensors"
    shape = (n_llm, len(tower_tokenizer))
    if cache_file(path, cache_dir):
        try:
            t = load_file(str(path), device="cpu")
            return torch.sparse_coo_tensor(t["indices"], t["values"], shape, is_coalesced=True,
                                           check_invariants=True, device="cpu")  # a file may be corrupt
        except Exception:  # noqa: BLE001 — any damage to a cache file: build it again
            pass
    m = build_static_map(llm_tokenizer, tower_tokenizer, n_llm)
    with atomic_write(path) as tmp:  # a reader never sees half a file
        save_file({"indices": m.indices().contiguous(), "values": m.values().contiguous()}, str(tmp))
    return m
