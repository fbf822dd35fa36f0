"""Lean switches that change the numerics: the frozen LLM base stored quantized
(torchao), float8 matmuls for it, 8-bit AdamW moments (bitsandbytes)."""
import sys
from pathlib import Path

import pytest
import torch

import mmdialog
from mmdialog import build
from mmdialog.core import quantization
from mmdialog.core.checkpoint import read_checkpoint, weights_digest
from mmdialog.core.errors import ConfigError, DependencyError
from mmdialog.core.training import build_optimizer, train

DEMO = Path(__file__).resolve().parents[1] / "mmdialog" / "core" / "data" / "demo" / "chat.jsonl"
# SmolLM2's shapes with 2 random-init decoder layers: its 30 real ones de-quantize too slowly on a CPU.
SMALL_LLM = {"model.llm.random_weights": True, "model.llm.config_overrides": {"num_hidden_layers": 2}}
QUANTIZED_TYPES = {"int8": "Int8Tensor", "nf4": "NF4Tensor", "float8": "Float8Tensor"}


def small(**over):
    return build("tiny", overrides={**SMALL_LLM, "train.lr": 1e-3, **over})


def losses_after_steps(model, dialogue, steps=2):
    """The loss of each of ``steps`` AdamW steps on one dialogue, dropout off, and
    whether every LoRA B matrix got a non-zero gradient in the first one."""
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    opt = build_optimizer(model, model.config.train)
    batch = model.collator([(dialogue, "1")])
    losses, lora_grads = [], []
    for _ in range(steps):
        torch.manual_seed(0)
        out = model(batch)
        out["loss"].backward()
        lora_grads = lora_grads or [p.grad.abs().sum() for n, p in model.named_parameters() if "lora_B" in n]
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    return torch.tensor(losses), bool(lora_grads) and all(g > 0 for g in lora_grads)


@pytest.fixture(scope="module")
def unquantized_losses(cat_dialogue_session):
    losses, _ = losses_after_steps(small(), cat_dialogue_session)
    return losses


# Measured relative loss differences after 2 steps: int8 ≤ 6e-4, float8 ≤ 6e-4, nf4 ≤ 3e-4 on these
# random weights (on the real 30-layer SmolLM2-135M: int8 1e-3, float8 3e-3, nf4 1.7e-2).
@pytest.mark.parametrize("scheme,rtol", [("int8", 3e-3), ("nf4", 1e-2),
                                         pytest.param("float8", 1e-2, marks=pytest.mark.slow)])
def test_quantized_base_stores_the_decoder_linears_quantized_and_trains_like_the_unquantized(
        scheme, rtol, unquantized_losses, cat_dialogue):
    model = small(**{"model.llm.base_quantization": scheme})
    decoder = model.llm.base_model.get_decoder()
    linears = quantization.base_linears(decoder)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert {type(lin.weight).__name__ for _, lin in linears} == {QUANTIZED_TYPES[scheme]}
    # LoRA adapters, embeddings, LM head and the new token rows stay plain and train.
    quantized = {n for n, p in model.named_parameters() if quantization.is_quantized(p)}
    assert quantized and all(".base_layer." in n or ".mlp." in n or "o_proj" in n for n in quantized)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in quantized)
    assert all(not quantization.is_quantized(p) for n, p in model.named_parameters() if p.requires_grad)
    losses, lora_learns = losses_after_steps(model, cat_dialogue)
    assert torch.isfinite(losses).all() and lora_learns
    assert losses[1] < losses[0]
    torch.testing.assert_close(losses, unquantized_losses, rtol=rtol, atol=0)


def test_quantized_base_checkpoints_exports_reloads_and_replies(tmp_path):
    overrides = {**SMALL_LLM, "model.llm.base_quantization": "int8", "data.path": str(DEMO), "data.split": "train",
                 "data.both_speakers": False, "train.max_steps": 1, "train.out_dir": str(tmp_path / "run"),
                 "train.warmup_steps": 0, "train.val_every": 0}
    model = build("tiny", overrides=overrides)
    train(model, progress=False)
    # Checkpoints hold the trainable weights only: no quantized tensor reaches them.
    weights, _, _ = read_checkpoint(tmp_path / "run")
    assert weights.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(type(w) is torch.Tensor for w in weights.values())
    model.save_pretrained(tmp_path / "export")
    for source in (tmp_path / "run", tmp_path / "export"):
        reloaded = mmdialog.load(source)  # quantized again from the config
        q_proj = reloaded.llm.base_model.get_decoder().layers[0].self_attn.q_proj.base_layer
        assert type(q_proj.weight).__name__ == "Int8Tensor"
        assert weights_digest(reloaded) == weights_digest(model)
    reply = reloaded.respond([mmdialog.Turn("user", "hi, how are you?")], max_new_tokens=4)
    assert isinstance(reply.text, str)


