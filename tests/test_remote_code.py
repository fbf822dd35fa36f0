"""A received model folder runs no code unless the user says so.

The folder's sender controls everything in it, digests included. Each case is
an exported folder (as its sender wrote it) whose ``config.yaml`` asks for code — a config option
(``trust_remote_code``), an LLM folder whose tokenizer names a custom class
(``auto_map`` + a ``.py`` file that writes a marker when imported), a Hub
attention kernel, a tokenizer file outside the folder, a model-config
``auto_map`` — re-hashed as a careful sender would. ``mmdialog.load`` and
``mmdialog chat`` refuse each in one line that names ``--trust-remote-code``,
and the marker never appears. With the flag, the same folder's code does run
(so the refusal is a refusal of a live payload).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from sharing_model import run_cli

import mmdialog
from mmdialog import ConfigError
from mmdialog.core import assets
from mmdialog.core.config import load_config
from mmdialog.core.export import FORMAT

TINY_LLAMA = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 512}
FLAG = r"--trust-remote-code \(Python: trust_remote_code=True\)"


def _evil_llm(folder, marker):
    """An LLM folder whose tokenizer names ``tokenization_evil.EvilTokenizer``: importing it creates ``marker``."""
    folder.mkdir(parents=True)
    real = assets.resolve(assets.SMOLLM2)
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(f"{real}/{name}", folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}}))
    (folder / "tokenization_evil.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).touch()  # what a real attack would do with os.system
        from transformers import PreTrainedTokenizerFast as EvilTokenizer
    """))
    return folder


def _received(tmp_path, llm: dict) -> tuple:
    """(folder, marker): an exported folder — weights, config, tokenizer additions, a manifest with
    every digest, as its sender made it — whose ``model.llm`` is ``llm``."""
    from safetensors.torch import save_file

    marker = tmp_path / "PWNED"
    evil = _evil_llm(tmp_path / "evil-llm", marker)
    folder = tmp_path / "received"
    folder.mkdir()
    config = load_config("tiny").model_dump(mode="json")
    config["model"]["llm"] = {"name": "hf", **{k: (str(evil) if v == "EVIL" else v) for k, v in llm.items()}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    save_file({"bridge.sent": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "tokenizer_additions.json").write_text(json.dumps({"added_tokens": {"[img]": 49152}}))
    digests = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
               for name in ("model.safetensors", "config.yaml", "tokenizer_additions.json")}
    (folder / "mmdialog.json").write_text(json.dumps({"format": FORMAT, "format_version": 3, "sha256": digests}))
    return folder, marker


RANDOM = {"random_weights": True, "config": TINY_LLAMA}
CASES = {
    "tokenizer option": ({"path": "EVIL", **RANDOM, "tokenizer_options": {"trust_remote_code": True}},
                         r"config field 'model.llm.tokenizer_options.trust_remote_code': a config cannot let a "
                         rf"model run its own code; pass {FLAG}"),
    "component option": ({"path": "EVIL", **RANDOM, "trust_remote_code": True},
                         rf"config field 'model.llm.trust_remote_code': a config cannot .*; pass {FLAG}"),
    "auto_map": ({"path": "EVIL", **RANDOM},
                 rf"llm '.*evil-llm' asks to run its own Python code \(a custom class in its auto_map\); mmdialog "
                 rf"runs no code a model folder names unless you pass {FLAG}"),
    "Hub kernel": ({"attn_implementation": "kernels-community/flash-attn"},
                   r"llm.attn_implementation 'kernels-community/flash-attn' is not one of transformers' own .*: a "
                   rf"Hub kernel runs code from outside the model folder; pass {FLAG}"),
    "tokenizer file outside": ({"tokenizer_options": {"tokenizer_file": "/etc/passwd"}},
                               r"config field 'model.llm.tokenizer_options.tokenizer_file' \(llm plugin 'hf'\): "
                               r"Extra inputs are not permitted"),
    "model-config auto_map": ({"path": "EVIL", "random_weights": True,
                               "config": {**TINY_LLAMA, "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}},
                              r"config.auto_map cannot be set from a config: it would load code or files"),
}


def test_the_payload_is_real(tmp_path):
    """transformers told to trust the folder imports its .py: the marker appears."""
    marker = tmp_path / "PWNED"
    evil = _evil_llm(tmp_path / "evil-llm", marker)
    code = f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({str(evil)!r}, trust_remote_code=True)"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=300)
    assert marker.exists()


@pytest.mark.parametrize("case", list(CASES))
def test_a_received_folder_asking_for_code_runs_none(tmp_path, case):
    llm, message = CASES[case]
    folder, marker = _received(tmp_path, llm)
    with pytest.raises(ConfigError, match=message) as err:
        mmdialog.load(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_the_cli_refuses_in_one_line_and_runs_the_code_only_with_the_flag(tmp_path, monkeypatch):
    folder, marker = _received(tmp_path, CASES["auto_map"][0])
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies the .py
    proc = run_cli("chat", str(folder), "-m", "hi", timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: llm ") and "--trust-remote-code" in lines[-1], lines[-1]
    assert not marker.exists()
    # The flag is the one door: the folder's code now runs (the sent weights then have no place in
    # the model, a one-line error of its own).
    proc = run_cli("chat", str(folder), "-m", "hi", "--trust-remote-code", timeout=300)
    assert marker.exists(), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_typed_tokenizer_options_still_validate():
    from mmdialog.core.config import load_config, validate_plugins

    options = validate_plugins(load_config("tiny", {"model.llm.tokenizer_options": {"legacy": True}}))["llm"]
    assert options.tokenizer_options.model_dump(exclude_none=True) == {"legacy": True}
