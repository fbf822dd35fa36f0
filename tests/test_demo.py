"""The demo (`make demo`): the tiny preset's recipe, its "when to share" dialogues, the
scripted chat it ends with, and (slow) the whole recipe end to end."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sharing_model import CAT_PROMPT, HELLO_PROMPT, ROOT, exported_dir, run_cli

from mmdialog.core.config import load_config
from mmdialog.core.data.demo import demo_library, share_dialogues
from mmdialog.core.data.source import read_dialogues

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_demo import CONVERSATIONS  # noqa: E402

#: What `make demo`'s scripted chat printed (the Makefile keeps it beside the run).
DEMO_CHAT_LOG = ROOT / "runs" / "tiny" / "demo-chat.txt"


def test_the_tiny_preset_is_the_demo_recipe_with_a_real_photo_library():
    cfg = load_config("tiny")
    assert cfg.model.retriever.name == "library" and cfg.model.generator.name == "sd"
    assert cfg.data.path == "embedded:demo-share"
    dialogues, summary = read_dialogues(cfg.data, "train")
    assert summary == "embedded:demo-share (train): 40 dialogues"
    # Both speakers are agents: the asker's and small talk's turns teach *not* sharing.
    assert cfg.data.both_speakers
    sharing = [d for d in dialogues if d.photos]
    assert len(sharing) == 30 and len(dialogues) - len(sharing) == 10
    # Sixteen share again later in the conversation (two or three photos, asked at different points),
    # as PhotoChat and DialogCC conversations do: a photo in the context does not end sharing.
    again = [d for d in sharing if sum(bool(t.photos) for t in d.turns) > 1]
    assert len(again) == 16 and sum(sum(bool(t.photos) for t in d.turns) == 3 for d in again) == 5
    assert all(len({p.path for p in d.photos}) == len(d.photos) for d in again)  # different things
    # A photo is shared in the turn right after it is asked for or the offer is taken.
    for d in sharing:
        i = next(i for i, t in enumerate(d.turns) if t.photos)
        assert i > 0 and d.turns[i - 1].speaker != d.turns[i].speaker, d.id
    assert [len(share_dialogues(s)) for s in ("dev", "test")] == [2, 2]


def test_the_demo_prompts_are_not_training_turns():
    """The benchmark's requests and small talk are held out: none is a training turn."""
    seen = {t.text.lower() for d in share_dialogues(None) for t in d.turns}
    prompts = {text.lower() for conversation in CONVERSATIONS for text, _ in conversation}
    assert len(prompts) == 32 and not seen & prompts


def readme_transcript() -> str:
    """The transcript block of the README's "Five minutes" section."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"\n```\n(you> .*?)```\n", text, re.DOTALL).group(1)


def comparable(transcript: str) -> str:
    """A transcript with each saved photo's random file name as one placeholder."""
    return re.sub(r"[0-9a-f]{32}\.png", "PHOTO.png", transcript).strip()


def test_the_readme_transcript_is_what_make_demo_prints():
    """`make demo` keeps its chat's output (runs/tiny/demo-chat.txt); the README shows exactly
    that. CI runs `make demo` first and sets MMDIALOG_REQUIRE_DEMO, so there it never skips."""
    if not DEMO_CHAT_LOG.is_file():
        if os.environ.get("MMDIALOG_REQUIRE_DEMO"):
            pytest.fail(f"{DEMO_CHAT_LOG} is missing: run `make demo` first")
        pytest.skip("no `make demo` run in runs/tiny")
    assert comparable(readme_transcript()) == comparable(DEMO_CHAT_LOG.read_text())


def test_each_demo_description_retrieves_its_own_photo():
    """What the model learns to write between [img] and [/img] finds, with the real
    MiniLM, the very photo of that turn in the embedded library, above the threshold."""
    from mmdialog.plugins.generators.library import LibraryGenerator, LibraryOptions

    library = LibraryGenerator(LibraryOptions())
    assert {p.path for p in library.photos} == {p for p, _ in demo_library()}
    photos = [p for d in share_dialogues(None) for p in d.photos]
    assert {p.path for p in photos} <= {p.path for p in library.photos}
    for photo, match in zip(photos, library.match([p.description for p in photos])):
        assert match.file == photo.path and match.score >= library.threshold, (photo.description, match.score)


def test_repeated_messages_are_one_conversation_printed_turn_by_turn(tmp_path):
    out = run_cli("chat", str(exported_dir()), "-m", HELLO_PROMPT, "-m", CAT_PROMPT, "--seed", "0",
                  "--photos-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    you = [i for i, line in enumerate(lines) if line.startswith("you> ")]
    assert [lines[i] for i in you] == [f"you> {HELLO_PROMPT}", f"you> {CAT_PROMPT}"]
    assert all(lines[i + 1].startswith("assistant> ") for i in you)
    assert "photo: " not in "\n".join(lines[:you[1]])
    photo = [line for line in lines[you[1]:] if line.startswith("photo: ")]
    assert len(photo) == 1 and photo[0].endswith("(retrieved from the library: chelsea.png)")
    assert Path(photo[0].split("photo: ")[1].split("  — ")[0]).parent == tmp_path


@pytest.mark.slow
def test_make_demo_trains_a_model_that_shares_again_and_again(tmp_path):
    """The demo's two commands (Makefile `demo`) with the tiny preset as it is, then the demo
    benchmark: its scripted conversations share at every position, not on small talk, the right
    library photo, and every reply is clean."""
    out = run_cli("train", "--quiet", "--out-dir", str(tmp_path / "run"), timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 100 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    chat = re.search(r'DEMO_CHAT := (.*?)\n\n', (ROOT / "Makefile").read_text(), re.DOTALL).group(1)
    messages = re.findall(r'-m "([^"]*)"', chat)
    out = run_cli("chat", str(tmp_path / "run"), "--seed", "0", "--photos-dir", "runs/tiny/photos",
                  *[a for m in messages for a in ("-m", m)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert comparable(out.stdout) == comparable(readme_transcript())
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_demo.py"), "--model",
                            str(tmp_path / "run"), "--limit", "0"], capture_output=True, text=True, timeout=1800)
    assert bench.returncode == 0, bench.stderr[-2000:]
    r = json.loads(bench.stdout)
    assert r["share_rate_small_talk"] <= 0.2 and r["unclean_replies"] == [], r
    assert min(r["share_rate_by_position"].values()) >= 0.8 and r["right_photo_rate"] >= 0.8, r
