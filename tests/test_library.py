"""generator `library`: real photos, real captions, the real MiniLM embedder, composed with a real `sd`."""
import json
import shutil

import pytest
import torch

from mmdialog import ConfigError, load_config
from mmdialog.core.interfaces import BuildContext, PromptTokens
from mmdialog.plugins.generators.library import (
    LibraryGenerator,
    LibraryOptions,
    caption_from_name,
)


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
    ctx = BuildContext(cache_dir=str(tmp_path / "cache"))
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
    images = gen.generate(cond)
    assert [img.info["source"].rsplit("/", 1)[-1] for img in images] == ["sleepy_tabby-cat.png", "IMG_0042.png", "launch.jpg"]
    assert images[0].size == (451, 300) and images[0].mode == "RGB"     # the real photo, full size
    assert all(m.retrieved and m.score > 0.4 for m in gen.last_matches)
    # nothing to train without a fallback
    loss = gen.loss(cond, torch.rand(3, 3, 64, 64))
    assert loss.item() == 0 and not loss.requires_grad
    assert list(gen.parameter_groups()) == ["embedder"]
    with pytest.warns(UserWarning, match="missing file"):
        again = LibraryGenerator(LibraryOptions(folder=str(photo_folder)), ctx)
    assert again.cache_hit and torch.equal(again.caption_embeddings, gen.caption_embeddings)


def test_library_then_sd_retrieves_good_matches_and_draws_the_rest(tmp_path):
    gen = LibraryGenerator(LibraryOptions(threshold=0.45, fallback={"name": "sd", "num_inference_steps": 2}),
                           BuildContext(cache_dir=str(tmp_path)))
    # the fallback's towers and parameter groups, so bridges and the freeze policy see SD
    assert gen.text_towers is gen.fallback.text_towers and gen.resolution == 64
    assert {"unet", "vae", "text_encoder"} <= set(gen.parameter_groups())
    prompts = gen.fallback.text_prompts(["a cup of espresso coffee", "a purple elephant playing chess"])
    cond = gen.encode(prompts)
    images = gen.generate(cond, num_inference_steps=2, seed=0)
    assert images[0].info["source"].endswith("coffee.png") and images[0].size == (600, 400)
    assert images[1].info["source"] == "generated:sd" and images[1].size == (64, 64)
    assert [m.retrieved for m in gen.last_matches] == [True, False]
    assert gen.loss(cond, torch.rand(2, 3, 64, 64)).requires_grad     # the UNet trains as with plain sd


@pytest.mark.parametrize("spec, message", [
    ({"name": "library", "fallback": {"name": "nope"}}, "unknown generator plugin 'nope'"),
    ({"name": "library", "fallback": {"name": "sd", "steps": 3}}, "fallback.steps"),
    ({"name": "library", "fallback": {"name": "library"}}, "cannot fall back to another library"),
    ({"name": "library", "threshold": 2}, "model.generator.threshold"),
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
