"""A real model that shares photos, for the chat / serve / export tests.

The embedded default (real SmolLM2 + LoRA) with the ``library`` generator,
fine-tuned for a few real optimizer steps on three short dialogues until it
writes ``[img] my tabby cat [/img]`` when asked for its cat. Built once per
test process (~15 s on 2 cores) and exported once; the exported folder is what
the CLI and server tests load.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CAT_PROMPT = "show me your cat"
COFFEE_PROMPT = "what are you drinking?"
HELLO_PROMPT = "hello there"
ROOT = Path(__file__).resolve().parents[1]


def dialogues():
    """The photos have files (scikit-image's), so the model learns what follows a
    photo it has *seen*: at inference the shared photo is perceived before it goes on."""
    import skimage

    from mmdialog import Dialogue, Photo, Turn

    data = Path(skimage.__file__).parent / "data"
    return [
        Dialogue("cat", [Turn("user", CAT_PROMPT),
                         Turn("assistant", "here she is", [Photo(description="my tabby cat",
                                                                 path=data / "chelsea.png")])]),
        Dialogue("coffee", [Turn("user", COFFEE_PROMPT),
                            Turn("assistant", "an espresso, look", [Photo(description="a cup of espresso coffee",
                                                                          path=data / "coffee.png")])]),
        Dialogue("hi", [Turn("user", HELLO_PROMPT), Turn("assistant", "hi! how are you?")]),
        # A greeting after a shared photo gets none: a photo in the context does not mean "share".
        Dialogue("cat-hi", [Turn("user", CAT_PROMPT),
                            Turn("assistant", "here she is", [Photo(description="my tabby cat",
                                                                    path=data / "chelsea.png")]),
                            Turn("user", HELLO_PROMPT), Turn("assistant", "hi! how are you?")]),
    ]


def fine_tune(model, steps: int = 14, lr: float = 3e-3) -> None:
    batch = model.collator([(d, "assistant") for d in dialogues()])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@functools.lru_cache(maxsize=1)
def sharing_model():
    from mmdialog import build

    model = build("tiny", generator="library")
    fine_tune(model)
    return model


@functools.lru_cache(maxsize=1)
def exported_dir() -> Path:
    from mmdialog.core.export import save_pretrained

    out = Path(tempfile.mkdtemp(prefix="mmdialog-test-export-")) / "model"
    save_pretrained(sharing_model(), out, metrics={"bleu2": 12.5, "note": "test"})
    return out


@functools.lru_cache(maxsize=1)
def exported_sd_dir() -> Path:
    """The same fine-tuning on the tiny preset with generator ``sd`` alone (no retriever),
    exported: a model whose trained generator weights are SD's."""
    from mmdialog import build
    from mmdialog.core.export import save_pretrained

    model = build("tiny", generator="sd")
    fine_tune(model)
    out = Path(tempfile.mkdtemp(prefix="mmdialog-test-export-sd-")) / "model"
    save_pretrained(model, out)
    return out


def run_cli(*args: str, stdin: str | None = None, timeout: int = 300,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``mmdialog ARGS`` in a real subprocess (chat/serve/export registered on the app), from ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mmdialog", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


class ServerThread:
    """A real uvicorn server on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app, limits=None) -> None:
        import socket
        import threading
        import time

        import uvicorn

        from mmdialog.sdk.server.serving import uvicorn_config

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, limits or app.state.server.limits, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@functools.lru_cache(maxsize=1)
def shared_server():
    """One server for the HTTP and browser tests (small limits, to test them)."""
    from mmdialog.sdk.server import Limits, create_app

    out = Path(tempfile.mkdtemp(prefix="mmdialog-test-serve-"))
    limits = Limits(max_body_bytes=3 * 2**20, max_image_bytes=2**20, max_images=2, max_messages=6,
                    max_new_tokens=32, max_queue=1, max_batch=2)
    app = create_app(sharing_model(), out, limits, seed=0, max_new_tokens=20)
    return ServerThread(app), app
