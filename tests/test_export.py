"""Save / load: a trained model exported to a folder comes back identical;
a folder changed after export, or weights holding NaN / inf, are refused."""
import hashlib
import json
import re
import shutil

import pytest
import torch
import yaml
from sharing_model import CAT_PROMPT, exported_dir, sharing_model

import mmdialog
from mmdialog import ConfigError
from mmdialog.core.assembler import export, load
from mmdialog.core.export import check_folder, save_pretrained

WEIGHTS, MANIFEST = "model.safetensors", "mmdialog.json"


def _copy_export(tmp_path, name):
    """A private copy of the shared exported folder, to tamper with."""
    folder = tmp_path / name
    shutil.copytree(exported_dir(), folder)
    return folder


def _manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST).read_text())
    if changes:
        manifest.update(changes)
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _rehash(folder):
    """Record the weights' current SHA-256, as a careful tamperer would."""
    _manifest(folder, sha256={WEIGHTS: hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()})


def test_exported_folder_is_self_contained_and_reloads_identically():
    model, folder = sharing_model(), exported_dir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.yaml", "metrics.json", "mmdialog.json", "model.safetensors", "tokenizer_additions.json"]
    manifest = json.loads((folder / "mmdialog.json").read_text())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert manifest["num_tensors"] == len(trainable)
    tokens = json.loads((folder / "tokenizer_additions.json").read_text())
    assert list(tokens["added_tokens"]) == ["[img]", "[/img]", "<image>"] and tokens["img_open"] == "[img]"
    card = (folder / "README.md").read_text()
    assert "library_name: mmdialog" in card and "| bleu2 | 12.5 |" in card and "name: library" in card
    # base checkpoints stay references: the folder holds only the trained 0.7 M parameters
    assert (folder / "model.safetensors").stat().st_size < 4_000_000
    assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["llm"]["path"] == "embedded:smollm2-135m-instruct"

    loaded = mmdialog.load(folder)
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in trainable.items())
    a = model.session(seed=0, max_new_tokens=20).send(CAT_PROMPT)
    b = loaded.session(seed=0, max_new_tokens=20).send(CAT_PROMPT)
    assert a.text == b.text and a.shared and b.descriptions == a.descriptions == ["my tabby cat"]
    assert a.images[0].tobytes() == b.images[0].tobytes()


def test_export_reads_trainable_pt_and_lightning_checkpoints(tmp_path):
    from mmdialog.core.checkpoint import save_trainable

    model = sharing_model()
    pt = save_trainable(model, tmp_path / "run" / "trainable.pt")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"rougeL": 0.25}))
    out = export(tmp_path / "run", tmp_path / "from-pt")                       # a run folder
    assert "| rougeL | 0.25 |" in (out / "README.md").read_text()
    # a Lightning checkpoint: state_dict holds trainable params under "model.", config under mmdialog_config
    data = torch.load(pt, weights_only=True)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in data["trainable"].items()}, "epoch": 3,
                "mmdialog_config": data["config"], "hyper_parameters": {}}, ckpt)
    out2 = export(ckpt, tmp_path / "from-ckpt", metrics={"bleu1": 30.0})
    from safetensors.torch import load_file
    w1, w2 = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert json.loads((out2 / "metrics.json").read_text()) == {"bleu1": 30.0}
    with pytest.raises(ConfigError, match="is not empty"):
        export(ckpt, tmp_path / "from-ckpt")


def test_bad_folders_and_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("model: {}")
    with pytest.raises(ConfigError, match=r"is missing mmdialog.json, model.safetensors"):
        load(tmp_path / "half")
    broken = _copy_export(tmp_path, "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    _rehash(broken)  # past the digest check, to the reader
    with pytest.raises(ConfigError, match="model.safetensors cannot be read"):
        load(broken)
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ConfigError, match="cannot be read"):
        export(tmp_path / "junk.pt", tmp_path / "out")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not an mmdialog checkpoint"):
        export(tmp_path / "other.pt", tmp_path / "out")


