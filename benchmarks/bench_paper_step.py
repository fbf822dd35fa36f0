"""Paper-scale training-step benchmark: the ``paper`` preset built through
``mmdialog.build`` with RANDOM weights at the real shapes (Llama-2-7B + LoRA,
BLIP-2 ViT-g + Q-Former, SD 2.1-base), trained for a few optimizer steps on
synthetic batches (B dialogues × 256 tokens with a 24-token description,
512² photos). Nothing is downloaded.

    python benchmarks/bench_paper_step.py --scale paper                       # our default recipe
    python benchmarks/bench_paper_step.py --scale paper --reference-recipe    # the authors' recipe
    python benchmarks/bench_paper_step.py --scale tiny --device cpu           # CPU check of the script

``--reference-recipe``: micro-batch 4 × accumulation 4, all rows of
embed_tokens / lm_head trained, no perceiver (the reference has none), the
VAE encoding every photo every step, unfused AdamW — the configuration
measured in ../shared/measurements. The default recipe caches each photo's
VAE posterior (the synthetic photos repeat every step, as photos do across
epochs, so its VAE cost is the steady state after the first epoch).
Prints one JSON object: step time, dialogues/s, peak memory, counted FLOPs,
MFU against an assumed 989 TFLOP/s (H100/H200 dense bf16), time per component.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmdialog import build  # noqa: E402
from mmdialog.core import assets  # noqa: E402
from mmdialog.core.data.collate import IGNORE, Batch  # noqa: E402

PEAK_FLOPS = 989e12
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2)
LLAMA_TINY = dict(LLAMA2_7B, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
# stabilityai/stable-diffusion-2-1-base: unet/, vae/, text_encoder/ configs
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, norm_num_groups=32)
SD21_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def llama_sized_tokenizer(n: int) -> str:
    """A real byte-level BPE (SmolLM2's) cut to its first ``n`` tokens, so the
    LLM's vocabulary has Llama-2's size. Written once under the cache dir."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = assets.cache_dir() / f"bpe-{n}"
    if (folder / "tokenizer.json").exists():
        return str(folder)
    src = assets.smollm2_folder()
    data = json.loads((src / "tokenizer.json").read_text())
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < n}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if (m if isinstance(m, list) else m.split(" "))[0] in vocab
                               and (m if isinstance(m, list) else m.split(" "))[1] in vocab
                               and "".join(m if isinstance(m, list) else m.split(" ")) in vocab]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    base = AutoTokenizer.from_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=base.eos_token,
                            bos_token=base.bos_token, chat_template=base.chat_template).save_pretrained(folder)
    return str(folder)


def config(scale: str, reference: bool, grad_ckpt: bool) -> dict:
    paper = scale == "paper"
    return {
        "model": {
            "llm": {"name": "hf", "path": llama_sized_tokenizer(32000), "random_weights": True,
                    "config": LLAMA2_7B if paper else LLAMA_TINY, "dtype": "bfloat16" if paper else "float32",
                    "lora": {"r": 32, "alpha": 32, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj"]},
                    "gradient_checkpointing": grad_ckpt},
            # Blip2Config() defaults are BLIP-2's ViT-g + Q-Former shapes.
            "perceiver": {"name": "caption"} if reference else {"name": "qformer", **({"config": {}} if paper else {})},
            "bridge": {"name": "gumbel"},
            # The reference encodes every photo with the VAE at every step; we cache the
            # posterior of each photo (multi-epoch training pays the VAE once per photo).
            "generator": {"name": "sd", "dtype": "bfloat16" if paper else "float32",
                          "gradient_checkpointing": grad_ckpt, "latent_cache": not reference,
                          **({"unet": SD21_UNET, "vae": SD21_VAE, "text_encoder": SD21_TEXT} if paper else {})},
            "trainable": {"llm.embeddings": True} if reference else {},
            "max_length": 256,
        },
    }


def synthetic_batch(model, b: int, seq: int, desc: int, device) -> Batch:
    """B dialogues × ``seq`` tokens: text, then ``[img]`` + ``desc`` tokens + ``[/img]``
    in the agent's turn, then (with a pixel perceiver) K slots of a perceived photo."""
    llm, k = model.llm, model.perceiver.num_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, llm.base_vocab, (b, seq), generator=g)
    start = seq // 2
    ids[:, start - 1] = llm.img_open_id
    ids[:, start + desc] = llm.img_close_id
    if k:
        ids[:, start + desc + 1:start + desc + 1 + k] = llm.image_token_id
    labels = ids.clone()
    labels[ids == llm.image_token_id] = IGNORE
    res, p = model.generator.resolution, model.perceiver.image_size
    return Batch(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
        photo_slots=torch.tensor([[i, start + desc + 1] for i in range(b)] if k else [], dtype=torch.long).view(-1, 2),
        photo_pixels=torch.rand(b if k else 0, 3, p, p, generator=g),
        desc_index=torch.arange(b), desc_start=torch.full((b,), start), desc_len=torch.full((b,), desc),
        desc_pixels=torch.rand(b, 3, res, res, generator=g), desc_has_image=torch.ones(b, dtype=torch.bool),
        desc_keys=[f"synthetic-photo-{i}" for i in range(b)],
        shares_photo=torch.ones(b, dtype=torch.bool)).to(device)


