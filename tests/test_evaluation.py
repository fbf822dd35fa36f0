"""Per-turn evaluation: metrics of generated turns, files, and the CLI table."""
import json
import math
import os
import subprocess
import sys

import pytest

from mmdialog.core.data import demo_dialogues
from mmdialog.core.evaluation import GeneratedTurn, evaluate, score, write_results


def _tiny_clip_folder(folder):
    """A random-init CLIP in the real folder layout, with the real CLIP tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mmdialog.core import assets

    tok = AutoTokenizer.from_pretrained(assets.clip_tokenizer_folder())
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=49407),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


def test_score_on_hand_made_turns(tiny, tmp_path, cat_photo):
    import skimage

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    ids = tiny.llm.tokenizer(" a tabby cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    cond = tiny.generator.encode(tiny.bridge(ids.repeat(2, 1), ids.repeat(2, 1) > -1))
    fakes = []
    for i, photo in enumerate(tiny.generator.generate(cond, num_inference_steps=2, seed=0)):
        photo.image.save(tmp_path / f"fake{i}.png")
        fakes.append(str(tmp_path / f"fake{i}.png"))
    turns = [
        GeneratedTurn("d#1", "0", "look [img] a cat [/img]", "my cat [img] cat, animal [/img]", True, True,
                      "a cat", "cat, animal", fakes[0], str(cat_photo)),
        GeneratedTurn("d#2", "1", "so cute", "so cute", False, False, None, None),
        GeneratedTurn("d#3", "0", "here [img] coffee [/img]", "nice", True, False, "coffee", None,
                      fakes[1], os.path.join(data, "coffee.png")),
    ]
    clip = _tiny_clip_folder(tmp_path / "clip")
    r = score(turns, clip_model=str(clip), image_size=tiny.generator.resolution)
    assert 0 <= r["clip_score"] <= 100
    # intent: pred (T, F, T) vs gold (T, F, F): P = 1/2, R = 1/1, F1 = 2/3
    assert r["intent_precision"] == pytest.approx(50.0) and r["intent_recall"] == pytest.approx(100.0)
    assert r["intent_f1"] == pytest.approx(200 / 3)
    # text ignores descriptions: "look"/"my cat", "so cute"/"so cute", "here"/"nice":
    # p1 = 2/4, hypothesis 4 words vs reference 5 → BP = exp(1 − 5/4)
    assert r["bleu1"] == pytest.approx(100 * 0.5 * math.exp(-0.25))
    # description of the one gold share turn: "a cat" vs "cat , animal": p1 = 1/2, BP = exp(1 − 3/2)
    assert r["desc_n"] == 1 and r["desc_bleu1"] == pytest.approx(100 * 0.5 * math.exp(-0.5))
    # unpaired sets: both generated photos; the one gold photo (d#3's gold shares none)
    assert (r["n_generated"], r["n_gold"]) == (2, 1) and r["comparable"] is False
    assert r["is_mean"] >= 1.0 and r["fid"] is None and r["reasons"]["fid"] == "fewer than 2 gold photos (1)"
    rows_json, rows_md = write_results([{"model": "m", "dataset": "d", **r}], tmp_path)
    assert json.loads(rows_json.read_text())[0]["intent_f1"] == pytest.approx(200 / 3)
    assert "| m | d |" in rows_md.read_text() and "not comparable" in rows_md.read_text()
    assert "- (1) fewer than 2 gold photos (1)" in rows_md.read_text()


def test_evaluate_writes_replies_for_both_speakers(tiny, tmp_path):
    r = evaluate(tiny, demo_dialogues("test"), tmp_path, name="tiny e2e", dataset="demo", limit=6,
                 batch_size=4, max_new_tokens=8)
    assert r["n_turns"] == 6 and 0 <= r["bleu2"] <= 100 and "intent_f1" in r
    lines = [json.loads(x) for x in (tmp_path / "replies_tiny_e2e.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {x["speaker"] for x in lines} == {"0", "1"}
    assert all(isinstance(x["reply"], str) for x in lines)


def test_eval_cli_prints_the_paper_table(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mmdialog", "eval", "--limit", "4", "--max-new-tokens", "6",
                          "--reference-recipe", "--out", str(tmp_path), "--bridge", "text", "--perceiver", "caption"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| Model | Dataset | BLEU-1 | BLEU-2 | ROUGE-L | FID" in out.stdout
    assert "caption+text (untrained)" in out.stdout
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    # the reference's decoding, an explicit flag still winning
    decoding = json.loads((tmp_path / "results.json").read_text())[0]["decoding"]
    assert {k: decoding[k] for k in ("num_beams", "max_new_tokens", "num_inference_steps", "guidance_scale")} == \
        {"num_beams": 2, "max_new_tokens": 6, "num_inference_steps": 20, "guidance_scale": 7.5}
    # progress on stderr (not a terminal here: the first and the last line), with the turns done
    lines = [line for line in out.stderr.splitlines() if line.startswith("eval caption+text (untrained): ")]
    assert lines[0].startswith("eval caption+text (untrained): 0/4 turns") and "4/4 turns" in lines[-1], out.stderr
