"""Training: checkpoints (trainable-only, atomic), exact resume, bad runs."""
import json
import signal
from pathlib import Path

import pytest
import torch

from mmdialog import MMDialogError, build
from mmdialog.core.checkpoint import read_checkpoint, weights_digest
from mmdialog.core.errors import ConfigError
from mmdialog.core.training import TrainingError, compile_repeated_blocks, train

DEMO = Path(__file__).resolve().parents[1] / "mmdialog" / "core" / "data" / "demo" / "chat.jsonl"


def make(out_dir, steps, **over):
    # 6 sharer-side samples, batch 2: three optimizer steps per epoch
    return build("tiny", overrides={"data.path": str(DEMO), "data.split": "train", "data.both_speakers": False,
                                    "train.max_steps": steps, "train.out_dir": str(out_dir),
                                    "train.checkpoint_every": 1, "train.warmup_steps": 2, "train.lr": 1e-3,
                                    **over})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    model = make(out, 5)
    result = train(model, progress=False)
    return out, model, result


def test_checkpoint_holds_only_trainable_weights_and_config(uninterrupted):
    out, model, result = uninterrupted
    assert result.steps == 5 and len(result.history) == 5
    assert all(r["image_loss"] > 0 for r in result.history)  # every sample shares a real photo
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k.removeprefix("model.") for k in ckpt["state_dict"]} == trainable
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    weights, config, _ = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert weights.keys() == trainable and "name: gumbel" in config
    size_mb = (out / "checkpoints" / "last.ckpt").stat().st_size / 2**20
    assert size_mb < 60  # the 135M-parameter base LLM is not in it (~540 MB in fp32)
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert (out / "trainable.pt").exists()
    assert list((out / "logs").rglob("metrics.csv"))
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))


# Two cases run by default; the other three are slow (make test-all).
@pytest.mark.parametrize("first,every", [pytest.param(3, 1, marks=pytest.mark.slow), (2, 1),
                                         pytest.param(4, 1, marks=pytest.mark.slow),
                                         pytest.param(3, 2, marks=pytest.mark.slow), (2, 3)],
                         ids=["epoch-boundary", "mid-epoch", "mid-second-epoch", "end-of-run-save",
                              "end-of-run-save-mid-epoch"])
def test_resume_reaches_the_same_weights(tmp_path, uninterrupted, first, every):
    _, full, _ = uninterrupted
    train(make(tmp_path, first, **{"train.checkpoint_every": every}), progress=False)
    # The run's last steps are saved even when they end between periodic saves.
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == first
    resumed = make(tmp_path, 5)
    result = train(resumed, progress=False, resume=True)
    assert result.steps == 5
    assert weights_digest(resumed) == weights_digest(full)


def test_cached_encoders_leave_after_the_first_whole_epoch_without_changing_a_number(tmp_path, uninterrupted):
    """5 steps of 3 per epoch: after epoch 1 every photo is cached, so the frozen ViT,
    Q-Former and VAE are offloaded (on by default); a run without offloading trains
    to the same losses and weights."""
    _, model, result = uninterrupted
    assert result.offloaded == ["perceiver.vision", "perceiver.qformer", "generator.vae"]
    assert all(p.device.type == "cpu" for p in model.generator.vae.parameters())  # back home: CPU here
    kept = make(tmp_path, 5, **{"train.offload_cached_encoders": False})
    again = train(kept, progress=False)
    assert again.offloaded == [] and again.history == result.history
    assert weights_digest(kept) == weights_digest(model)
    # A photo first seen after the offload is encoded by the (returned) encoders.
    with torch.enable_grad():
        new = model.perceiver(torch.rand(1, 3, 64, 64), ["a-photo-never-seen"])
    assert new.shape == (1, model.perceiver.num_tokens, model.llm.hidden_size)


