"""Paper-scale reply latency: the model of ``bench_paper_step.py`` (Llama-2-7B + LoRA,
BLIP-2 Q-Former, SD 2.1-base at 512², random weights, built through ``mmdialog.build``)
answering 1 session and N sessions batched. Nothing is downloaded.

    python benchmarks/bench_paper_reply.py --scale paper            # one GPU, about 3 minutes
    python benchmarks/bench_paper_reply.py --scale tiny --device cpu

Times (median of ``--repeats`` after ``--warmup`` runs; compiling happens in the warm-up):
time-to-first-token (the prompt's prefill and one token), time-to-text (``--tokens`` new
tokens, no early stop: random weights would stop anywhere) and time-to-photo (one photo a
session, ``--steps`` denoising steps at guidance ``--guidance``, VAE decode included).
Rows: ``baseline`` (plain HF ``generate`` on the same LLM, dynamic cache, eager; diffusers'
``StableDiffusionPipeline`` from text with the folder's scheduler, eager), one row per
lever alone (``--per-lever``), and ``ours`` (every lever on). ``throughput_ratio``: replies/s
of N sessions batched over replies/s of one (a reply: its text and one photo; ``_text``:
the text alone). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper_step import config, write  # noqa: E402

from mmdialog import Turn, build  # noqa: E402
from mmdialog.core.model import _left_pad  # noqa: E402
from mmdialog.plugins.bases.latent_diffusion import load_schedulers  # noqa: E402

DESCRIPTION = "a tabby cat asleep on a sunny wooden windowsill next to a pot of basil"
OPENINGS = ["hi! what did you do this weekend?", "any plans for the holidays this year?",
            "I just got back from the beach", "have you tried that new ramen place downtown?",
            "my sister adopted a kitten yesterday", "what are you reading at the moment?",
            "we finally finished painting the kitchen", "look what I baked this morning"]


def histories(n: int) -> list[list[Turn]]:
    """N different short dialogues (different lengths: the batch is left-padded)."""
    return [[Turn("user", OPENINGS[i % len(OPENINGS)]), Turn("assistant", "oh nice, tell me more!"),
             Turn("user", "sure, let me show you a photo of it" + " too" * (i % 3))] for i in range(n)]


class Clock:
    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median(self, fn: Callable[[], object]) -> float:
        times = []
        for i in range(self.warmup + self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            if i >= self.warmup:
                times.append(time.perf_counter() - start)
        return round(statistics.median(times), 4)


def text_fn(model, sessions: int, tokens: int, plain: bool) -> Callable[[], object]:
    """The first piece of ``respond_batch``: prompts → embeddings → left-padded batch →
    ``tokens`` new tokens. ``plain``: transformers' ``generate`` with its defaults."""
    llm, device = model.llm, next(model.parameters()).device

    def run():
        emb, mask = _left_pad([model.input_embeddings(model.collator.prompt(h, "assistant").to(device))[0]
                               for h in histories(sessions)])                 # (B, T, D), (B, T)
        if plain:
            return llm.model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, pad_token_id=llm.pad_token_id)
        return llm.generate(emb, mask, max_new_tokens=tokens, min_new_tokens=tokens)

    return run


def photo_fn(model, sessions: int, steps: int, guidance: float, plain: bool) -> Callable[[], object]:
    """One photo per session from the description. ``plain``: ``StableDiffusionPipeline``
    from the text, with the folder's scheduler (random init: ``load_schedulers``)."""
    gen = model.generator
    texts = [DESCRIPTION] * sessions
    if plain:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=gen.vae, text_encoder=gen.text_encoders[0], tokenizer=gen.tokenizers[0],
                                       unet=gen.unet, scheduler=load_schedulers(gen.folder)[1], safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(texts, num_inference_steps=steps, guidance_scale=guidance, height=gen.resolution,
                            width=gen.resolution, generator=torch.Generator().manual_seed(0)).images
    return lambda: gen.generate(gen.encode(gen.text_prompts(texts)), num_inference_steps=steps,
                                guidance_scale=guidance, seed=0)


