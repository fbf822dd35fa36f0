"""A third-party generator and dataset format, written only against ``mmdialog``'s
public API (docs/generator_example.py), installed as a real distribution with an
entry point: listed, read by ``mmdialog data check``, trained by ``mmdialog train``
and chatted with by ``mmdialog chat``."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdialog.core.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    pkg = site / "mmdialog_palette"
    pkg.mkdir()
    (pkg / "__init__.py").write_text((ROOT / "docs" / "generator_example.py").read_text())
    info = site / "mmdialog_palette-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdialog-palette\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmdialog]\npalette = mmdialog_palette\n")
    return site


@pytest.fixture()
def installed(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    default_registry.cache_clear()
    yield site
    default_registry.cache_clear()


@pytest.fixture(scope="module")
def chatlog(tmp_path_factory, cat_photo):
    folder = tmp_path_factory.mktemp("chatlog")
    shutil.copy(cat_photo, folder / "cat.png")
    shutil.copy(cat_photo.parent / "coffee.png", folder / "coffee.png")
    logs = [{"name": "cat", "chatlog": [{"who": "ann", "said": "show me your cat"},
                                        {"who": "bob", "said": "here she is", "photo": "cat.png",
                                         "caption": "my tabby cat"}]},
            {"name": "coffee", "chatlog": [{"who": "ann", "said": "what are you drinking?"},
                                           {"who": "bob", "said": "an espresso", "photo": "coffee.png",
                                            "caption": "a cup of espresso"}]},
            {"name": "broken", "chatlog": "not a list"}]
    path = folder / "logs.json"
    path.write_text(json.dumps(logs))
    return path


def run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "mmdialog", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def test_the_example_imports_only_the_public_api():
    source = (ROOT / "docs" / "generator_example.py").read_text()
    imported = [line for line in source.splitlines() if line.startswith(("from mmdialog", "import mmdialog"))]
    assert imported and all(line.startswith("from mmdialog import") for line in imported)


def test_the_generator_draws_and_its_loss_reaches_the_llm(installed, cat_dialogue):
    from mmdialog import GenerationOptions, build

    model = build("tiny", generator="palette")
    assert {"generator.decoder", "generator.text_encoder"} <= set(model.trainable_groups)  # its own defaults
    out = model(model.collator([(cat_dialogue, "1")]))       # speaker 1 shares the cat
    assert out["image_samples"] == 1 and out["image_loss"] > 0
    out["image_loss"].backward()                              # through the gumbel bridge into the LoRA
    lora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    ids = torch.tensor([model.llm.tokenizer("a tabby cat", add_special_tokens=False)["input_ids"]])
    photo = model.share(model.bridge(ids, torch.ones_like(ids, dtype=torch.bool)), GenerationOptions())[0]
    assert photo.source == "drawn" and photo.plugin == "palette" and photo.image.size == (32, 32)


def test_installed_plugin_is_listed_reads_its_format_trains_and_chats(site, chatlog, tmp_path):
    listed = run(site, "plugins")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = [line.split()[:2] for line in listed.stdout.splitlines()]
    assert ["generator", "palette"] in rows and ["dataset", "chatlog"] in rows

    check = run(site, "data", "check", str(chatlog), "--json")
    counts = json.loads(check.stdout)
    assert counts["dialogues"] == 2 and counts["bad_records"] == 1 and counts["photos"] == 2
    assert "'chatlog' must be a non-empty list" in check.stdout

    out = tmp_path / "run"
    trained = run(site, "train", "--generator", "palette", "--data", str(chatlog), "--set", "data.format=chatlog",
                  "--max-steps", "2", "--batch-size", "2", "--out-dir", str(out), "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    losses = [line for line in trained.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(float(line.split()[-1]) > 0 for line in losses)  # the palette's image loss
    assert (out / "trainable.pt").is_file()

    chat = run(site, "chat", str(out / "trainable.pt"), "-m", "show me your cat", "--json",
               "--max-new-tokens", "12", "--seed", "0", "--photos-dir", str(tmp_path / "photos"))
    assert chat.returncode == 0, chat.stderr[-3000:]
    reply = json.loads(chat.stdout.strip().splitlines()[-1])
    assert isinstance(reply["text"], str) and reply["truncated"] is False


def test_listing_plugins_imports_no_component_and_no_torch():
    code = ("import sys; from mmdialog.core.registry import Registry; r = Registry(); "
            "print(len(r.all()), 'torch' in sys.modules, any(m.startswith('mmdialog.plugins.') and m.count('.') == 3 "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["8", "False", "False"], out


def test_a_plugin_named_by_module_and_class_is_imported_when_built():
    from mmdialog import Plugin, PluginError
    from mmdialog.core.registry import Registry

    reg = Registry(load_entry_points=False)
    reg.register(Plugin("bridge", "text2", "mmdialog.plugins.bridges.text:TextBridge", "the text bridge again"))
    assert next(p for p in reg.all() if p.name == "text2").factory == "mmdialog.plugins.bridges.text:TextBridge"
    assert reg.get("bridge", "text2").factory.__name__ == "TextBridge"
    reg.register(Plugin("bridge", "gone", "no_such_package.bridges:Bridge"))
    with pytest.raises(PluginError, match="cannot import 'no_such_package.bridges:Bridge'.*installed"):
        reg.get("bridge", "gone")
    reg.register(Plugin("bridge", "wrong", "mmdialog.plugins.generators.sd:SDGenerator"))
    with pytest.raises(PluginError, match="must be a subclass of mmdialog.Bridge"):
        reg.get("bridge", "wrong")
    with pytest.raises(PluginError, match="must be a class or 'module:Class'"):
        reg.register(Plugin("bridge", "bad", "just_a_name"))
