"""Save / load: a trained model exported to a folder comes back identical;
a folder changed after export (any file that decides what loads), a manifest
downgraded to skip the digests, or weights holding NaN / inf, are refused; an
export names no path of the machine it was written on, and an odd destination
is refused before anything is built."""
import hashlib
import json
import re
import shutil

import pytest
import torch
import yaml
from sharing_model import CAT_PROMPT, exported_dir, run_cli, sharing_model

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


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rehash(folder):
    """Record every file's current SHA-256, as a careful tamperer would."""
    _manifest(folder, sha256={name: _sha(folder / name) for name in _manifest(folder)["sha256"]})


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
    assert manifest["format_version"] == 3
    covered = ["model.safetensors", "config.yaml", "tokenizer_additions.json", "metrics.json"]
    assert manifest["sha256"] == {name: _sha(folder / name) for name in covered}
    assert all(digest in (folder / "README.md").read_text() for digest in manifest["sha256"].values())
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


@pytest.mark.parametrize("name, change", [
    ("config.yaml", lambda text: text.replace("strict: false", "strict: true")),
    ("tokenizer_additions.json", lambda text: text.replace('"[img]": 49152', '"[img]": 49153')),
])
def test_config_and_tokenizer_additions_are_covered_by_the_digests(tmp_path, name, change):
    folder = _copy_export(tmp_path, "changed")
    before = (folder / name).read_text()
    (folder / name).write_text(change(before))
    assert (folder / name).read_text() != before
    with pytest.raises(ConfigError, match=rf"{name} does not match the SHA-256 recorded in mmdialog.json"):
        load(folder)


def _downgrade(folder, version, digests=None):
    manifest = _manifest(folder)
    manifest.pop("sha256")
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": version,
                                               **({"sha256": digests} if digests else {})}))


def test_a_manifest_rewritten_to_format_1_over_flipped_weights_is_refused(tmp_path):
    folder = _copy_export(tmp_path, "downgraded")
    flipped = bytearray((folder / WEIGHTS).read_bytes())
    flipped[-3] ^= 0x01
    (folder / WEIGHTS).write_bytes(bytes(flipped))
    _downgrade(folder, 1)
    for entry in (load, check_folder):
        with pytest.raises(ConfigError, match=r"its mmdialog.json \(format version 1\) records no SHA-256 of "
                                              r"model.safetensors, config.yaml, tokenizer_additions.json, so "
                                              r"nothing shows .* `mmdialog export --upgrade .*downgraded`, or .* "
                                              r"--allow-unverified") as err:
            entry(folder)
        assert "\n" not in str(err.value)
    # A version-2 manifest (the weights' digest only) cannot vouch for a changed config either.
    folder = _copy_export(tmp_path, "v2")
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("strict: false", "strict: true"))
    _downgrade(folder, 2, {WEIGHTS: _sha(folder / WEIGHTS)})
    with pytest.raises(ConfigError, match=r"format version 2\) records no SHA-256 of config.yaml, "
                                          r"tokenizer_additions.json"):
        load(folder)


def test_an_older_export_loads_when_asked_or_once_upgraded(tmp_path):
    from mmdialog.core.export import upgrade_folder

    trained = {n: p for n, p in sharing_model().named_parameters() if p.requires_grad}
    folder = _copy_export(tmp_path, "v1")
    _downgrade(folder, 1)
    loaded = load(folder, allow_unverified=True)
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in trained.items())
    assert upgrade_folder(folder) == (folder, 1)
    manifest = _manifest(folder)
    assert manifest["format_version"] == 3 and set(manifest["sha256"]) >= {WEIGHTS, "config.yaml",
                                                                          "tokenizer_additions.json"}
    check_folder(folder)  # verified now, without being asked
    # The digests a version-2 manifest has must still hold: an upgrade does not bless changed weights.
    folder = _copy_export(tmp_path, "v2-flipped")
    _downgrade(folder, 2, {WEIGHTS: _sha(folder / WEIGHTS)})
    flipped = bytearray((folder / WEIGHTS).read_bytes())
    flipped[-3] ^= 0x01
    (folder / WEIGHTS).write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="model.safetensors does not match the SHA-256"):
        upgrade_folder(folder)
    # From version 2 on the weights' digest is part of the format: dropping it is a change.
    _downgrade(folder, 2)
    with pytest.raises(ConfigError, match="mmdialog.json has no SHA-256 of model.safetensors; the folder is damaged"):
        check_folder(folder, allow_unverified=True)
    _manifest(folder, format_version=4)
    with pytest.raises(ConfigError, match="written by a newer mmdialog"):
        check_folder(folder)


def test_the_cli_upgrades_and_loads_unverified_only_when_asked(tmp_path):
    folder = _copy_export(tmp_path, "v1")
    _downgrade(folder, 1)
    proc = run_cli("chat", str(folder), "-m", "hi", "--max-new-tokens", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model folder") and "--allow-unverified" in \
        proc.stderr.strip().splitlines()[-1]
    proc = run_cli("chat", str(folder), "-m", "hi", "--max-new-tokens", "4", "--allow-unverified")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("export", "--upgrade", str(folder))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "manifest format 1 → 3" in proc.stdout and _manifest(folder)["format_version"] == 3
    check_folder(folder)


def test_an_export_names_no_path_of_the_training_machine(tmp_path):
    from mmdialog.core.checkpoint import save_trainable

    model = sharing_model()
    run = tmp_path / "machine-specific" / "run"
    old = model.config
    model.config = old.model_copy(update={"train": old.train.model_copy(update={"out_dir": str(run)})})
    try:
        pt = save_trainable(model, run / "trainable.pt")
    finally:
        model.config = old
    assert str(run) in torch.load(pt, weights_only=True)["config"]  # the checkpoint has it, the export must not
    out = export(pt, tmp_path / "out")
    for name in ("config.yaml", "README.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "machine-specific" not in text, name
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["out_dir"] == "runs/mmdialog"


def _odd_places(tmp_path):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a-folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    return {
        "a symlink": (tmp_path / "link", "is a symbolic link; give the path of a new folder"),
        "a dangling symlink": (tmp_path / "dangling", "is a symbolic link that points nowhere"),
        "an existing file": (tmp_path / "a-file", "exists and is not a folder"),
        "under a file": (tmp_path / "a-file" / "out", "'.*a-file' is not a folder"),
    }


def test_export_to_an_odd_place_is_refused_before_anything_is_read_or_built(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")  # reading it would be the checkpoint's own error
    for name, (out, message) in _odd_places(tmp_path).items():
        with pytest.raises(ConfigError, match=message) as err:
            export(tmp_path / "junk.pt", out)
        assert "\n" not in str(err.value), name
    assert (tmp_path / "a-file").read_text() == "x" and not (tmp_path / "nowhere").exists()
    assert list((tmp_path / "a-folder").iterdir()) == []


def test_the_cli_refuses_an_odd_export_place_in_one_line(tmp_path):
    from mmdialog.core.checkpoint import save_trainable

    pt = save_trainable(sharing_model(), tmp_path / "run" / "trainable.pt")
    out, message = _odd_places(tmp_path)["a dangling symlink"]
    proc = run_cli("export", str(pt), str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and lines[-1].startswith("error: output"), \
        proc.stderr[-2000:]
    assert message in lines[-1]


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
