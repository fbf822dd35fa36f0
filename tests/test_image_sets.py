"""FID / KID / IS over the reference's photo sets: which photos are scored,
the reasons the table gives for a missing metric, the Inception weights file
read safely, and the `metrics` extra (torch-fidelity) on the CPU."""
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdialog.core.errors import ConfigError, DependencyError
from mmdialog.core.evaluation import GeneratedTurn, score
from mmdialog.core.evaluation.evaluate import image_sets
from mmdialog.core.evaluation.metrics import image as I
from mmdialog.core.evaluation.table import results_table

ROOT = Path(__file__).resolve().parents[1]


def _skimage(name):
    import skimage

    return Path(skimage.__file__).parent / "data" / name


def _fidelity_importable() -> bool:
    try:
        I.require_torch_fidelity()
        return True
    except DependencyError:
        return False


def _turn(key, description=None, image=None, gold_description=None, gold_image=None):
    reply = f"here [img] {description} [/img]" if description is not None else "nice"
    gold = f"look [img] {gold_description} [/img]" if gold_description is not None else "nice"
    return GeneratedTurn(key, "0", reply, gold, description is not None, gold_description is not None,
                         description, gold_description, str(image) if image else None,
                         str(gold_image) if gold_image else None)


def _crafted(tmp_path):
    """Seven turns covering every case of the reference's sets (real photo files)."""
    gen1, gen2 = _skimage("chelsea.png"), _skimage("coffee.png")
    gold1, gold2 = _skimage("astronaut.png"), _skimage("motorcycle_left.png")
    return [
        _turn("both", "a cat", gen1, "an astronaut", gold1),          # generated and gold
        _turn("gold only", None, None, "a motorbike", gold2),         # reply shares none: gold still counts
        _turn("generated only", "coffee", gen2, None, None),          # gold shares none: generated still counts
        _turn("gold without path", None, None, "a dog", None),        # gold photo with no file: not scored
        _turn("gold file missing", None, None, "a dog", tmp_path / "gone.jpg"),
        _turn("neither", None, None, None, None),
        _turn("not drawn", "a boat", None, None, None),               # described but no photo drawn
    ]


def test_the_sets_are_every_generated_and_every_gold_photo_unpaired(tmp_path):
    turns = _crafted(tmp_path)
    generated, gold, _ = image_sets(turns)
    assert generated == [str(_skimage("chelsea.png")), str(_skimage("coffee.png"))]
    assert gold == [str(_skimage("astronaut.png")), str(_skimage("motorcycle_left.png"))]
    r = score(turns, image_size=64)
    assert (r["n_generated"], r["n_gold"], r["is_splits"]) == (2, 2, 2)
    assert r["fid"] > 0 and r["kid_mean"] is not None and r["is_mean"] >= 1.0 - 1e-6
    assert r["comparable"] is False and not {"fid", "is_mean", "kid_mean"} & set(r["reasons"])
    table = results_table([{"model": "m", "dataset": "d", **r}])
    header, _, row = table.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["Turns"] == "7" and cells["Photos gen."] == "2" and cells["Photos gold"] == "2"
    assert cells["FID ↓"].endswith("†") and "not comparable" in table


def _cells_with_reasons(table):
    """Each missing cell's header and the reason its footnote gives."""
    lines = table.splitlines()
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    notes = dict(re.findall(r"^- \((\d+)\) (.*)$", table, re.M))
    out = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        for h, c in zip(headers, [c.strip() for c in line.strip("|").split("|")]):
            assert c != "–", f"bare – in column {h}"
            m = re.fullmatch(r"– \((\d+)\)", c)
            if m:
                out.append((h, notes[m.group(1)]))
    return out