def set_levers(model, kv_cache: str = "dynamic", compile_decode: bool = False, scheduler: str = "default",
               compile_unet: bool = False) -> None:
    """The library options, switched on the built model (one build at 7B is enough)."""
    llm, gen = model.llm, model.generator
    llm.options = llm.options.model_copy(update={"kv_cache": kv_cache, "compile_decode": compile_decode})
    gen.options = gen.options.model_copy(update={"scheduler": scheduler, "compile_unet": compile_unet})
    gen.sample_scheduler = load_schedulers(gen.folder, scheduler)[1]


def row(clock: Clock, model, args, sessions: int, plain: bool = False, text: bool = True,
        photo: bool = True) -> dict:
    out: dict = {"sessions": sessions}
    if text:
        out["ttft_s"] = clock.median(text_fn(model, sessions, 1, plain))
        out["text_s"] = clock.median(text_fn(model, sessions, args.tokens, plain))
    if photo:
        out["photo_s"] = clock.median(photo_fn(model, sessions, args.steps, args.guidance, plain))
    if text and photo:
        out["replies_per_s"] = round(sessions / (out["text_s"] + out["photo_s"]), 3)
    if text:
        out["texts_per_s"] = round(sessions / out["text_s"], 3)
    return out


def pair(clock: Clock, model, args, plain: bool = False) -> dict:
    """1 session and N batched, with the throughput ratios."""
    one, many = row(clock, model, args, 1, plain), row(clock, model, args, args.sessions, plain)
    return {"one": one, "batched": many,
            "throughput_ratio": round(many["replies_per_s"] / one["replies_per_s"], 2),
            "throughput_ratio_text": round(many["texts_per_s"] / one["texts_per_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=30, help="new tokens of a reply's text")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of a photo")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sessions", type=int, default=8, help="sessions batched together")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (median); default: 3, 1 at tiny scale")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (compiling happens here)")
    ap.add_argument("--per-lever", action=argparse.BooleanOptionalAction, default=True,
                    help="also a row per lever alone (1 session)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="the compile levers (decode step, UNet); default: on CUDA only (compiling on a "
                         "CPU takes minutes)")
    ap.add_argument("--scheduler", choices=["default", "ddim", "dpm"], default="dpm", help="ours' sampler")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.repeats = args.repeats or (3 if args.scale == "paper" else 1)
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    # Batch sizes 1 and N, prefill and decode: each compiles its own graph.
    torch._dynamo.config.recompile_limit = 64

    import diffusers
    import transformers

    start = time.perf_counter()
    torch.manual_seed(0)
    model = build(config(args.scale, reference=False, grad_ckpt=False), device=device).eval()
    clock = Clock(device, args.warmup, args.repeats)
    result: dict = {
        "scale": args.scale, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
        "dtype": str(next(model.llm.parameters()).dtype).removeprefix("torch."), "resolution": model.generator.resolution,
        "new_tokens": args.tokens, "steps": args.steps, "guidance": args.guidance, "sessions": args.sessions,
        "repeats": args.repeats, "warmup": args.warmup, "build_s": round(time.perf_counter() - start, 2),
        "baseline_scheduler": type(load_schedulers(model.generator.folder)[1]).__name__,
    }
    result["baseline"] = pair(clock, model, args, plain=True)
    if args.per_lever:
        levers = {"static_cache": ({"kv_cache": "static"}, True, False),
                  "scheduler": ({"scheduler": args.scheduler}, False, True)}
        if compile_:
            levers["compiled_decode"] = ({"kv_cache": "static", "compile_decode": True}, True, False)
            levers["compiled_unet"] = ({"compile_unet": True}, False, True)
        result["levers"] = {}
        for name, (options, text, photo) in levers.items():
            set_levers(model, **options)
            result["levers"][name] = row(clock, model, args, 1, text=text, photo=photo)
    set_levers(model, "static", compile_, args.scheduler, compile_)
    result["ours"] = {"levers": {"kv_cache": "static", "compile_decode": compile_, "scheduler": args.scheduler,
                                 "compile_unet": compile_}, **pair(clock, model, args)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(write(result, args.json))


if __name__ == "__main__":
    main()
