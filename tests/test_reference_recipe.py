"""``--reference-recipe``: the authors' training recipe as config overrides in one
place, and what it switches on: length-sorted batches (resumable), dev
evaluation after every epoch, clipping 400, LinearLR warm-up from 0.01."""
import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmdialog import build, load_config
from mmdialog.core.config import PRESETS, recipe
from mmdialog.core.data import demo_dialogues
from mmdialog.core.training import _trainer, train
from mmdialog.core.training.data import DialogueDataModule, dialogue_words
from mmdialog.sdk.cli import app

DEMO = Path(__file__).resolve().parents[1] / "mmdialog" / "core" / "data" / "demo" / "chat.jsonl"


def test_the_recipe_overrides_the_paper_preset_in_one_place_and_flags_override_it():
    paper = load_config("paper")
    ref = load_config("paper", reference_recipe=True)
    assert (paper.model.llm.options.get("prompt_format", "template"), paper.model.bridge.options["alignment"],
            paper.data.order, paper.train.gradient_clip) == ("template", "aligned", "shuffle", 1.0)
    assert ref.model.llm.options["prompt_format"] == "reference"
    assert ref.model.llm.options["tokenizer_pipeline"] == "transformers4"
    assert ref.model.bridge.options["alignment"] == "bag" and ref.model.trainable == {"llm.embeddings": True}
    assert (ref.data.batch_size, ref.train.accumulate, ref.data.order) == (4, 4, "length")
    t = ref.train
    assert (t.gradient_clip, t.val_every, t.val_turns, t.val_max_new_tokens, t.val_num_beams) == \
        (400.0, "epoch", 0, 30, 2)
    assert (t.warmup_steps, t.warmup_start_factor, t.plateau_patience, t.early_stop_patience) == (400, 0.01, 1, 7)
    # The paper preset's paths and components stay; explicit overrides win over the recipe.
    assert ref.model.llm.options["path"] == paper.model.llm.options["path"]
    assert ref.model.perceiver == paper.model.perceiver
    over = load_config("paper", {"data.batch_size": 16, "train.accumulate": 1}, reference_recipe=True)
    assert (over.data.batch_size, over.train.accumulate) == (16, 1)


def test_the_recipe_is_an_overlay_file_beside_the_presets_with_its_decoding():
    from mmdialog.core.reply import GenerationOptions

    assert "reference" not in PRESETS and {"tiny", "paper", "paper-24gb"} <= set(PRESETS)
    overlay = recipe("reference")
    options = GenerationOptions.parse(overlay.pop("decoding"))
    assert (options.num_beams, options.max_new_tokens, options.num_inference_steps, options.guidance_scale) == \
        (2, 30, 20, 7.5)
    # Every other key is a config section: merged over a preset it validates as a config.
    assert set(overlay) == {"model", "data", "train"}
    assert load_config({**load_config("tiny").model_dump(), "data": overlay["data"]}).data.order == "length"


def test_config_show_prints_the_recipe():
    out = CliRunner().invoke(app, ["config", "show", "-c", "paper", "--reference-recipe"])
    assert out.exit_code == 0, out.output
    shown = yaml.safe_load(out.output)
    assert shown["model"]["llm"]["prompt_format"] == "reference" and shown["data"]["order"] == "length"
    assert shown["train"]["gradient_clip"] == recipe("reference")["train"]["gradient_clip"]
    plain = yaml.safe_load(CliRunner().invoke(app, ["config", "show", "-c", "paper"]).output)
    assert plain["data"]["order"] == "shuffle"


def test_clipping_and_epoch_evaluation_reach_the_trainer(tmp_path):
    t = load_config("paper", reference_recipe=True).train.model_copy(update={"precision": "32-true",
                                                                              "accelerator": "cpu"})
    trainer = _trainer(t, tmp_path, [], [], progress=False, validate=True)
    assert trainer.gradient_clip_val == 400.0
    assert trainer.check_val_every_n_epoch == 1 and trainer.val_check_interval == 1.0  # after every epoch
    ours = load_config("paper").train.model_copy(update={"precision": "32-true", "accelerator": "cpu"})
    trainer = _trainer(ours, tmp_path, [], [], progress=False, validate=True)
    assert trainer.gradient_clip_val == 1.0 and trainer.val_check_interval == ours.val_every


