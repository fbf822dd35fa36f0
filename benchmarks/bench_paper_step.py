"""Paper-scale training-step benchmark: the ``paper`` preset built through
``mmdialog.build`` with RANDOM weights at the real shapes (Llama-2-7B + LoRA,
BLIP-2 ViT-g + Q-Former, SD 2.1-base), trained for a few optimizer steps on
synthetic batches (B dialogues × 256 tokens with a 24-token description,
512² photos). Nothing is downloaded.

    python benchmarks/bench_paper_step.py --scale paper                       # the paper preset
    python benchmarks/bench_paper_step.py --scale paper --reference-recipe    # the authors' recipe
    python benchmarks/bench_paper_step.py --scale paper --sweep               # micro-batch × checkpointing
    python benchmarks/bench_paper_step.py --scale tiny --device cpu           # CPU check of the script
    python benchmarks/bench_paper_step.py --scale paper --optimizer adamw8bit --base-quantization nf4  # lean rows

The lean flags change the numerics, and the JSON records them: ``--optimizer
adamw8bit`` (the UNet's AdamW moments in 8 bits), ``--base-quantization
nf4|int8|float8`` (the frozen LLM decoder's weights stored quantized),
``--float8-matmul`` (its matmuls in float8; CUDA sm89+).

``--reference-recipe``: micro-batch 4, all rows of embed_tokens / lm_head
trained, LoRA weights in bf16 like every trained weight there, no perceiver
(the reference has none), the VAE encoding every photo every step, unfused
AdamW, eager, no autocast — the configuration of the reference's measured
table (benchmarks/results/h100-2026-11-26; with ``--accumulate 1``: that
table stepped the optimizer every micro-batch). Ours is the paper preset: micro-batch 16, every
LLM layer and UNet block checkpointed, compiled, bf16 autocast, fused AdamW;
it caches each photo's VAE posterior and its frozen ViT + Q-Former features
(the synthetic photos repeat every step, as photos do across epochs, so those
costs are the steady state after the first epoch).
Prints one JSON object: step time, dialogues/s, peak memory, counted FLOPs,
MFU against an assumed 989 TFLOP/s (H100/H200 dense bf16), time per component.

``--sweep`` builds the model once and measures each setting of SWEEP (or of
``--settings``: micro-batch, LLM checkpointing, UNet checkpointing) at 16
dialogues per optimizer step, then names the fastest one under
``--memory-cap`` GiB; with ``--compile`` every setting runs compiled. Step
times are taken without the component timer (its device syncs would stall
the launch queue); one more step with the timer gives the breakdown.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmdialog import build  # noqa: E402
from mmdialog.core import assets  # noqa: E402
from mmdialog.core.caching import offload  # noqa: E402
from mmdialog.core.collator import IGNORE, Batch  # noqa: E402
from mmdialog.core.training import build_optimizer, compile_repeated_blocks  # noqa: E402

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


#: --sweep settings: (micro-batch, LLM: checkpoint every k-th layer (0: none), UNet: checkpoint
#: all blocks / none / "outer" = the full-resolution ones, which hold most of its activations).
SWEEP = [(16, 1, True), (16, 1, "outer"), (16, 2, True), (16, 1, False), (16, 0, True),
         (16, 2, "outer"), (8, 1, False), (8, 0, True), (8, 0, False), (16, 0, False),
         (4, 0, False)]  # the reference's micro-batch, for a like-for-like row


def config(scale: str, reference: bool, grad_ckpt: bool, lora_dtype: str = "float32", optimizer: str = "adamw",
           base_quantization: str = "none", float8_matmul: bool = False, checkpoint_policy: str = "full") -> dict:
    paper = scale == "paper"
    return {
        "model": {
            "llm": {"name": "hf", "path": llama_sized_tokenizer(32000), "random_weights": True,
                    "config": LLAMA2_7B if paper else LLAMA_TINY, "dtype": "bfloat16" if paper else "float32",
                    "lora": {"r": 32, "alpha": 32, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj"],
                             "dtype": "model" if reference else lora_dtype},
                    "gradient_checkpointing": grad_ckpt, "checkpoint_policy": checkpoint_policy,
                    "base_quantization": base_quantization, "float8_matmul": float8_matmul},
            # Blip2Config() defaults are BLIP-2's ViT-g + Q-Former shapes.
            "perceiver": {"name": "caption"} if reference else
            {"name": "qformer", **({"config": {}, "dtype": "bfloat16"} if paper else {})},
            "bridge": {"name": "gumbel"},
            # The reference encodes every photo with the VAE at every step; we cache the
            # posterior of each photo (multi-epoch training pays the VAE once per photo).
            "generator": {"name": "sd", "dtype": "bfloat16" if paper else "float32",
                          "gradient_checkpointing": grad_ckpt, "checkpoint_policy": checkpoint_policy,
                          "latent_cache": not reference,
                          **({"unet": SD21_UNET, "vae": SD21_VAE, "text_encoder": SD21_TEXT} if paper else {})},
            "trainable": {"llm.embeddings": True} if reference else {},
            "max_length": 256,
        },
        "train": {"optimizer": optimizer, "lr": 5e-5, "weight_decay": 0.01, "fused_optimizer": not reference},
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
        photo_keys=[f"synthetic-seen-photo-{i}" for i in range(b if k else 0)],
        desc_index=torch.arange(b), desc_start=torch.full((b,), start), desc_len=torch.full((b,), desc),
        desc_pixels=torch.rand(b, 3, res, res, generator=g), desc_has_image=torch.ones(b, dtype=torch.bool),
        desc_keys=[f"synthetic-photo-{i}" for i in range(b)],
        shares_photo=torch.ones(b, dtype=torch.bool)).to(device)


class ComponentTimer:
    """Forward time of each component (hooks + device sync) while ``enabled``."""

    def __init__(self, model, device) -> None:
        self.device, self.times, self._start, self.enabled = device, {}, {}, False
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
        if self.enabled:
            self.sync()
            self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        if self.enabled and name in self._start:
            self.sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._start.pop(name)


def stored_bytes(p: torch.Tensor) -> int:
    """Bytes a weight takes as stored: a quantized one (torchao subclass) counts its inner tensors."""
    if hasattr(p, "__tensor_flatten__"):
        names, _ = p.__tensor_flatten__()
        return sum(stored_bytes(getattr(p, n)) for n in names)
    return p.numel() * p.element_size()


def set_checkpointing(model, llm_every: bool | int, unet_blocks: bool | str) -> None:
    model.llm.set_gradient_checkpointing(llm_every, model.llm.options.checkpoint_policy)
    unet = model.generator.unet
    outer = ["down_blocks.0", f"up_blocks.{len(unet.up_blocks) - 1}"]
    model.generator.set_gradient_checkpointing(outer if unet_blocks == "outer" else unet_blocks,
                                               model.generator.options.checkpoint_policy)


def count_flops(model, one) -> float:
    """FLOPs of forward + backward for one dialogue, checkpointing off (MFU counts no recompute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(one)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def optimizer_step(model, opt, batch, acc: int, timer: ComponentTimer,
                   autocast: bool = False) -> tuple[torch.Tensor, float]:
    """``acc`` micro-batches, then the optimizer: the last loss and the optimizer's seconds.
    ``autocast``: the forward under bf16 autocast, as Lightning's ``bf16-mixed`` runs it."""
    for _ in range(acc):
        with torch.autocast(timer.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        (out["loss"] / acc).backward()
    timer.sync()
    start = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    timer.sync()
    return out["loss"].detach(), time.perf_counter() - start


def measure(model, opt, batch, acc: int, steps: int, warmup: int, timer: ComponentTimer,
            flops_per_dialogue: float, autocast: bool = False) -> dict:
    """Median optimizer-step time and peak memory, then one timed breakdown step."""
    device, mb = timer.device, len(batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reserved peak then belongs to this setting alone
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        timer.sync()
        start = time.perf_counter()
        loss, _ = optimizer_step(model, opt, batch, acc, timer, autocast)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(round(loss.item(), 4))
    step = statistics.median(times)
    timer.times.clear()
    timer.enabled = True
    timer.sync()
    start = time.perf_counter()
    _, opt_s = optimizer_step(model, opt, batch, acc, timer, autocast)
    breakdown = time.perf_counter() - start
    timer.enabled = False
    fwd = {f"{k}_fwd": round(timer.times.get(k, 0.0), 4) for k in timer.names}
    flops = flops_per_dialogue * mb * acc
    return {
        "micro_batch": mb, "accumulate": acc, "dialogues_per_step": mb * acc,
        "step_s": round(step, 4), "micro_step_s": round(step / acc, 4), "dialogues_per_s": round(mb * acc / step, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device.type == "cuda" else None,
        "flops_per_step": flops, "mfu": round(flops / step / PEAK_FLOPS, 4),
        "seconds_per_step": {**fwd, "backward_and_rest": round(breakdown - opt_s - sum(fwd.values()), 4),
                             "optimizer": round(opt_s, 4), "breakdown_step": round(breakdown, 4)},
        "losses": losses, "oom": False,
    }


def run_setting(model, opt, args, device, timer, flops_per_dialogue, mb, acc, llm_every, unet_blocks) -> dict:
    setting = {"llm_checkpoint_every": llm_every, "unet_checkpoint": unet_blocks}
    set_checkpointing(model, llm_every, unet_blocks)
    try:
        batch = synthetic_batch(model, mb, args.seq, args.desc, device)
        return {**setting, **measure(model, opt, batch, acc, args.steps, args.warmup, timer, flops_per_dialogue,
                                     args.autocast)}
    except torch.OutOfMemoryError:
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return {**setting, "micro_batch": mb, "accumulate": acc, "oom": True, "peak_memory_gib": peak}


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
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="every LLM layer and UNet block; default: on for ours (the paper preset), off "
                         "for --reference-recipe")
    ap.add_argument("--sweep", action="store_true", help="measure every setting of SWEEP in this process")
    ap.add_argument("--settings", type=parse_settings, default=None,
                    help="with --sweep, instead of SWEEP: MB:LLM_EVERY:UNET,... e.g. 16:1:all,16:0:outer "
                         "(UNET: all, outer or none)")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="forward under bf16 autocast (Lightning's bf16-mixed, as the paper preset trains) on "
                         "top of the components' own dtypes; default: on for ours, off for --reference-recipe")
    ap.add_argument("--lora-dtype", choices=["float32", "model"], default="float32",
                    help="llm.lora.dtype of our recipe (the reference recipe's is the model's, bf16)")
    # The lean rows: each changes the numerics (model.llm.base_quantization / float8_matmul, train.optimizer).
    ap.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                    help="adamw8bit: the UNet's AdamW moments in 8 bits (bitsandbytes), the others float32")
    ap.add_argument("--base-quantization", choices=["none", "nf4", "int8", "float8"], default="none",
                    help="the frozen LLM decoder's Linear weights stored quantized (torchao, weight-only)")
    ap.add_argument("--float8-matmul", action="store_true",
                    help="the frozen LLM decoder's matmuls in float8 (torchao Float8Linear; CUDA sm89+)")
    ap.add_argument("--checkpoint-policy", choices=["full", "save_matmuls"], default="full",
                    help="what a checkpointed LLM layer / UNet block keeps (eager blocks; compiled ones follow "
                         "--activation-memory-budget)")
    ap.add_argument("--activation-memory-budget", type=float, default=None,
                    help="with --compile: torch's activation memory budget (0-1) for the compiled blocks")
    ap.add_argument("--offload", action="store_true",
                    help="fill the per-photo caches, then move the frozen ViT, Q-Former and VAE to the CPU "
                         "(train.offload_cached_encoders after the first epoch)")
    ap.add_argument("--dialogues", type=int, default=16, help="per optimizer step, with --sweep")
    ap.add_argument("--memory-cap", type=float, default=29.0, help="GiB, with --sweep: the reference's peak")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="regional torch.compile (train.compile) before the first step; default: on for ours "
                         "(the paper preset), off for --reference-recipe")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)

    for switch in ("gradient_checkpointing", "compile", "autocast"):  # the paper preset's settings
        if getattr(args, switch) is None:
            setattr(args, switch, not args.reference_recipe)
    t0 = time.perf_counter()
    model = build(config(args.scale, args.reference_recipe, args.gradient_checkpointing, args.lora_dtype,
                         args.optimizer, args.base_quantization, args.float8_matmul, args.checkpoint_policy),
                  device=device)
    model.train()
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, model.config.train)
    fused = bool(opt.defaults.get("fused"))
    timer = ComponentTimer(model, device)
    result = {"scale": args.scale, "recipe": "reference" if args.reference_recipe else "mmdialog-default",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "seq": args.seq, "desc_tokens": args.desc, "fused_adamw": fused, "build_s": round(build_s, 2),
              "trainable_params": sum(p.numel() for p in params), "torch": torch.__version__,
              "lora_dtype": "model" if args.reference_recipe else args.lora_dtype, "compiled": args.compile,
              "autocast": args.autocast,
              # What changes numerically: the frozen base's weights / matmuls, the optimizer's moments.
              "optimizer": args.optimizer, "optimizer_8bit_groups": model.config.train.optimizer_8bit_groups
              if args.optimizer == "adamw8bit" else [], "base_quantization": args.base_quantization,
              "float8_matmul": args.float8_matmul,
              # What keeps the numerics: where the frozen encoders live, what checkpointing keeps.
              "offload": args.offload, "checkpoint_policy": args.checkpoint_policy,
              "activation_memory_budget": args.activation_memory_budget,
              "frozen_llm_weight_gib": round(sum(stored_bytes(p) for p in model.llm.parameters()
                                                 if not p.requires_grad) / 2**30, 3)}
    ckpt = args.gradient_checkpointing
    set_checkpointing(model, False, False)
    flops = count_flops(model, synthetic_batch(model, 1, args.seq, args.desc, device))
    result["flops_per_dialogue"] = flops
    if args.offload:
        # One forward fills the caches of every synthetic photo (each batch's photos are a
        # prefix of the largest one's), as the first epoch fills them for real photos.
        model(synthetic_batch(model, max(mb for mb, _, _ in args.settings or SWEEP) if args.sweep else
                              args.micro_batch or 16, args.seq, args.desc, device))
        offload([m for part in (model.perceiver, model.generator) for m in part.cached_encoders()])
    if args.compile:
        # Settings switch checkpointing and micro-batch: each may recompile, and past the
        # default limit dynamo would fall back to eager without a word.
        torch._dynamo.config.recompile_limit = 64
        if args.activation_memory_budget is not None:
            torch._functorch.config.activation_memory_budget = args.activation_memory_budget
        result["compiled_blocks"] = compile_repeated_blocks(model)
    if args.sweep:
        rows = []
        result.update({"memory_cap_gib": args.memory_cap, "sweep": rows})
        for mb, llm_every, unet_blocks in args.settings or SWEEP:
            mb = min(mb, args.dialogues)
            rows.append(run_setting(model, opt, args, device, timer, flops, mb, max(1, args.dialogues // mb),
                                    llm_every, unet_blocks))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(result, args.json)  # kept if a later setting outlasts the caller's time limit
        fits = [r for r in rows if not r["oom"] and (r["peak_memory_gib"] or 0) <= args.memory_cap]
        result["best_under_cap"] = max(fits, key=lambda r: r["dialogues_per_s"]) if fits else None
    else:
        mb = args.micro_batch or (4 if args.reference_recipe else 16)
        acc = args.accumulate or max(1, 16 // mb)
        result.update(run_setting(model, opt, args, device, timer, flops, mb, acc, ckpt, ckpt))
    states = {id(v): v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)}  # qmaps shared
    result["optimizer_state_gib"] = round(sum(stored_bytes(v) for v in states.values()) / 2**30, 3)
    print(write(result, args.json))


def parse_settings(text: str) -> list[tuple[int, int, bool | str]]:
    unet = {"all": True, "outer": "outer", "none": False}
    try:
        rows = [part.split(":") for part in text.split(",")]
        return [(int(mb), int(every), unet[blocks]) for mb, every, blocks in rows]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MB:LLM_EVERY:UNET,... with UNET one of "
                                         "all, outer, none (e.g. 16:1:all,16:0:outer)") from None


def write(result: dict, path: str | None) -> str:
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
