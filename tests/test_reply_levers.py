"""The inference levers of "replies in about a second": the LLM's static KV cache
(and compiled decode step) give the dynamic cache's greedy tokens, in a plain reply
and through the photo loop; the generator's sampler option and compiled UNet;
classifier-free guidance in one UNet call per step. Tiny random-init components
at the paper's layout (benchmarks/bench_paper_step.py's tiny scale)."""
import sys
from pathlib import Path

import pytest
import torch

from mmdialog import Turn, build
from mmdialog.core.errors import ConfigError
from mmdialog.core.model import _left_pad
from mmdialog.plugins.generators.sd import SDGenerator, SDOptions

ROOT = Path(__file__).resolve().parents[1]
HISTORIES = [[Turn("user", "hi there, show me your cat")],
             [Turn("user", "what did you have for lunch today? tell me all about it")]]


def tiny_config(**llm: object) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_paper_step import config

    cfg = config("tiny", reference=False, grad_ckpt=False)
    cfg["model"]["llm"].update(llm)
    cfg["model"]["generator"]["num_inference_steps"] = 2
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(tiny_config()).eval()


def use_cache(model, kind: str, compile_decode: bool = False) -> None:
    llm = model.llm
    llm.options = llm.options.model_copy(update={"kv_cache": kind, "compile_decode": compile_decode})


def contexts(model, histories=HISTORIES) -> tuple[torch.Tensor, torch.Tensor]:
    return _left_pad([model.input_embeddings(model.collator.prompt(h, "assistant"))[0] for h in histories])


def greedy(model, kind: str, n: int, histories=HISTORIES) -> torch.Tensor:
    use_cache(model, kind)
    try:
        return model.llm.generate(*contexts(model, histories), max_new_tokens=n, min_new_tokens=n)
    finally:
        use_cache(model, "dynamic")


def test_static_cache_greedy_equals_dynamic(model):
    dynamic = greedy(model, "dynamic", 12)
    assert dynamic.shape == (2, 12)
    assert torch.equal(greedy(model, "static", 12), dynamic)
    # A longer context with the same batch size reuses the cache (reset, not reallocated).
    held = model.llm._static_cache
    longer = [h + [Turn("assistant", "sure"), Turn("user", "and then?")] for h in HISTORIES]
    assert torch.equal(greedy(model, "static", 8, longer), greedy(model, "dynamic", 8, longer))
    assert model.llm._static_cache is held
    # Another batch size gets its own cache.
    assert torch.equal(greedy(model, "static", 5, HISTORIES[:1]), greedy(model, "dynamic", 5, HISTORIES[:1]))
    assert model.llm._static_cache[0] == 1


class Script:
    """Makes the random LLM share a photo: in the reply's first piece it writes ``[img]``
    first and ``[/img]`` 3 tokens later (logits raised at the head); elsewhere greedy."""

    def __init__(self, llm) -> None:
        self.llm, self.prefills, self.step = llm, 0, 0

    def decoder_called(self, module, args, kwargs) -> None:
        if kwargs.get("inputs_embeds") is not None:      # a prefill (decode steps take ids): a new piece
            self.prefills, self.step = self.prefills + 1, 0

    def __call__(self, module, args, logits: torch.Tensor) -> torch.Tensor:
        if self.prefills == 1:
            force = {0: self.llm.img_open_id, 3: self.llm.img_close_id}.get(self.step)
            if force is not None:
                logits = logits.clone()
                logits[:, -1, force] += 1e4
        self.step += 1
        return logits


def reply_through_photo_loop(model, kind: str):
    use_cache(model, kind)
    script = Script(model.llm)
    base = model.llm.base_model
    handles = [base.get_decoder().register_forward_pre_hook(script.decoder_called, with_kwargs=True),
               base.get_output_embeddings().register_forward_hook(script)]
    try:
        return model.respond(HISTORIES[0], max_new_tokens=10, seed=0), script.prefills
    finally:
        for handle in handles:
            handle.remove()
        use_cache(model, "dynamic")


def test_static_cache_equals_dynamic_through_the_photo_loop(model):
    dynamic, pieces = reply_through_photo_loop(model, "dynamic")
    assert pieces == 2 and dynamic.shared and len(dynamic.photos) == 1
    static, _ = reply_through_photo_loop(model, "static")
    assert static.text == dynamic.text and static.descriptions == dynamic.descriptions


def test_compile_decode_needs_the_static_cache():
    with pytest.raises(ConfigError, match="kv_cache: static"):
        build(tiny_config(compile_decode=True))


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(model):
    dynamic = greedy(model, "dynamic", 6)
    use_cache(model, "static", compile_decode=True)
    try:
        out = model.llm.generate(*contexts(model), max_new_tokens=6, min_new_tokens=6)
    finally:
        use_cache(model, "dynamic")
    assert torch.equal(out, dynamic)


def generator(**options: object) -> SDGenerator:
    torch.manual_seed(0)  # the same random-init weights for every scheduler
    return SDGenerator(SDOptions(**options)).eval()


def draw(gen: SDGenerator, steps: int = 4):
    cond = gen.encode(gen.text_prompts(["a tabby cat on a wooden floor"]))
    return gen.generate(cond, num_inference_steps=steps, guidance_scale=7.5, seed=0)[0].image


def test_dpm_scheduler_draws_another_photo_of_the_right_size():
    ddim, dpm = generator(), generator(scheduler="dpm")
    assert type(ddim.sample_scheduler).__name__ == "DDIMScheduler"  # random-init parts' default
    assert type(dpm.sample_scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.sample_scheduler.config.beta_schedule == "scaled_linear"  # SD's schedule, only the sampler differs
    a, b = draw(ddim), draw(dpm)
    assert b.size == (dpm.resolution, dpm.resolution)
    assert a.tobytes() != b.tobytes()


def test_unknown_scheduler_is_a_one_line_config_error():
    cfg = tiny_config()
    cfg["model"]["generator"]["scheduler"] = "euler"
    with pytest.raises(ConfigError) as e:
        build(cfg)
    message = str(e.value)
    assert "\n" not in message and "scheduler" in message
    assert all(name in message for name in ("default", "ddim", "dpm"))


def test_guidance_runs_both_branches_in_one_unet_call():
    gen = generator()
    batches: list[int] = []
    handle = gen.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        draw(gen, steps=3)
    finally:
        handle.remove()
    assert batches == [2, 2, 2]  # one call a step: unconditional and conditional rows together


@pytest.mark.slow
def test_compiled_unet_draws_the_eager_photo():
    eager = draw(generator(), steps=2)
    gen = generator(compile_unet=True)
    compiled = draw(gen, steps=2)
    blocks = [m for m in gen.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    diff = torch.tensor(list(compiled.tobytes()), dtype=torch.float) - torch.tensor(list(eager.tobytes()))
    assert diff.abs().max() <= 2  # uint8 pixels: compiled kernels round differently
