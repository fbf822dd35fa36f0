"""Plugins: built-ins and a third-party package found through its entry point."""
import subprocess
import sys
from pathlib import Path

import pytest

from mmdialog import ConfigError, PluginError, build
from mmdialog.core.registry import Registry, default_registry

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_register_through_the_hook():
    reg = Registry(load_entry_points=False)
    assert reg.names("llm") == ["hf"]
    assert reg.names("perceiver") == ["caption", "qformer"]
    assert reg.names("bridge") == ["gumbel", "text"]
    assert {"sd", "sdxl"} <= set(reg.names("generator"))


def test_unknown_plugin_lists_the_available_names():
    with pytest.raises(PluginError, match=r"unknown bridge plugin 'gumbell'; available: gumbel, text"):
        build("tiny", bridge="gumbell")


def test_a_plugin_of_the_wrong_type_is_refused():
    from mmdialog import Plugin

    with pytest.raises(PluginError, match="must be a subclass of mmdialog.Perceiver"):
        Registry(load_entry_points=False).register(Plugin("perceiver", "bad", dict))


@pytest.fixture()
def installed_plugin(tmp_path, monkeypatch):
    """A real distribution on sys.path: package + dist-info with an entry point."""
    site = tmp_path / "site"
    pkg = site / "mmdialog_grid"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text((ROOT / "docs" / "plugin_example.py").read_text())
    info = site / "mmdialog_grid-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdialog-grid\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmdialog]\ngrid = mmdialog_grid\n")
    monkeypatch.syspath_prepend(str(site))
    default_registry.cache_clear()
    yield site
    default_registry.cache_clear()


def test_third_party_plugin_is_listed_and_built(installed_plugin, cat_dialogue):
    assert "grid" in default_registry().names("perceiver")
    model = build("tiny", perceiver={"name": "grid", "grid": 3})
    assert type(model.perceiver).__name__ == "GridPerceiver" and model.perceiver.num_tokens == 9
    assert "perceiver.projection" in model.trainable_groups
    batch = model.collator([(cat_dialogue, "0")])  # speaker 0 sees the cat photo
    assert batch.photo_slots.shape == (1, 2) and batch.photo_pixels.shape[-1] == 64
    out = model(batch)
    out["loss"].backward()
    assert model.perceiver.proj.weight.grad.abs().sum() > 0


def test_third_party_options_are_validated(installed_plugin):
    with pytest.raises(ConfigError, match=r"model\.perceiver\.grid.*grid"):
        build("tiny", perceiver={"name": "grid", "grid": "many"})


def test_cli_lists_the_installed_plugin(installed_plugin):
    env = {"PYTHONPATH": str(installed_plugin), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mmdialog", "plugins"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:2] == ["perceiver", "grid"] and "mmdialog_grid" in line for line in lines)
    assert any(line.split()[:2] == ["bridge", "gumbel"] for line in lines)


def test_readme_plugin_example_is_the_installed_file():
    import re

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "GridPerceiver" in b)
    code = (ROOT / "docs" / "plugin_example.py").read_text().split('"""', 2)[2]
    assert block.split("\n", 1)[1].strip() == code.strip()