def test_a_finished_training_holds_nothing_and_gives_the_signal_handlers_back(tmp_path):
    """After ``train`` returns, the model is the caller's alone: Lightning's SIGTERM handler
    (which holds the trainer, hence the model) is not left installed in the process."""
    import gc
    import weakref

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    model = make(tmp_path, 1)
    train(model, progress=False)
    assert {s: signal.getsignal(s) for s in before} == before
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from mmdialog import MMDialogError

    with pytest.raises(MMDialogError, match="cannot resume: .*last.ckpt does not exist"):
        train(make(tmp_path, 1), progress=False, resume=True)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    model = make(tmp_path, 6)
    train(model, progress=False)  # a good run leaves checkpoints/last.ckpt at step 6
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    bad = make(tmp_path, 9)
    with torch.no_grad():
        bad.generator.vae.encoder.conv_in.weight.fill_(float("nan"))  # frozen: not restored by resume
    with pytest.raises(TrainingError, match=r"loss became nan at step 6 .*last good checkpoint"):
        train(bad, progress=False, resume=True)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == good


def test_manifest_records_samples_and_weights(uninterrupted):
    out, model, _ = uninterrupted
    m = json.loads((out / "manifest_rank0.json").read_text())
    assert len(m["samples"]) == 10 and m["weights_sha1"] == weights_digest(model)