def test_training_a_quantized_base_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^config field 'model.trainable.llm.base': this group is stored "
                                          r"quantized \(model.llm.base_quantization\) and cannot train"):
        small(**{"model.llm.base_quantization": "int8", "model.trainable": {"llm.base": True}})


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
                    reason="this GPU runs float8 matmuls")
def test_float8_matmul_needs_a_recent_cuda_gpu():
    with pytest.raises(ConfigError) as err:
        build("tiny", overrides={"model.llm.float8_matmul": True})
    assert "\n" not in str(err.value)
    assert "model.llm.float8_matmul needs a CUDA GPU of compute capability 8.9 or newer" in str(err.value)


def test_float8_matmul_does_not_combine_with_a_quantized_base():
    with pytest.raises(ConfigError, match="float8_matmul casts the base weights itself"):
        mmdialog.load_config("tiny", {"model.llm.float8_matmul": True, "model.llm.base_quantization": "nf4"})


@pytest.fixture(scope="module")
def adamw8bit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw8bit")
    model = make_8bit(out, 2)
    train(model, progress=False)
    return out, model


def make_8bit(out_dir, steps):
    return small(**{"train.optimizer": "adamw8bit", "data.path": str(DEMO), "data.split": "train",
                    "data.both_speakers": False, "train.max_steps": steps, "train.out_dir": str(out_dir),
                    "train.checkpoint_every": 1, "train.warmup_steps": 2})


def test_adamw8bit_keeps_8bit_moments_for_the_unet_only(adamw8bit_run):
    out, model = adamw8bit_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # bitsandbytes' state loads safely
    (state,) = ckpt["optimizer_states"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unet = {id(p) for p in model.parameter_groups()["generator.unet"]}
    params = [p for p in model.parameters() if p.requires_grad]
    index = {i: p for i, p in enumerate(p for g in build_optimizer(model, model.config.train).param_groups
                                        for p in g["params"])}
    assert len(index) == len(names) == len(state["state"])
    bits = {8: 0, 32: 0}
    for i, s in state["state"].items():
        moments = s.get("__bnb_optimizer_quant_state__", s)
        p = index[i]
        big_unet = id(p) in unet and p.numel() >= 4096  # smaller tensors keep float32 moments
        assert moments["state1"].dtype == moments["state2"].dtype == (torch.uint8 if big_unet else torch.float32)
        bits[8 if big_unet else 32] += moments["state1"].numel() * moments["state1"].element_size()
    assert bits[8] > 0 and bits[32] > 0 and len(params) == len(index)
    assert [g["optim_bits"] for g in state["param_groups"]] == [8, 32]


@pytest.mark.slow
def test_adamw8bit_resume_reaches_the_same_weights(tmp_path, adamw8bit_run):
    _, full = adamw8bit_run
    train(make_8bit(tmp_path, 1), progress=False)
    resumed = make_8bit(tmp_path, 2)
    assert train(resumed, progress=False, resume=True).steps == 2
    assert weights_digest(resumed) == weights_digest(full)


def test_unknown_8bit_group_is_a_config_error(adamw8bit_run):
    _, model = adamw8bit_run
    cfg = model.config.train.model_copy(update={"optimizer_8bit_groups": ["generator.unnet"]})
    with pytest.raises(ConfigError, match="'train.optimizer_8bit_groups': no parameter group 'generator.unnet'"):
        build_optimizer(model, cfg)


def test_missing_lean_extra_is_one_line_naming_it(monkeypatch, adamw8bit_run):
    _, model = adamw8bit_run
    quantization._grouped_adamw_8bit.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(DependencyError, match=r"^train.optimizer: adamw8bit needs bitsandbytes: "
                                              r"pip install 'mmdialog\[lean\]'"):
        build_optimizer(model, model.config.train)
    quantization._grouped_adamw_8bit.cache_clear()
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(DependencyError, match=r"^model.llm.base_quantization: nf4 needs torchao.quantization: "
                                              r"pip install 'mmdialog\[lean\]'"):
        quantization.quantize_weights(torch.nn.Linear(64, 64), "nf4")
