"""Typed configs: presets, YAML, overrides, and errors that name the field."""
import pytest

from mmdialog import ConfigError, build, load_config
from mmdialog.core.config import dump_config


@pytest.mark.parametrize("preset", ["tiny", "paper", "paper-24gb"])
def test_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.model.perceiver.name == "qformer" and cfg.model.bridge.name == "gumbel"


def test_paper_preset_matches_the_reference_recipe():
    cfg = load_config("paper")
    lora = cfg.model.llm.options["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (32, 32, 0.1)
    assert cfg.train.lr == 5e-5 and cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 400
    assert cfg.data.batch_size * cfg.train.accumulate == 16
    # One micro-batch of 16, fully checkpointed, compiled: the fastest setting measured
    # under the reference's 29 GiB (benchmarks/results/h100-2026-11-26).
    assert cfg.data.batch_size == 16 and cfg.train.compile is True
    assert cfg.model.llm.options["gradient_checkpointing"] is True
    assert cfg.model.generator.options["gradient_checkpointing"] is True


def test_paper_24gb_preset_is_the_paper_preset_with_the_lean_switches():
    paper, lean = load_config("paper"), load_config("paper-24gb")
    assert lean.model.llm.options["base_quantization"] == "nf4" and lean.train.optimizer == "adamw8bit"
    assert lean.train.optimizer_8bit_groups == ["generator.unet"] and lean.train.offload_cached_encoders
    assert lean.data.batch_size * lean.train.accumulate == 16
    # Everything else is the paper's model and recipe.
    assert {**lean.model.llm.options, "base_quantization": "none"} == {**paper.model.llm.options,
                                                                       "base_quantization": "none"}
    assert lean.model.generator == paper.model.generator and lean.train.lr == paper.train.lr


def test_fsdp_with_dev_evaluation_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^config field 'train': dev evaluation generates replies outside FSDP's "
                                          r"sharded forward: with strategy fsdp set train.val_every 0"):
        load_config("tiny", {"train.strategy": "fsdp", "train.val_every": 5})
    assert load_config("tiny", {"train.strategy": "fsdp"}).train.val_every == 0


def test_paper_preset_without_checkpoints_fails_before_loading(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="llm 'meta-llama/Llama-2-7b-chat-hf' could not be loaded"):
        build("paper")


def test_switching_a_plugin_drops_the_old_options():
    cfg = load_config("tiny", bridge="text")
    assert cfg.model.bridge.name == "text" and cfg.model.bridge.options == {}
    same = load_config("tiny", bridge={"tau": 0.5})
    assert same.model.bridge.options["tau"] == 0.5 and same.model.bridge.options["alignment"] == "aligned"


def test_yaml_file_with_preset_and_dotted_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\ntrain:\n  lr: 0.001\nmodel:\n  bridge: {name: gumbel, alignment: bag}\n")
    cfg = load_config(f, {"train.max_steps": 7})
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 7
    assert cfg.model.bridge.options["alignment"] == "bag"
    assert cfg.model.llm.name == "hf"  # the rest comes from the preset
    assert load_config(dump_config(cfg) and cfg) == cfg


@pytest.mark.parametrize("overrides, field", [
    ({"train.lr": -1}, "train.lr"),
    ({"train.lrr": 1}, "train.lrr"),
    ({"model.image_loss_weight": "heavy"}, "model.image_loss_weight"),
    ({"model.bridge.tau": 0}, "model.bridge.tau"),
    ({"model.bridge.alignment": "diagonal"}, "model.bridge.alignment"),
    ({"model.bridge.tua": 1.0}, "model.bridge.tua"),
    ({"model.llm.lora.r": "eight"}, "model.llm.lora.r"),
    ({"data.batch_size": 0}, "data.batch_size"),
])
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(ConfigError, match=rf"config field '{field}'"):
        load_config("tiny", overrides)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; available: paper, paper-24gb, tiny \(or give a path"):
        load_config("huge")


def test_freeze_policy_is_applied_and_overridable(tiny):
    # The paper's policy, each group marked trainable_by_default by its plugin.
    assert tiny.trainable_groups == ["generator.unet", "llm.lora", "llm.new_token_rows", "perceiver.projection"]
    frozen = {n for n, p in tiny.named_parameters() if not p.requires_grad}
    assert any("vae" in n for n in frozen) and any("text_encoders" in n for n in frozen)
    assert any(n.startswith("perceiver.vision") for n in frozen)
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert all(("lora_" in n or n.endswith(".new") or n.startswith(("generator.unet", "perceiver.projection")))
               for n in trainable)
    assert tiny.summary()["llm"]["trainable"] < 0.01 * tiny.summary()["llm"]["params"]


def test_freeze_policy_override_and_typo():
    m = build("tiny", overrides={"model.trainable": {"generator.unet": False, "perceiver.qformer": True}})
    assert "generator.unet" not in m.trainable_groups and "perceiver.qformer" in m.trainable_groups
    assert not any(p.requires_grad for p in m.generator.parameters())
    with pytest.raises(ConfigError, match=r"model\.trainable\.generator\.unett.*no such parameter group"):
        build("tiny", overrides={"model.trainable": {"generator.unett": True}})


def test_a_generator_chain_keeps_the_trained_generators_options(tmp_path):
    """``--generator library,sd`` (with or without ``--library``) on a model trained with
    a configured sd keeps that sd's options: its path, steps, dtype."""
    trained = load_config("tiny", {"model.generator.num_inference_steps": 7, "model.generator.guidance_scale": 3.0})
    for swap in ("library,sd", {"name": "library", "folder": str(tmp_path), "fallback": {"name": "sd"}}):
        chained = load_config(trained, generator=swap)
        assert chained.model.retriever.name == "library" and chained.model.generator.name == "sd"
        assert chained.model.generator.options == trained.model.generator.options
    assert load_config(trained, generator="sd").model.retriever is None