def two_processes_on_cpu(out: Path, strategy: str) -> tuple[list[dict], str]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "mmdialog", "train", "--devices", "2", "--strategy", strategy,
         "--set", "train.accelerator=cpu", "--data", str(DEMO), "--set", "data.split=train",
         "--set", "data.both_speakers=false", "--max-steps", "2", "--quiet", "--out-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / f"manifest_rank{r}.json").read_text()) for r in (0, 1)], run.stdout


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_on_cpu(tmp_path):
    """Real DDP and FSDP (gloo, 2 processes) through the CLI: disjoint data, identical
    weights on both ranks, every trainable weight saved under its own name, and the
    sharded run trains as the replicated one: the same losses, the same weights."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        ranks, stdout = two_processes_on_cpu(tmp_path / strategy, strategy)
        assert all(r["steps"] == 2 for r in ranks)
        seen0, seen1 = set(ranks[0]["samples"]), set(ranks[1]["samples"])
        assert seen0 and seen1 and not seen0 & seen1          # each rank trained on its own shard
        assert len(seen0 | seen1) == 6                         # together: the whole split
        assert ranks[0]["weights_sha1"] == ranks[1]["weights_sha1"]  # gradients were reduced
        assert stdout.count("step    2") == 1                   # only rank 0 reports
        losses = [line.split()[2:] for line in stdout.splitlines() if line.startswith("step ")]
        runs[strategy] = losses, read_checkpoint(tmp_path / strategy)[0]
    (ddp_loss, ddp), (fsdp_loss, fsdp) = runs["ddp"], runs["fsdp"]
    assert ddp_loss == fsdp_loss and len(ddp_loss) == 2   # text and image loss of both steps
    assert ddp.keys() == fsdp.keys() and len(ddp) > 300
    # Gradients reduced in another order differ in their last bits; where a gradient is near
    # zero (biases), Adam turns that into a visible part of one step (lr × warm-up ≈ 1.8e-3 here).
    worst = max((ddp[n] - fsdp[n]).abs().max().item() for n in ddp)
    assert worst < 3e-4, worst


@pytest.mark.parametrize("warmup, expected", [(0, [1.0, 1.0, 0.5, 0.5]),
                                              pytest.param(10, [1.0, 1.0, 1.0, 1.0], marks=pytest.mark.slow)],
                         ids=["after-warm-up", "during-warm-up"])
def test_dev_bleu2_plateau_halves_the_lr_as_the_reference_and_early_stops(tmp_path, warmup, expected):
    """Validation generates dev replies (gold context), logs BLEU-2. As the reference's
    ReduceLROnPlateau(patience=1) stepped after warm-up: the lr halves at the 2nd evaluation
    in a row without improvement, never during warm-up; after `early_stop_patience`
    evaluations without improvement training stops; the best weights are kept."""
    import csv

    model = make(tmp_path, 50, **{"train.val_every": 1, "train.val_turns": 3, "train.val_max_new_tokens": 4,
                                  "train.lr": 1e-12, "train.warmup_steps": warmup, "train.early_stop_patience": 3,
                                  "train.plateau_patience": 1})
    result = train(model, progress=False)
    assert result.steps < 50  # stopped early: BLEU-2 cannot improve with lr ~ 0
    rows = [r for f in (tmp_path / "logs").rglob("metrics.csv") for r in csv.DictReader(open(f))]
    bleu = [float(r["val_bleu2"]) for r in rows if r.get("val_bleu2")]
    scales = [float(r["lr_scale"]) for r in rows if r.get("lr_scale")]
    assert len(bleu) == 4 and len(set(bleu)) == 1           # greedy replies of an unchanged model
    assert scales == expected
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 1 and result.best.endswith("best.ckpt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_exits_non_zero_and_resume_continues(tmp_path, signum):
    """A real SIGTERM (a batch scheduler) or SIGINT (Ctrl-C) to a running `mmdialog train`:
    checkpoint written, exit 128 + signal, and the resumed run carries the manifest on."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mmdialog", "train", "--data", str(DEMO), "--set", "data.split=train",
           "--set", "data.both_speakers=false", "--set", "train.checkpoint_every=1000", "--quiet",
           "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd + ["--max-steps", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "logs").rglob("metrics.csv")):
        time.sleep(0.5)
    time.sleep(3)  # a few steps in (metrics are flushed as they are logged)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name} at step" in stderr and "--resume last" in stderr
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    done = ckpt["global_step"]
    assert 0 < done < 1000 and len(ckpt["mmdialog_samples"]) == 2 * done
    out = subprocess.run(cmd + ["--max-steps", str(done + 1), "--resume", "last"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest_rank0.json").read_text())
    assert manifest["steps"] == done + 1 and len(manifest["samples"]) == 2 * (done + 1)  # both processes


def test_sigterm_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    """A real SIGTERM to this process while it trains, at whatever point of a step it
    lands (sent as soon as the periodic checkpoint of step 3 exists): the run finishes
    step 4, writes its own checkpoint (not a periodic one) and stops; resumed, it ends
    on the uninterrupted run's weights, bit for bit."""
    import os
    import threading
    import time

    _, full, _ = uninterrupted
    last = tmp_path / "checkpoints" / "last.ckpt"

    def send() -> None:
        while not last.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()
    stopped = train(make(tmp_path, 5, **{"train.checkpoint_every": 3}), progress=False)
    assert stopped.signal == signal.SIGTERM and stopped.steps == 4
    assert torch.load(last, weights_only=True)["global_step"] == stopped.steps
    resumed = make(tmp_path, 5)
    assert train(resumed, progress=False, resume=True).steps == 5
    assert weights_digest(resumed) == weights_digest(full)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    train(make(tmp_path, 2, **{"train.checkpoint_every": 1}), progress=False)
    last, prev = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last.prev.ckpt"
    assert torch.load(prev, weights_only=True)["global_step"] == 1
    last.write_bytes(last.read_bytes()[:1000])                      # truncated, as by a full disk
    (tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp").write_bytes(b"half")  # a killed run's temp file
    result = train(make(tmp_path, 3), progress=False, resume=True)
    assert result.steps == 3 and any("resuming from the previous checkpoint" in n for n in result.notes)
    assert any("removed 1 temporary file" in n for n in result.notes)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    last.write_bytes(b"")
    prev.write_bytes(b"")
    with pytest.raises(MMDialogError, match="cannot resume: .*damaged.* and so is the previous one"):
        train(make(tmp_path, 4), progress=False, resume=True)


@pytest.mark.parametrize("llm_every,unet_blocks", [(True, True), (2, ["down_blocks.0", "mid_block"])],
                         ids=["full", "selective"])
def test_gradient_checkpointing_recomputes_the_chosen_blocks_and_keeps_gradients(
        cat_dialogue, llm_every, unet_blocks):
    plain = build("tiny")
    ckpt = build("tiny", overrides={"model.llm.gradient_checkpointing": llm_every,
                                    "model.generator.gradient_checkpointing": unet_blocks})
    layers, unet = ckpt.llm.base_model.model.layers, ckpt.generator.unet
    calls: dict[str, int] = {}
    # Submodules: the checkpointed function is a layer's forward / a block's resnets.
    watched = {"layer0": layers[0].mlp, "layer1": layers[1].mlp, "down0": unet.down_blocks[0].resnets[0],
               "down1": unet.down_blocks[1].resnets[0], "mid": unet.mid_block.resnets[1]}
    for name, mod in watched.items():  # (forward hooks do not fire in a recompute)
        def counted(*args, _forward=mod.forward, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _forward(*args, **kwargs)
        mod.forward = counted
    grads = []
    for m in (plain, ckpt):
        m.train()
        for mod in m.modules():  # dropout off: compare the arithmetic only
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        torch.manual_seed(0)
        out = m(m.collator([(cat_dialogue, "1")]))
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    # A checkpointed block runs again in the backward pass; the others once.
    every_layer = llm_every is True
    assert calls == {"layer0": 2, "layer1": 2 if every_layer else 1,
                     "down0": 2, "down1": 2 if every_layer else 1, "mid": 2}
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5), n


def test_save_matmuls_policy_recomputes_only_elementwise_ops_and_keeps_gradients(cat_dialogue):
    """Selective activation checkpointing: the full policy runs every checkpointed
    matmul again in the backward pass; save_matmuls runs none again (so the backward
    does exactly the uncheckpointed model's matmuls) and the gradients are unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.convolution.default}

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in matmuls
            return func(*args, **(kwargs or {}))

    def backward_matmuls(policy):
        over = {} if policy is None else {
            "model.llm.gradient_checkpointing": True, "model.llm.checkpoint_policy": policy,
            "model.generator.gradient_checkpointing": True, "model.generator.checkpoint_policy": policy}
        m = build("tiny", overrides=over)
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        torch.manual_seed(0)
        loss = m(m.collator([(cat_dialogue, "1")]))["loss"]
        with CountMatmuls() as counter:
            loss.backward()
        return counter.n, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    (plain, g0), (full, g1), (selective, g2) = (backward_matmuls(p) for p in (None, "full", "save_matmuls"))
    assert full > plain + 20 and selective == plain
    assert g0.keys() == g1.keys() == g2.keys()
    for n in g0:
        assert torch.allclose(g0[n], g2[n], rtol=1e-3, atol=1e-5), n


def test_unknown_unet_block_to_checkpoint_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown UNet block\(s\) \['down\.0'\]; choose from \['down_blocks\.0'"):
        build("tiny", overrides={"model.generator.gradient_checkpointing": ["down.0"]})


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients(cat_dialogue):
    eager, compiled = build("tiny"), build("tiny")
    n = compile_repeated_blocks(compiled)
    transformer_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in compiled.generator.unet.modules())
    assert n >= len(compiled.llm.base_model.model.layers) + transformer_blocks > 30
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # checkpoints unchanged
    results = []
    for m in (eager, compiled):
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        torch.manual_seed(0)
        out = m(m.collator([(cat_dialogue, "1")]))
        out["loss"].backward()
        results.append((out["loss"].detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-4) and g0.keys() == g1.keys()
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-3, atol=1e-5), k


def test_random_flip_trains_on_both_mirror_images_and_stores_each(cat_dialogue, tmp_path):
    m = build("tiny", overrides={"model.generator.random_flip": True})
    gen, batch = m.generator, m.collator([(cat_dialogue, "1")])
    store, key = gen.feature_store(tmp_path), batch.desc_keys[0]
    assert store.variants == ("", "-hflip")
    cond = gen.encode(gen.text_prompts(["a cat"]))
    with torch.no_grad():  # evaluation: never flipped
        for seed in range(4):
            torch.manual_seed(seed)
            gen.loss(cond, batch.desc_pixels, batch.desc_keys)
    assert store.get(key) is not None and store.get(key + "-hflip") is None and not store.complete(key)
    for seed in range(8):  # P(one side never drawn) = 2⁻⁷
        torch.manual_seed(seed)
        gen.loss(cond, batch.desc_pixels, batch.desc_keys)
    assert store.complete(key) and store.encoded == 2
    with torch.no_grad():
        mirrored = gen.vae.encode(batch.desc_pixels.flip(-1) * 2 - 1).latent_dist.mean[0]
    assert torch.allclose(store.get(key + "-hflip")["mean"], mirrored, atol=1e-5)
    assert not torch.allclose(store.get(key)["mean"], mirrored, atol=1e-3)
    # `mmdialog data cache` stores the mirror image through the same function.
    assert torch.equal(gen.encode_photo(batch.desc_pixels, "-hflip")["mean"], store.get(key + "-hflip")["mean"])


def test_stored_posterior_changes_nothing_the_unet_sees(tiny, cat_dialogue, tmp_path):
    """The stored VAE posterior gives the same latents (same draw) as encoding again."""
    gen = tiny.generator
    batch = tiny.collator([(cat_dialogue, "1")])
    from mmdialog.core.caching import content_key

    assert batch.desc_keys == [content_key(cat_dialogue.turns[3].photos[0].path)]
    px = batch.desc_pixels
    store = gen.feature_store(tmp_path)
    torch.manual_seed(0)
    plain = gen.latents(px)                      # no keys: encodes
    torch.manual_seed(0)
    first = gen.latents(px, batch.desc_keys)     # fills the store
    torch.manual_seed(0)
    cached = gen.latents(px[:, :, :0, :0], batch.desc_keys)  # from the store, no pixels, VAE not called
    assert store.encoded == 1
    assert torch.allclose(plain, first, atol=1e-6) and torch.allclose(first, cached, atol=1e-6)
    calls = []
    handle = gen.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    gen.latents(px, batch.desc_keys)
    assert calls == []                           # served from the store
    gen.options.latent_cache = False
    try:
        gen.latents(px, batch.desc_keys)
    finally:
        gen.options.latent_cache = True
        handle.remove()
    assert calls == [1]                          # switched off: the VAE encodes again


@pytest.mark.slow
def test_training_compiled_runs_and_writes_the_same_checkpoint_keys(tmp_path, uninterrupted):
    """``train.compile`` (on in the paper preset) through the Lightning loop: the compiled
    blocks train under an activation memory budget, and checkpoints name the weights
    exactly as an eager run's do."""
    eager_out, _, _ = uninterrupted
    model = make(tmp_path, 2, **{"train.compile": True, "train.activation_memory_budget": 0.5})
    result = train(model, progress=False)
    assert torch._functorch.config.activation_memory_budget == 1.0  # set for the run only
    assert result.steps == 2
    assert all(torch.isfinite(torch.tensor(r["text_loss"])) and r["image_loss"] > 0 for r in result.history)
    assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()) > 30
    keys = lambda out: set(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])  # noqa: E731
    assert keys(tmp_path) == keys(eager_out)


@pytest.fixture()
def small_disk(tmp_path):
    """A real 4 MiB file system (tmpfs), for a checkpoint that does not fit."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_no_half_file(small_disk):
    with pytest.raises(TrainingError, match=r"no space left on the device of .*last.ckpt: the checkpoint needs "
                                            r"about [\d,]+ MiB, [\d,.]+ MiB are free"):
        train(make(small_disk / "run", 1), progress=False)
    assert not list((small_disk / "run" / "checkpoints").glob(".*.tmp"))
    assert not (small_disk / "run" / "checkpoints" / "last.ckpt").exists()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width`` × ``height`` pixels (a 144-megapixel photo
    without the 400 MB): the loader must refuse it from the header, before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.fixture()
def bad_photo_data(tmp_path, cat_photo):
    (tmp_path / "trunc.png").write_bytes(cat_photo.read_bytes()[:2000])
    _png_header_only(tmp_path / "huge.png", 12000, 12000)
    dialogues = [{"id": name, "turns": [{"speaker": "a", "text": "show me a photo"},
                                        {"speaker": "b", "text": "here", "photos": [
                                            {"path": str(path), "description": f"a {name} photo"}]}]}
                 for name, path in (("cat", cat_photo), ("trunc", tmp_path / "trunc.png"),
                                    ("huge", tmp_path / "huge.png"))]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in dialogues))
    return path


def test_bad_photos_are_skipped_and_counted_and_strict_refuses_before_any_step(tmp_path, bad_photo_data):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mmdialog", "train", "--data", str(bad_photo_data), "--max-steps", "2", "--quiet"]
    ok = subprocess.run(cmd + ["--out-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "3 dialogues" in ok.stdout and "2 corrupt images" in ok.stdout    # reported, the text still trains
    assert (tmp_path / "run" / "trainable.pt").is_file()
    assert "2 corrupt images" in json.loads((tmp_path / "run" / "manifest_rank0.json").read_text())["data"]

    strict = subprocess.run(cmd + ["--strict", "--out-dir", str(tmp_path / "strict")], capture_output=True,
                            text=True, env=env, timeout=600)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("trunc.png" in last or "huge.png" in last)
    assert not (tmp_path / "strict" / "checkpoints").exists()                # refused before any step
