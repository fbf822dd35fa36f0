"""`mmdialog chat` / `export` as users run them: real subprocesses, real models and files."""
import json
from pathlib import Path

import pytest
from sharing_model import CAT_PROMPT, exported_dir, exported_sd_dir, run_cli

from mmdialog.core.config import load_config
from mmdialog.sdk.commands.common import generator_spec


def test_interactive_chat_attaches_photos_saves_shared_ones_and_survives_bad_input(tmp_path, cat_photo):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    script = "\n".join([CAT_PROMPT, f"/image {tmp_path / 'missing.png'}", f"/image {tmp_path / 'broken.jpg'}",
                        f"/image {cat_photo}", "and here is mine", "/bogus", "/quit", ""])
    out = run_cli("chat", str(exported_dir()), "--photos-dir", str(tmp_path / "shared"), "--seed", "0",
                  "--max-new-tokens", "20", stdin=script)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "error: image" in out.stderr and "missing.png' does not exist" in out.stderr
    assert "error: cannot read image" in out.stderr and "broken.jpg" in out.stderr
    assert "error: unknown command /bogus; try /help" in out.stderr
    assert "(attached chelsea.png" in out.stdout
    photo_lines = [line for line in out.stdout.splitlines() if "photo: " in line]
    assert len(photo_lines) == 1 and "my tabby cat (retrieved from the library: chelsea.png)" in photo_lines[0]
    path = Path(photo_lines[0].split("photo: ")[1].split("  — ")[0])
    assert path.parent == tmp_path / "shared" and path.stat().st_size > 10_000


def test_one_shot_message_for_scripts(tmp_path):
    out = run_cli("chat", str(exported_dir()), "--message", CAT_PROMPT, "--json", "--seed", "0",
                  "--photos-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["text"] == "here she is" and reply["shared"]
    photo = reply["photos"][0]
    assert Path(photo["path"]).exists() and photo["source"] == "retrieved" and photo["file"].endswith("chelsea.png")


def test_a_conversation_longer_than_the_context_is_cut_with_one_note(tmp_path):
    long = "tell me more about your day, " * 40
    out = run_cli("chat", str(exported_dir()), *["-m", long] * 5, "--max-new-tokens", "4", "--seed", "0",
                  "--photos-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    notes = [line for line in out.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "dropping the oldest turns" in notes[0], out.stderr[-2000:]
    assert "Warning" not in out.stderr


def test_chat_works_on_the_embedded_default_with_no_setup():
    out = run_cli("chat", "--message", "hi! how are you?", "--max-new-tokens", "8", "--seed", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["chat", "--temprature", "1"], "No such option: --temprature"),
    (["chat", "/no/such/model", "--message", "hi"], "error: model '/no/such/model' does not exist"),
    (["chat", "--message", "hi", "--image", "setup.cfg"], "error: image 'setup.cfg' does not exist"),
    (["chat", "--message", "hi", "--image", "README.md"], "error: cannot read image"),
    (["chat", "--image", "README.md"], "error: --image goes with --message"),
    (["chat", "--generator", "library,", "--message", "hi"], "error: --generator 'library,'"),
    (["export", "/no/such/trainable.pt", "out"], "error: checkpoint '/no/such/trainable.pt' does not exist"),
    (["serve", "--port", "70000"], "Invalid value for '--port'"),
])
def test_user_errors_are_clear_without_a_traceback(args, message):
    out = run_cli(*args, timeout=120)
    assert out.returncode == 2, out.stderr[-1000:]
    assert message in out.stderr, out.stderr[-1000:]
    assert "Traceback" not in out.stderr


def test_export_command_writes_a_folder_that_chat_loads(tmp_path):
    from sharing_model import sharing_model

    from mmdialog.core.checkpoint import save_trainable

    pt = save_trainable(sharing_model(), tmp_path / "run" / "trainable.pt")
    out = run_cli("export", str(pt), str(tmp_path / "model"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exported 184 trainable tensors" in out.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()
    again = run_cli("export", str(pt), str(tmp_path / "model"))
    assert again.returncode == 2 and "is not empty" in again.stderr


@pytest.mark.parametrize("chain", [pytest.param("library", marks=pytest.mark.slow), "library,sd"])
def test_a_model_exported_with_sd_chats_with_a_library_in_front(chain, tmp_path):
    out = run_cli("chat", str(exported_sd_dir()), "--generator", chain, "--message", CAT_PROMPT, "--json",
                  "--seed", "0", "--max-new-tokens", "20", "--steps", "2", "--photos-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["shared"] and len(reply["photos"]) == 1, reply
    photo = reply["photos"][0]
    assert Path(photo["path"]).is_file() and photo["score"] is not None
    if chain == "library":  # alone, the library always shares its best match
        assert photo["source"] == "retrieved" and photo["plugin"] == "library"
    else:  # in front of sd: retrieved at or above the threshold, drawn by sd below it
        assert (photo["source"], photo["plugin"]) == (("retrieved", "library") if photo["score"] >= 0.4
                                                      else ("drawn", "sd"))


def test_the_chat_says_a_photo_was_drawn(tmp_path):
    """A drawn photo (the random-init generator's noise) is not passed off as a real one."""
    out = run_cli("chat", str(exported_sd_dir()), "--generator", "sd", "--message", CAT_PROMPT, "--seed", "0",
                  "--max-new-tokens", "20", "--steps", "2", "--photos-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    photos = [line for line in out.stdout.splitlines() if line.startswith("photo: ")]
    assert len(photos) == 1 and photos[0].endswith(" (drawn by sd)"), out.stdout


def test_generator_spec_writes_the_chain_in_one_shape():
    folder = str(Path(".").resolve())
    assert generator_spec("library,sd") == {"generator": "library,sd"}
    assert generator_spec(None) == {} and generator_spec("sd") == {"generator": "sd"}
    assert generator_spec(None, ".") == {"generator": {"name": "library", "folder": folder}}
    # No legacy ``fallback`` form: the retriever slot, as the config holds it.
    chain = generator_spec("library,sd", ".")
    assert chain == {"generator": {"name": "sd"}, "retriever": {"name": "library", "folder": folder}}
    trained = load_config("tiny", {"model.generator.num_inference_steps": 7, "model.retriever.threshold": 0.3})
    swapped = load_config(trained, **chain)
    assert swapped.model.generator.options == trained.model.generator.options  # the trained sd's options
    assert swapped.model.retriever.options == {"threshold": 0.3, "folder": folder}


def test_serve_command_binds_loopback_and_answers(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from sharing_model import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdialog", "serve", str(exported_dir()),
                             "--port", str(port), "--photos-dir", str(tmp_path), "--seed", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat", json={"messages": [{"role": "user", "content": CAT_PROMPT}]},
                       timeout=120)
        assert r.status_code == 200 and r.json()["photos"][0]["url"].startswith("/files/")
        assert list((tmp_path / "photos").glob("*.png"))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"chat page at http://127.0.0.1:{port}/" in err and "Traceback" not in err
