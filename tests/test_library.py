"""generator `library`: real photos, real captions, the real MiniLM embedder; in a chain
(``library,sd``) the assembler puts it in front of a real `sd`."""
import json
import shutil

import pytest
import torch

from mmdialog import ConfigError, GenerationOptions, build, load_config
from mmdialog.core.data.images import caption_from_filename as caption_from_name
from mmdialog.core.interfaces import PromptTokens
from mmdialog.plugins.generators.library import LibraryGenerator, LibraryOptions


@pytest.fixture()
def photo_folder(tmp_path, cat_photo):
    folder = tmp_path / "photos"
    (folder / "kitchen").mkdir(parents=True)
    shutil.copy(cat_photo, folder / "sleepy_tabby-cat.png")                     # caption from the name
    shutil.copy(cat_photo.parent / "coffee.png", folder / "kitchen" / "IMG_0042.png")
    shutil.copy(cat_photo.parent / "rocket.jpg", folder / "launch.jpg")
    (folder / "captions.json").write_text(json.dumps({
        "kitchen/IMG_0042.png": "a cup of espresso on a wooden table",
        "launch.jpg": "a rocket taking off at night", "gone.jpg": "a photo that is not there"}))
    return folder


def test_caption_from_name():
    assert caption_from_name("golden_retriever-onBeach_2.jpg") == "golden retriever on beach 2"


def test_matches_sidecar_captions_and_file_names_and_caches_embeddings(photo_folder, tmp_path):
    ctx = str(tmp_path / "cache")
    with pytest.warns(UserWarning, match="names 1 missing file"):
        gen = LibraryGenerator(LibraryOptions(folder=str(photo_folder)), ctx)
    assert not gen.cache_hit and len(list((tmp_path / "cache" / "library").glob("*.safetensors"))) == 1
    captions = {p.path.name: p.caption for p in gen.photos}
    assert captions == {"IMG_0042.png": "a cup of espresso on a wooden table", "launch.jpg": "a rocket taking off at night",
                        "sleepy_tabby-cat.png": "sleepy tabby cat"}
    # the tower a bridge feeds: MiniLM's fast tokenizer and word embeddings
    tower = gen.text_towers[0]
    assert tower.embedding.weight.shape == (30522, 384)
    ids = tower.tokenizer(["my cat"], return_tensors="pt")["input_ids"]
    texts = ["my cat sleeping", "an espresso coffee", "rocket launch at night"]
    cond = gen.encode([PromptTokens(ids.repeat(3, 1), tower.embedding(ids.repeat(3, 1)), [f" {t} " for t in texts])])
    photos = gen.generate(cond)
    assert [p.file.name for p in photos] == ["sleepy_tabby-cat.png", "IMG_0042.png", "launch.jpg"]
    assert photos[0].image.size == (451, 300) and photos[0].image.mode == "RGB"     # the real photo, full size
    assert all(p.source == "retrieved" and p.plugin == "library" and p.score > 0.4 for p in photos)
    assert photos[1].caption == "a cup of espresso on a wooden table"
    # nothing to train
    loss = gen.loss(cond, torch.rand(3, 3, 64, 64))
    assert loss.item() == 0 and not loss.requires_grad
    assert list(gen.parameter_groups()) == ["embedder"]
    with pytest.warns(UserWarning, match="missing file"):
        again = LibraryGenerator(LibraryOptions(folder=str(photo_folder)), ctx)
    assert again.cache_hit and torch.equal(again.caption_embeddings, gen.caption_embeddings)


def test_library_then_sd_retrieves_good_matches_and_draws_the_rest():
    model = build("tiny", generator="library,sd", overrides={"model.retriever.threshold": 0.45})
    # the assembler composes: the retriever sits in front, the generator (and its weights) stay sd's
    assert type(model.retriever) is LibraryGenerator and type(model.generator).__name__ == "SDGenerator"
    assert "generator.unet" in model.trainable_groups and not any(g.startswith("retriever") for g in
                                                                      model.trainable_groups)
    plain = build("tiny", generator="sd")  # the same random init as a build without the retriever
    assert all(torch.equal(a, b) for a, b in zip(model.generator.parameters(), plain.generator.parameters()))
    prompts = model.generator.text_prompts(["a cup of espresso coffee", "a purple elephant playing chess"])
    photos = model.share(prompts, GenerationOptions(num_inference_steps=2, seed=0))
    assert photos[0].source == "retrieved" and photos[0].file.name == "coffee.png"
    assert photos[0].image.size == (600, 400)
    assert photos[1].source == "drawn" and photos[1].plugin == "sd" and photos[1].image.size == (64, 64)
    assert photos[1].score < 0.45


@pytest.mark.parametrize("spec, message", [
    ({"name": "library", "fallback": {"name": "nope"}}, "unknown generator plugin 'nope'"),
    ({"name": "library", "fallback": {"name": "sd", "steps": 3}}, "model.generator.steps"),
    ("sd,library", "generator plugin 'sd' cannot retrieve photos"),
    ("library,sd,sdxl", "give a generator"),
    ({"name": "library", "threshold": 2}, "model.generator.threshold"),
    ({"name": "library", "threshold": 2, "fallback": {"name": "sd"}}, "model.retriever.threshold"),
])
def test_bad_options_fail_when_the_config_loads(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", generator=spec)


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LibraryGenerator(LibraryOptions(folder=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="no photos"):
        LibraryGenerator(LibraryOptions(folder=str(tmp_path)))
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "captions.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must map file names to captions"):
        LibraryGenerator(LibraryOptions(folder=str(tmp_path)))
