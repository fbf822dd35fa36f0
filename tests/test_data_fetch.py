"""fetch_images against a real HTTP server on 127.0.0.1 with injected failures (no mocks)."""
from __future__ import annotations

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmdialog.core.data import Dialogue, Photo, Turn, fetch_images, load_dialogues, url_filename


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


class Server:
    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code, body=b"", ctype="image/png", length=None, headers=()):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                if length is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if length is not None:
                    self.close_connection = True

            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                    n = server.hits[self.path]
                p = self.path
                if p.startswith("/ok/"):
                    self._send(200, _png((200, 10, 10)))
                elif p == "/flaky.png":  # 500 first, then fine
                    if n == 1:
                        self._send(500, b"boom", "text/plain")
                    else:
                        self._send(200, _png((0, 200, 0)))
                elif p == "/busy.png":  # 429 with Retry-After, then fine
                    if n == 1:
                        self._send(429, b"slow down", "text/plain", headers=[("Retry-After", "0")])
                    else:
                        self._send(200, _png((0, 0, 200)))
                elif p == "/missing.jpg":
                    self._send(404, b"not found", "text/plain")
                elif p == "/garbage.jpg":  # 200 but not an image
                    self._send(200, b"<html>photo unavailable</html>", "text/html")
                elif p == "/truncated.jpg":  # always cut short
                    body = _jpeg()
                    self._send(200, body[: len(body) // 2], "image/jpeg", length=len(body))
                elif p == "/truncated-once.jpg":  # cut short once, then complete
                    body = _jpeg()
                    if n == 1:
                        self._send(200, body[: len(body) // 3], "image/jpeg", length=len(body))
                    else:
                        self._send(200, body, "image/jpeg")
                else:
                    self._send(404, b"", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _dialogues(base: str) -> list[Dialogue]:
    paths = ["/ok/a.png", "/ok/b.png", "/flaky.png", "/busy.png", "/missing.jpg", "/garbage.jpg",
             "/truncated.jpg", "/truncated-once.jpg", "/ok/a.png"]  # a.png twice: fetched once
    turns = [Turn("0", f"photo {i}", [Photo(url=base + p, description=p)]) for i, p in enumerate(paths)]
    turns.append(Turn("1", "no url", [Photo(id="local-only")]))
    return [Dialogue("d1", turns[:5]), Dialogue("d2", turns[5:])]


def test_fetch_with_failures_and_resume(server, tmp_path):
    ds = _dialogues(server.base)
    out = tmp_path / "images"
    rep = fetch_images(ds, out, workers=4, retries=2, backoff=0.01, timeout=5)
    b = server.base
    assert rep.total == 8 and rep.no_url == 1
    assert rep.downloaded == 5 and rep.failed == 3 and rep.skipped == 0, rep.failures
    failed = {f.url: f for f in rep.failures}
    assert set(failed) == {b + "/missing.jpg", b + "/garbage.jpg", b + "/truncated.jpg"}
    assert "HTTP 404" in failed[b + "/missing.jpg"].error and failed[b + "/missing.jpg"].attempts == 1
    assert "not a valid image" in failed[b + "/garbage.jpg"].error and failed[b + "/garbage.jpg"].attempts == 3
    assert "truncated" in failed[b + "/truncated.jpg"].error and failed[b + "/truncated.jpg"].attempts == 3
    assert server.hits["/missing.jpg"] == 1 and server.hits["/garbage.jpg"] == 3
    assert server.hits["/flaky.png"] == 2 and rep.attempts[b + "/flaky.png"] == 2
    assert server.hits["/busy.png"] == 2 and server.hits["/truncated-once.jpg"] == 2
    assert server.hits["/ok/a.png"] == 1  # deduplicated
    for p in ("/ok/a.png", "/ok/b.png", "/flaky.png", "/busy.png", "/truncated-once.jpg"):
        f = out / url_filename(b + p)
        assert f.is_file()
        Image.open(f).verify()
    assert not (out / url_filename(b + "/garbage.jpg")).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # photo paths were updated
    assert ds[0].turns[0].photos[0].path == out / url_filename(b + "/ok/a.png")
    assert ds[0].turns[4].photos[0].path is None  # 404

    # resume: present files are skipped, only the failures are tried again
    before = server.hits.copy()
    rep2 = fetch_images(ds, out, workers=2, retries=0, backoff=0.01, timeout=5)
    assert rep2.skipped == 5 and rep2.downloaded == 0 and rep2.failed == 3
    assert server.hits["/ok/a.png"] == before["/ok/a.png"]
    assert server.hits["/missing.jpg"] == before["/missing.jpg"] + 1

    # the downloaded folder is what load_dialogues(image_dir=...) finds
    from mmdialog.core.data import write_jsonl

    for d in ds:
        for ph in d.photos:
            ph.path = None
    write_jsonl(ds, tmp_path / "d.jsonl")
    r = load_dialogues(tmp_path / "d.jsonl", image_dir=out)
    assert r.report.images_found == 6 and r.report.missing_images == 4  # a.png counted twice


def test_rate_limit_and_bad_scheme(server, tmp_path):
    import time

    urls = [f"{server.base}/ok/{i}.png" for i in range(5)]
    ds = [Dialogue("d", [Turn("0", "x", [Photo(url=u) for u in urls] + [Photo(url="ftp://h/x.jpg")])])]
    t = time.monotonic()
    rep = fetch_images(ds, tmp_path, workers=5, rate_limit=20.0, backoff=0.01)
    assert time.monotonic() - t >= 0.19  # 5 requests at 20/s: ≥ 4 intervals of 50 ms
    assert rep.downloaded == 5 and rep.failed == 1 and "unsupported URL scheme" in rep.failures[0].error


def test_connection_refused_is_retried_and_reported(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    ds = [Dialogue("d", [Turn("0", "x", [Photo(url=f"http://127.0.0.1:{port}/a.jpg")])])]
    rep = fetch_images(ds, tmp_path, retries=1, backoff=0.01, timeout=2)
    assert rep.failed == 1 and rep.failures[0].attempts == 2


def test_cli_fetch_images_against_local_server(tmp_path):
    from typer.testing import CliRunner

    from mmdialog.sdk.cli import app

    runner = CliRunner()
    s = Server()
    try:
        recs = [{"id": "x", "turns": [{"speaker": "0", "text": "hi", "photos": [
            {"url": f"{s.base}/ok/1.png"}, {"url": f"{s.base}/missing.jpg"}]}]}]
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps(recs))
        out = tmp_path / "img"
        res = runner.invoke(app, ["data", "fetch-images", str(f), "--out", str(out), "--workers", "2",
                                     "--retries", "1", "--backoff", "0.01", "-q"])
        assert res.exit_code == 1, res.output
        assert "downloaded: 1" in res.output and "failed: 1" in res.output and "HTTP 404" in res.output
        res = runner.invoke(app, ["data", "check", str(f), "--image-dir", str(out)])
        assert "images found    1" in res.output and "missing images  1" in res.output
    finally:
        s.close()
