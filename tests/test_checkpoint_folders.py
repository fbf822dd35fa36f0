"""Every plugin loads real checkpoint folders: tiny models written by
``save_pretrained`` in the exact layouts of Llama-2, BLIP-2, SD 2.1 and SDXL."""
import pytest
import torch

from mmdialog import ConfigError, build
from mmdialog.core.interfaces import BuildContext
from mmdialog.plugins.generators.sd import SDGenerator, SDOptions
from mmdialog.plugins.generators.sdxl import SDXLGenerator, SDXLOptions
from mmdialog.plugins.perceivers.qformer import TINY_BLIP2, QFormerOptions, QFormerPerceiver


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tiny):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mmdialog.core import assets

    folder = tmp_path_factory.mktemp("llama")
    tok = AutoTokenizer.from_pretrained(assets.smollm2_folder())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_llama_folder_loads_with_lora(llama_folder, cat_dialogue):
    from safetensors.torch import load_file

    m = build("tiny", overrides={"model.llm.path": str(llama_folder), "model.llm.lora.targets": ["q_proj", "v_proj"]})
    assert m.llm.hidden_size == 32
    saved = load_file(str(llama_folder / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(m.llm.base_model.model.layers[0].mlp.up_proj.weight, saved)
    assert sum("lora_" in n for n, _ in m.llm.named_parameters()) == 2 * 2 * 2
    out = m(m.collator([(cat_dialogue, "1")]))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("lora_dtype, expected", [("float32", torch.float32), ("model", torch.bfloat16)])
def test_lora_weights_in_float32_or_the_models_dtype(llama_folder, cat_dialogue, lora_dtype, expected):
    m = build("tiny", overrides={"model.llm.path": str(llama_folder), "model.llm.dtype": "bfloat16",
                                 "model.llm.lora.dtype": lora_dtype})
    lora = {p.dtype for n, p in m.llm.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in m.llm.named_parameters() if "lora_" not in n and "layers" in n}
    assert lora == {expected} and base == {torch.bfloat16}
    m(m.collator([(cat_dialogue, "1")]))["loss"].backward()
    grads = [p.grad for n, p in m.llm.named_parameters() if "lora_B" in n]
    assert all(g is not None and g.dtype == expected for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_blip2_folder_loads_vision_and_qformer_only(tmp_path, tiny):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    text = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                     word_embed_proj_dim=32)
    cfg = Blip2Config(vision_config=TINY_BLIP2["vision_config"], qformer_config=TINY_BLIP2["qformer_config"],
                      text_config=text.to_dict(), num_query_tokens=6)
    torch.manual_seed(2)
    blip = Blip2ForConditionalGeneration(cfg)
    blip.save_pretrained(tmp_path)
    p = QFormerPerceiver.from_options(QFormerOptions(path=str(tmp_path)), BuildContext(llm=tiny.llm))
    assert p.num_tokens == 6
    assert torch.equal(p.query_tokens, blip.query_tokens)
    assert torch.equal(p.vision.embeddings.patch_embedding.weight, blip.vision_model.embeddings.patch_embedding.weight)
    q = dict(blip.qformer.named_parameters())
    assert all(torch.equal(v, q[k]) for k, v in p.qformer.named_parameters())
    px = torch.rand(2, 3, 80, 80)
    out = p.eval()(px)  # eval: no Q-Former dropout
    assert out.shape == (2, 6, tiny.llm.hidden_size)
    # Half precision (the paper preset): the frozen parts in bf16, the new projection float32.
    half = QFormerPerceiver.from_options(QFormerOptions(path=str(tmp_path), dtype="bfloat16"),
                                         BuildContext(llm=tiny.llm)).eval()
    assert half.vision.dtype == half.query_tokens.dtype == next(half.qformer.parameters()).dtype == torch.bfloat16
    half.projection.load_state_dict(p.projection.state_dict())
    assert half.projection.weight.dtype == torch.float32
    assert torch.allclose(half(px), out, atol=0.1 * out.abs().max().item())


def test_sd_folder_loads(tmp_path, tiny):
    from diffusers import StableDiffusionPipeline

    g = tiny.generator
    StableDiffusionPipeline(vae=g.vae, text_encoder=g.text_encoders[0], tokenizer=g.tokenizers[0], unet=g.unet,
                            scheduler=g.sample_scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path)
    loaded = SDGenerator(SDOptions(path=str(tmp_path)))
    for a, b in [(loaded.unet, g.unet), (loaded.vae, g.vae), (loaded.text_encoders, g.text_encoders)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert loaded.resolution == g.resolution == 64
    assert type(loaded.sample_scheduler).__name__ == "DDIMScheduler"
    m = build("tiny", overrides={"model.generator.path": str(tmp_path)})
    ids = torch.tensor([m.llm.tokenizer(" a cat")["input_ids"]])
    prompts = m.bridge(ids, torch.ones_like(ids, dtype=torch.bool))
    img = m.generator.generate(m.generator.encode(prompts), num_inference_steps=2, seed=0)[0].image
    assert img.size == (64, 64)


def test_sdxl_tiny_and_folder(tmp_path, tiny, cat_dialogue):
    from diffusers import StableDiffusionXLPipeline

    m = build("tiny", generator="sdxl")
    g = m.generator
    assert len(g.text_towers) == 2 and g.tokenizers[1].pad_token == "!"
    out = m(m.collator([(cat_dialogue, "1")]))
    out["image_loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.llm.named_parameters() if "lora_B" in n)
    StableDiffusionXLPipeline(vae=g.vae, text_encoder=g.text_encoders[0], text_encoder_2=g.text_encoders[1],
                              tokenizer=g.tokenizers[0], tokenizer_2=g.tokenizers[1], unet=g.unet,
                              scheduler=g.sample_scheduler, add_watermarker=False).save_pretrained(tmp_path)
    loaded = SDXLGenerator(SDXLOptions(path=str(tmp_path)))
    assert all(torch.equal(x, y) for x, y in zip(loaded.unet.state_dict().values(), g.unet.state_dict().values()))
    assert loaded.tokenizers[1].pad_token == "!"
    cond = loaded.encode(loaded.text_prompts(["a cat"]))
    assert cond["prompt_embeds"].shape == (1, 77, 96) and cond["pooled"].shape == (1, 32)
    assert loaded.generate(cond, num_inference_steps=2, seed=0)[0].image.size == (64, 64)


@pytest.mark.parametrize("override, message", [
    ({"model.llm.path": "/nonexistent/llama"}, "llm: folder '/nonexistent/llama' does not exist"),
    ({"model.perceiver.path": "/nonexistent/blip2"}, "perceiver qformer: folder '/nonexistent/blip2' does not exist"),
    ({"model.generator.path": "/nonexistent/sd"}, "generator sd: folder '/nonexistent/sd' does not exist"),
])
def test_missing_folders_fail_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        build("tiny", overrides=override)
    assert "\n" not in str(e.value)


def test_folder_missing_files_names_them(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match=r"missing unet/config\.json, vae/config\.json"):
        SDGenerator(SDOptions(path=str(tmp_path)))
