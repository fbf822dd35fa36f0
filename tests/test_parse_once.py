"""Parse once, check once: one ``mmdialog train`` validates its config once (the
config model and every plugin's options), one chat reply parses its generation
options once. Counted in-process around the one validating entry point of each."""
import pytest
from typer.testing import CliRunner

from mmdialog.core import config as config_module
from mmdialog.core.config import Config
from mmdialog.core.reply import GenerationOptions
from mmdialog.sdk.cli import app


def count_calls(monkeypatch, owner, name: str, classmethod_: bool = False) -> list[int]:
    """Wrap ``owner.name`` (the real one still runs) and count its calls."""
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    if classmethod_:  # ``real`` is bound to owner already: drop the class the descriptor passes
        monkeypatch.setattr(owner, name, classmethod(lambda cls, *a, **k: counted(*a, **k)))
    else:
        monkeypatch.setattr(owner, name, counted)
    return calls


def test_the_counters_count(monkeypatch):
    configs = count_calls(monkeypatch, Config, "model_validate", classmethod_=True)
    plugins = count_calls(monkeypatch, config_module, "validate_plugins")
    cfg = config_module.load_config("tiny")
    assert (len(configs), len(plugins)) == (1, 1)
    assert config_module.load_config(cfg) is cfg and (len(configs), len(plugins)) == (1, 1)
    config_module.load_config(cfg, {"train.lr": 1e-3})  # something to apply: validated again
    assert (len(configs), len(plugins)) == (2, 2)
    options = count_calls(monkeypatch, GenerationOptions, "model_validate", classmethod_=True)
    GenerationOptions.parse({"max_new_tokens": 3})
    assert len(options) == 1


@pytest.mark.slow
def test_one_train_validates_its_config_once(monkeypatch, tmp_path):
    configs = count_calls(monkeypatch, Config, "model_validate", classmethod_=True)
    plugins = count_calls(monkeypatch, config_module, "validate_plugins")
    out = CliRunner().invoke(app, ["train", "--max-steps", "1", "--batch-size", "1", "--quiet",
                                   "--out-dir", str(tmp_path / "run"), "--set", "train.checkpoint_every=1"])
    assert out.exit_code == 0, out.output
    assert "step    1" in out.output
    assert (len(configs), len(plugins)) == (1, 1)


@pytest.mark.slow
def test_one_chat_reply_parses_its_generation_options_once(monkeypatch, tmp_path):
    parsed = count_calls(monkeypatch, GenerationOptions, "model_validate", classmethod_=True)
    out = CliRunner().invoke(app, ["chat", "tiny", "-m", "hello there", "--max-new-tokens", "4",
                                   "--photos-dir", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    assert '"text"' in out.output
    assert len(parsed) == 1