def test_the_manifest_records_the_weights_sha256_and_one_flipped_byte_is_refused(tmp_path):
    folder = _copy_export(tmp_path, "flipped")
    data = (folder / WEIGHTS).read_bytes()
    manifest = _manifest(folder)
    assert manifest["format_version"] == 2
    assert manifest["sha256"] == {WEIGHTS: hashlib.sha256(data).hexdigest()}
    assert manifest["sha256"][WEIGHTS] in (folder / "README.md").read_text()
    check_folder(folder)
    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # one bit of the last weight: the file still parses, the values differ
    (folder / WEIGHTS).write_bytes(bytes(flipped))
    for entry in (load, check_folder):
        with pytest.raises(ConfigError, match=r"model.safetensors does not match the SHA-256 recorded in "
                                              r"mmdialog.json; the folder is damaged or was changed after export"
                           ) as err:
            entry(folder)
        assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_weights_rewritten_as_nan_are_refused_at_load_even_when_the_sha_matches(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_export(tmp_path, "nan")
    weights = load_file(str(folder / WEIGHTS))
    n = len(weights)
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(folder / WEIGHTS),
              metadata={"format": "mmdialog-export"})
    _rehash(folder)
    check_folder(folder)  # intact as a folder: what it holds is the problem
    first = next(iter(load_file(str(folder / WEIGHTS))))
    with pytest.raises(ConfigError, match=rf"model folder '.*': weight '{re.escape(first)}' holds "
                                          rf"{weights[first].numel():,} NaN/inf values \({n} of {n} tensors are not "
                                          r"finite\)") as err:
        load(folder)
    assert "\n" not in str(err.value)
    # one inf in one tensor is enough
    last = list(weights)[-1]
    weights[last].view(-1)[0] = float("inf")
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "mmdialog-export"})
    _rehash(folder)
    with pytest.raises(ConfigError, match=rf"weight '{re.escape(last)}' holds 1 NaN/inf values \(1 of {n} tensors"):
        load(folder)


def test_a_model_with_a_nan_weight_is_refused_at_save_and_export_and_nothing_is_written(tmp_path, tiny):
    from mmdialog.core.checkpoint import save_trainable

    name, param = next((n, p) for n, p in tiny.named_parameters() if p.requires_grad)
    index = (0,) * param.dim()
    good = param.detach()[index].item()
    try:
        with torch.no_grad():
            param[index] = float("nan")
        out = tmp_path / "out"
        with pytest.raises(ConfigError, match=rf"^refusing to save the model: weight '{re.escape(name)}' holds 1 "
                                              r"NaN/inf values \(1 of \d+ tensors are not finite\)") as err:
            save_pretrained(tiny, out)
        assert "\n" not in str(err.value)
        assert not out.exists() and list(tmp_path.iterdir()) == []  # not even a temporary folder
        # training's own checkpoint holds it (a diverged run), but it does not become an export
        ckpt = save_trainable(tiny, tmp_path / "run" / "trainable.pt")
        with pytest.raises(ConfigError, match=rf"refusing to export checkpoint '.*trainable.pt': weight "
                                              rf"'{re.escape(name)}' holds 1 NaN/inf"):
            export(ckpt, out)
        assert not out.exists()
        with pytest.raises(ConfigError, match=rf"checkpoint '.*trainable.pt': weight '{re.escape(name)}' holds 1"):
            load(ckpt)  # nor is it loaded
    finally:
        with torch.no_grad():
            param[index] = good


def test_an_older_export_without_sha256_still_loads(tmp_path):
    folder = _copy_export(tmp_path, "v1")
    manifest = _manifest(folder)
    del manifest["sha256"]
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    loaded = load(folder)
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in sharing_model().named_parameters() if p.requires_grad)
    # from version 2 on the digest is part of the format: dropping it is a change
    _manifest(folder, format_version=2)
    with pytest.raises(ConfigError, match="mmdialog.json has no SHA-256 of model.safetensors; the folder is damaged"):
        check_folder(folder)
    _manifest(folder, format_version=3)
    with pytest.raises(ConfigError, match="written by a newer mmdialog"):
        check_folder(folder)


def test_a_model_exported_with_sd_chats_with_library_and_library_sd(tmp_path):
    """Generator weights have one name (``generator.*``) whatever the chain: swapping in a
    retriever keeps the trained UNet; swapping the generator itself leaves its weights out."""
    from mmdialog import Turn, build

    model = build("tiny", generator="sd")
    with torch.no_grad():  # "trained" UNet weights that a fresh build does not have
        for p in model.generator.unet.parameters():
            p.add_(0.01)
    folder = save_pretrained(model, tmp_path / "sd-model")
    trained = {n: p.detach().clone() for n, p in model.generator.unet.named_parameters()}

    chain = load(folder, generator="library,sd")
    assert type(chain.retriever).__name__ == "LibraryGenerator" and type(chain.generator).__name__ == "SDGenerator"
    assert all(torch.equal(p, trained[n]) for n, p in chain.generator.unet.named_parameters())
    shared = chain.share(chain.bridge(*_ids(chain, ["a tabby cat lying on a wooden floor",
                                                   "a purple elephant playing chess"])),
                         mmdialog.GenerationOptions(num_inference_steps=2, seed=0))
    assert [p.source for p in shared] == ["retrieved", "drawn"]
    assert shared[0].file.name == "chelsea.png" and shared[1].plugin == "sd" and shared[1].score < 0.4

    alone = load(folder, generator="library")
    assert type(alone.generator).__name__ == "LibraryGenerator" and alone.retriever is None
    reply = alone.respond([Turn("user", "hi")], max_new_tokens=8)
    assert isinstance(reply.text, str)


def _ids(model, texts):
    """Description ids as the LLM would write them, for the bridge."""
    rows = [model.llm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [model.llm.pad_token_id] * (width - len(r)) for r in rows])
    return ids, torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