def test_missing_image_metrics_say_why(tmp_path):
    nothing = [_turn("a"), _turn("b")]
    not_drawn = [_turn("a", "a cat", None, "a dog", _skimage("astronaut.png")), _turn("b", "a boat")]
    no_files = [_turn("a", "a cat", _skimage("chelsea.png"), "a dog", None),
                _turn("b", "coffee", _skimage("coffee.png"), "a dog", tmp_path / "gone.jpg")]
    rows = [{"model": name, **score(turns, image_size=64)}
            for name, turns in (("nothing", nothing), ("not drawn", not_drawn), ("no files", no_files))]
    table = results_table(rows)
    reasons = _cells_with_reasons(table)
    assert ("FID ↓", "no reply shared a photo") in reasons
    assert ("IS ↑", "no photos drawn (--no-images)") in reasons
    assert ("FID ↓", "no gold photos with files (2 gold turns share one)") in reasons
    assert ("Dataset", "not reported for this row") in reasons
    # the row with generated photos but no gold ones still has its IS
    assert rows[2]["is_mean"] >= 1.0 - 1e-6 and rows[2]["fid"] is None
    one_gold = score([_turn("a", "a cat", _skimage("chelsea.png"), "a dog", _skimage("astronaut.png")),
                      _turn("b", "coffee", _skimage("coffee.png"))], image_size=64)
    assert one_gold["reasons"]["fid"] == "fewer than 2 gold photos (1)"
    assert one_gold["reasons"]["kid_mean"] == "fewer than 2 gold photos (1)"


def test_inception_weights_are_read_safely(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        I.load_inception_weights(tmp_path / "missing.pth")
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ConfigError, match="not a readable weights file"):
        I.load_inception_weights(evil)
    assert not marker.exists()
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, other)
    with pytest.raises(ConfigError, match="not torch-fidelity's Inception-v3"):
        I.load_inception_weights(other)
    from safetensors.torch import save_file

    good = {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.ones(1008, 2048)}
    save_file(good, tmp_path / "w.safetensors")
    torch.save(good, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        state = I.load_inception_weights(tmp_path / name)
        assert torch.equal(state["fc.weight"], good["fc.weight"])


def test_metrics_extra_declares_torch_fidelity_and_torchvision():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in extras["metrics"]}
    assert {"torch-fidelity", "torchvision", "sacrebleu", "rouge-score"} <= names


@pytest.mark.skipif(_fidelity_importable(), reason="torch-fidelity imports here: no missing-extra error to see")
def test_fid_without_the_extra_is_a_one_line_error(tmp_path):
    with pytest.raises(DependencyError, match=re.escape("pip install 'mmdialog[metrics]'")):
        I.set_scores([_skimage("chelsea.png")] * 2, [_skimage("coffee.png")] * 2, tmp_path / "w.pth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mmdialog", "eval", "--inception-weights", str(tmp_path / "w.pth"),
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "pip install 'mmdialog[metrics]'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "eval" / "results.md").exists()


def _random_inception_file(path):
    """A random-init Inception-v3 in the exact layout torch-fidelity's
    ``inception-v3-compat`` extractor loads (its own modules, never trained)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh initialisation
            return None

    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():  # He init keeps activations O(1) through the 90-odd ReLU layers (the default fades)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow  # two FIDs of 2048-d features through a full Inception-v3 on the CPU: ~40 s
@pytest.mark.skipif(not _fidelity_importable(), reason="the metrics extra (torch-fidelity + torchvision) does "
                    "not import here; install it with pip install 'mmdialog[metrics]'")
def test_torch_fidelity_scores_the_sets_with_a_local_weights_file(tmp_path):
    weights = _random_inception_file(tmp_path / "inception.pth")
    a = [_skimage(n) for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    b = [_skimage(n) for n in ("brick.png", "grass.png", "gravel.png", "moon.png")]
    same = I.set_scores(a, a, weights, size=128)
    turns = [_turn(str(i), "x", g, "y", r) for i, (g, r) in enumerate(zip(a, b))]
    other = score(turns, inception_weights=str(weights), image_size=128)  # generated a vs gold b
    assert same["comparable"] is True and "torch-fidelity" in same["feature_extractor"]
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and other["fid"] > 1e3 * max(same["fid"], 1e-6)
    assert other["kid_mean"] > same["kid_mean"]
    for r in (same, other):
        assert r["is_mean"] >= 1.0 - 1e-6 and math.isfinite(r["is_std"])
        assert (r["n_generated"], r["n_gold"], r["is_splits"]) == (4, 4, 4)
    table = results_table([{"model": "m", **other}])
    assert "†" not in table and "| 4 | 4 |" in table