def test_the_recipe_warms_up_as_the_references_linear_lr(tiny):
    import torch

    from mmdialog.core.training.module import DialogueModule

    module = DialogueModule(tiny)
    module.train_cfg = load_config("tiny", reference_recipe=True).train       # warm-up 400 steps from 0.01
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    ours = [sched.lr_lambdas[0](s) for s in range(402)]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=400)
    theirs = []
    for _ in range(402):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        linear.step()
    assert ours == pytest.approx(theirs)
    module.train_cfg = tiny.config.train                                       # ours: (s + 1) / warm-up
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.lr_lambdas[0](0) == pytest.approx(1 / tiny.config.train.warmup_steps)


def test_length_order_is_shortest_first_every_epoch_and_resumes_mid_epoch(tiny):
    cfg = load_config("tiny", {"data.order": "length", "data.batch_size": 3})
    dialogues = demo_dialogues("train")
    data = DialogueDataModule(cfg, tiny.collator, (dialogues, "demo"))
    data.setup()
    loader = data.train_dataloader()
    first = [b.ids for b in loader]
    ids = [i for batch in first for i in batch]
    words = {d.id: dialogue_words(d) for d in dialogues}
    assert [words[i.split("@")[0]] for i in ids] == sorted(words[i.split("@")[0]] for i in ids)
    assert len(set(words.values())) > 3 and ids != [f"{d}@{a}" for d, a in tiny.collator.samples(dialogues)]
    loader.sampler.set_epoch(1)
    assert [b.ids for b in loader] == first                      # no shuffling: the same every epoch
    resumed = DialogueDataModule(cfg, tiny.collator, (dialogues, "demo"))
    resumed.setup()
    again = resumed.train_dataloader()
    again.load_state_dict({"consumed": 2, "epoch": 1})           # a checkpoint taken after 2 batches
    assert [b.ids for b in again] == first[2:]


@pytest.mark.slow  # 6 training steps and 2 dev evaluations
def test_reference_recipe_trains_one_sample_per_dialogue_shortest_first_evaluating_each_epoch(tmp_path):
    """6 training dialogues, batch 2: 3 optimizer steps an epoch; 6 steps = 2 epochs, 2 evaluations."""
    cfg = load_config("tiny", {"data.path": str(DEMO), "data.split": "train", "data.batch_size": 2,
                               "train.accumulate": 1, "train.max_steps": 6, "train.warmup_steps": 2,
                               "train.lr": 1e-4, "train.val_turns": 2, "train.val_max_new_tokens": 3,
                               "train.out_dir": str(tmp_path), "train.checkpoint_every": 100},
                      reference_recipe=True)
    result = train(build(cfg), progress=False)
    assert result.steps == 6
    samples = json.loads((tmp_path / "manifest_rank0.json").read_text())["samples"]
    dialogues = {d.id: d for d in demo_dialogues("train", photochat=False)}
    epoch = samples[:6]
    assert samples == epoch * 2 and sorted(s.split("@")[0] for s in epoch) == sorted(dialogues)
    lengths = [dialogue_words(dialogues[s.split("@")[0]]) for s in epoch]
    assert lengths == sorted(lengths)
    rows = [r for f in (tmp_path / "logs").rglob("metrics.csv") for r in csv.DictReader(open(f))]
    assert [int(r["step"]) for r in rows if r.get("val_bleu2")] == [2, 5]  # after each epoch's last step
    lr = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")][:3]
    assert lr == pytest.approx([1e-6, 0.505e-4, 1e-4])           # LinearLR(0.01 → 1 over 2 steps)
    assert result.best.endswith("best.ckpt")