class ComponentTimer:
    """Forward time of each component (hooks + device sync); backward = the rest."""

    def __init__(self, model, device) -> None:
        self.device, self.times, self._start = device, {}, {}
        gen = model.generator
        # The towers and the VAE are called through their parts (encode_text_tower, vae.encode).
        parts = {"llm": model.llm, "perceiver": model.perceiver, "bridge": model.bridge,
                 "text_encoder": getattr(gen.text_encoders[0], "text_model", gen.text_encoders[0]).encoder,
                 "vae_encode": gen.vae.encoder, "unet": gen.unet}
        self.names = list(parts)
        for name, mod in parts.items():
            mod.register_forward_pre_hook(lambda m, a, n=name: self._begin(n))
            mod.register_forward_hook(lambda m, a, o, n=name: self._end(n))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _begin(self, name: str) -> None:
        self.sync()
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._start.pop(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--reference-recipe", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: 4 (reference) / 16")
    ap.add_argument("--accumulate", type=int, default=None, help="default: 16 dialogues per optimizer step")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--desc", type=int, default=24)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    mb = args.micro_batch or (4 if args.reference_recipe else 16)
    acc = args.accumulate or max(1, 16 // mb)

    t0 = time.perf_counter()
    model = build(config(args.scale, args.reference_recipe, args.gradient_checkpointing)).to(device)
    model.train()
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    fused = (not args.reference_recipe) and device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=fused or None)
    batch = synthetic_batch(model, mb, args.seq, args.desc, device)
    timer = ComponentTimer(model, device)
    result = {"scale": args.scale, "recipe": "reference" if args.reference_recipe else "mmdialog-default",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "micro_batch": mb, "accumulate": acc, "dialogues_per_step": mb * acc, "seq": args.seq,
              "desc_tokens": args.desc, "gradient_checkpointing": args.gradient_checkpointing,
              "fused_adamw": fused, "build_s": round(build_s, 2),
              "trainable_params": sum(p.numel() for p in params), "oom": False}
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:  # one micro-batch, forward + backward
            model(batch)["loss"].backward()
        opt.zero_grad(set_to_none=True)
        flops_step = fc.get_total_flops() * acc
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps, parts, opt_times, losses = [], [], [], []
        for i in range(args.warmup + args.steps):
            timer.times.clear()
            timer.sync()
            start = time.perf_counter()
            for _ in range(acc):
                out = model(batch)
                (out["loss"] / acc).backward()
            timer.sync()
            t_opt = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            timer.sync()
            end = time.perf_counter()
            if i >= args.warmup:
                steps.append(end - start)
                opt_times.append(end - t_opt)
                parts.append(dict(timer.times))
                losses.append(out["loss"].detach().item())
        step = statistics.median(steps)
        fwd = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in timer.names}
        fwd_total = sum(fwd.values())
        result.update({
            "step_s": round(step, 4), "dialogues_per_s": round(mb * acc / step, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "flops_per_step": flops_step, "mfu": round(flops_step / step / PEAK_FLOPS, 4),
            "mfu_assumed_peak_flops": PEAK_FLOPS,
            "seconds_per_step": {**{f"{k}_fwd": round(v, 4) for k, v in fwd.items()},
                                 "backward_and_rest": round(step - statistics.median(opt_times) - fwd_total, 4),
                                 "optimizer": round(statistics.median(opt_times), 4)},
            "losses": [round(x, 4) for x in losses],
        })
    except torch.OutOfMemoryError:
        result.update({"oom": True, "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
