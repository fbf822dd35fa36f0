"""`mmdialog serve` serves only its page: Host (DNS rebinding), Origin (other web
pages), the API key, malformed bodies that used to be 500s, decompression bombs,
uploads that live only for their request and /files/ that serves only this
server's own photos. Real uvicorn servers; raw sockets where the test must
control Host and Origin byte for byte."""
import base64
import concurrent.futures
import io
import json
import os
import socket
import time
import uuid
import zlib

import httpx
import pytest
from PIL import Image
from sharing_model import CAT_PROMPT, HELLO_PROMPT, ServerThread, run_cli, sharing_model

from mmdialog.core.errors import ConfigError
from mmdialog.sdk.server import Limits, create_app

EXTRA_HOST = "chat.example.test"
KEY = "s3cret-key_0123456789"
LIMITS = Limits(max_body_bytes=3 * 2**20, max_image_bytes=2**20, max_images=2, max_messages=6, max_new_tokens=32)


class Server:
    """A real server plus what its factory saw in the uploads folder while it ran."""

    def __init__(self, out_dir, **kwargs) -> None:
        model = sharing_model()
        self.during: list[list[str]] = []

        def factory(photos_dir):
            self.during.append(sorted(p.name for p in (out_dir / "uploads").glob("*")) if out_dir.exists() else [])
            return model.session(photos_dir=photos_dir, seed=0, max_new_tokens=20)

        self.app = create_app(factory, out_dir, LIMITS, **kwargs)
        self.thread = ServerThread(self.app)
        self.url, self.port = self.thread.url, self.thread.sock.getsockname()[1]
        self.uploads, self.photos = out_dir / "uploads", out_dir / "photos"

    def served(self) -> int:
        return self.app.state.counters["served"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("trust") / "out", allowed_hosts=[EXTRA_HOST])
    yield s
    s.thread.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("keyed") / "out", api_key=KEY)
    yield s
    s.thread.stop()


# -- raw HTTP/1.1 ---------------------------------------------------------------------------------
def raw(port: int, method: str, path: str, host: str | None, headers: dict | None = None, body: bytes = b"",
        send_body: bool = True, timeout: float = 120) -> tuple[int, dict, bytes]:
    """Write one request by hand and read the answer to EOF. ``host=None``: no Host
    header, as HTTP/1.0 (uvicorn itself refuses an HTTP/1.1 request without one)."""
    head = [f"{method} {path} HTTP/1.1" if host is not None else f"{method} {path} HTTP/1.0"]
    head += [f"Host: {host}"] if host is not None else []
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and not any(k.lower() == "content-length" for k in headers or {}):
        head.append(f"Content-Length: {len(body)}")
    head.append("Connection: close")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if send_body else b""))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    top, _, content = response.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    return status, {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}, content


def raw_error(result, status: int, code: str) -> str:
    got, headers, content = result
    assert got == status, content
    assert headers["content-type"] == "application/json"
    err = json.loads(content)["error"]
    assert err["code"] == code and err["message"] and "\n" not in err["message"]
    return err["message"]


def small_png(size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(text: str, image: bytes | None = small_png(), max_new_tokens: int = 4) -> tuple[str, bytes]:
    """What a page's <form enctype=multipart/form-data> or fetch(FormData) sends."""
    boundary = uuid.uuid4().hex
    parts = [("messages", None, json.dumps([{"role": "user", "content": text}]).encode()),
             ("options", None, json.dumps({"max_new_tokens": max_new_tokens}).encode())]
    if image is not None:
        parts.append(("images", "cat.png", image))
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        out += b"Content-Type: image/png\r\n\r\n" if filename else b"\r\n"
        out += data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", out + f"--{boundary}--\r\n".encode()


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb's shape."""
    data = bytearray(small_png((1, 1)))
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def chat_json(client, body: dict | bytes, **headers):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/chat", content=content, headers={"content-type": "application/json", **headers})


def error_of(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and "\n" not in err["message"], err
    return err["message"]


# -- Host -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "localhost.evil.example", "[::2]:{port}", "127.0.0.1:{port}@evil.example",
                                  "127.0.0.1:99999", "", None])
def test_a_foreign_host_is_refused_before_the_body_is_read(srv, host):
    host = host.format(port=srv.port) if host else host
    served = srv.served()
    ctype, body = multipart(CAT_PROMPT)
    # headers promise a body that never comes: an answer at all proves nothing waited for it
    result = raw(srv.port, "POST", "/v1/chat", host, {"Content-Type": ctype, "Content-Length": str(len(body))},
                 body, send_body=False, timeout=15)
    raw_error(result, 400, "bad_host")
    assert raw(srv.port, "POST", "/v1/chat", host, {"Content-Type": ctype}, body)[0] == 400
    for path in ("/", "/health", "/files/" + "0" * 32 + ".png"):                 # the page too: rebinding reads it
        raw_error(raw(srv.port, "GET", path, host), 400, "bad_host")
    assert not list(srv.uploads.iterdir()) and srv.served() == served


def test_two_host_headers_are_refused(srv):
    status, headers, content = raw(srv.port, "GET", "/health", f"127.0.0.1:{srv.port}", {"Host": "evil.example"})
    assert status == 400, content                     # by uvicorn's parser (h11), or else by the server's check
    if headers["content-type"] == "application/json":
        assert json.loads(content)["error"]["code"] == "bad_host"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LocalHost:{port}", "[::1]",
                                  "[::1]:{port}", EXTRA_HOST, "CHAT.example.test:8443"])
def test_loopback_names_and_allowed_hosts_are_served(srv, host):
    status, headers, content = raw(srv.port, "GET", "/health", host.format(port=srv.port))
    assert status == 200 and json.loads(content)["status"] == "ok"
    assert raw(srv.port, "GET", "/", host.format(port=srv.port))[0] == 200


def test_an_allowed_extra_host_can_chat_and_fetch_its_photo(srv):
    host = f"{EXTRA_HOST}:{srv.port}"
    body = json.dumps({"messages": [{"role": "user", "content": CAT_PROMPT}]}).encode()
    status, _, content = raw(srv.port, "POST", "/v1/chat", host,
                             {"Content-Type": "application/json", "Origin": f"http://{host}"}, body)
    assert status == 200, content
    data = json.loads(content)
    assert data["shared"] and data["photos"][0]["url"].startswith("/files/")
    status, headers, png = raw(srv.port, "GET", data["photos"][0]["url"], host)
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png)).size == (451, 300)


# -- Origin ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "https://evil.example:{port}"},
                                     {"Origin": "null"}, {"Origin": "http://localhost:1"},
                                     {"Origin": "http://127.0.0.1:{port}.evil.example"},
                                     {"Origin": "http://127.0.0.1:{port}/"}, {"Origin": "file://"},
                                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}])
def test_a_post_from_another_web_page_is_refused(srv, headers):
    headers = {k: v.format(port=srv.port) for k, v in headers.items()}
    served = srv.served()
    ctype, body = multipart(CAT_PROMPT)                           # what a malicious page's form would send
    host = f"127.0.0.1:{srv.port}"
    result = raw(srv.port, "POST", "/v1/chat", host, {**headers, "Content-Type": ctype,
                                                      "Content-Length": str(len(body))}, body, send_body=False,
                 timeout=15)
    raw_error(result, 403, "foreign_origin")
    raw_error(raw(srv.port, "POST", "/v1/chat", host, {**headers, "Content-Type": ctype}, body), 403, "foreign_origin")
    assert not list(srv.uploads.iterdir()) and srv.served() == served
    status, _, _ = raw(srv.port, "GET", "/health", host, headers)              # reading is not changing
    assert status == 200


def test_same_origin_and_no_origin_posts_with_an_image_are_answered_and_leave_no_upload(srv):
    host = f"127.0.0.1:{srv.port}"
    ctype, body = multipart(HELLO_PROMPT)
    srv.during.clear()
    for headers in ({"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}, {"Origin": "http://localhost:"
                    f"{srv.port}"}, {}):
        status, _, content = raw(srv.port, "POST", "/v1/chat", host, {**headers, "Content-Type": ctype}, body)
        assert status == 200, content
        assert json.loads(content)["text"]
        assert not list(srv.uploads.iterdir())                                    # deleted when the request ended
    assert [len(names) for names in srv.during] == [1, 1, 1]                     # ... but there while it ran


def test_uploads_are_deleted_when_the_request_fails_too(srv):
    png = base64.b64encode(small_png()).decode()
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        r = chat_json(client, {"messages": [{"role": "user", "content": "look", "images": [png]},
                                            {"role": "assistant", "content": "x", "photos": [{"url": "/files/x.png"}]},
                                            {"role": "user", "content": "hi"}]})
        assert "not a photo this server shared" in error_of(r, 422, "invalid_request")
        r = chat_json(client, {"messages": [{"role": "user", "content": "hi", "images": [png]}],
                               "options": {"max_new_tokens": 500}})
        error_of(r, 422, "invalid_request")
        r = chat_json(client, {"messages": [{"role": "user", "content": "hi " * 1300, "images": [png]}],
                               "options": {"max_new_tokens": 4}})
        assert "max_length" in error_of(r, 422, "invalid_request")               # the model's own check
    assert not list(srv.uploads.iterdir())


# -- API key --------------------------------------------------------------------------------------
def test_the_api_key_is_required_except_for_the_page_and_health(keyed):
    with httpx.Client(base_url=keyed.url, timeout=120) as client:
        body = {"messages": [{"role": "user", "content": HELLO_PROMPT}], "options": {"max_new_tokens": 4}}
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]},
                        {"X-API-Key": KEY + "x"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY},
                        {"Authorization": "Bearer"}, {"X-API-Key": ""}):
            r = chat_json(client, body, **headers)
            assert "API key" in error_of(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
        served = keyed.served()
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY}"}, {"X-API-Key": KEY}):
            r = chat_json(client, body, **headers)
            assert r.status_code == 200 and r.json()["text"], r.text
        assert keyed.served() == served + 3
        page = client.get("/", params={"key": KEY})
        assert client.get("/").status_code == 200 and page.status_code == 200
        assert 'params.get("key")' in page.text and '"X-API-Key"' in page.text       # the page sends ?key= on
        assert page.headers["referrer-policy"] == "no-referrer"
        assert client.get("/health").json()["status"] == "ok"
        error_of(client.post("/health"), 401, "unauthorized")                       # only GET is open
        name = "/files/" + "0" * 32 + ".png"
        error_of(client.get(name), 401, "unauthorized")                             # photos need the key
        error_of(client.get(name, headers={"X-API-Key": KEY}), 404, "not_found")
    assert not list(keyed.uploads.iterdir())


def test_the_key_is_checked_before_the_body_is_read(keyed):
    ctype, body = multipart(HELLO_PROMPT)
    result = raw(keyed.port, "POST", "/v1/chat", f"localhost:{keyed.port}",
                 {"Content-Type": ctype, "Content-Length": str(len(body))}, body, send_body=False, timeout=15)
    raw_error(result, 401, "unauthorized")


@pytest.mark.parametrize("kwargs", [{"api_key": ""}, {"api_key": "has space"}, {"api_key": "kéy"},
                                    {"allowed_hosts": ["evil host"]}, {"allowed_hosts": ["*"]},
                                    {"allowed_hosts": ["a/b"]}])
def test_bad_keys_and_host_names_are_refused_up_front(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        create_app(sharing_model(), tmp_path, **kwargs)


def test_serve_command_options(tmp_path):
    help_text = run_cli("serve", "--help", timeout=120).stdout
    assert "--allowed-host" in help_text and "--api-key" in help_text and "MMDIALOG_API_KEY" in help_text
    proc = run_cli("serve", "tiny", "--allowed-host", "not a host", timeout=120)  # refused before the load
    assert proc.returncode != 0 and "not a host name" in proc.stderr and "Traceback" not in proc.stderr


# -- malformed bodies: 4xx, never 500 -------------------------------------------------------------
@pytest.mark.parametrize("body, status, code", [
    (b"[" * 100_000, 400, "bad_json"),                                             # RecursionError in json.loads
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "bad_json"),
    (b'{"messages": "\xff"}', 400, "bad_encoding"),                                # not UTF-8
    (b'{"messages":[{"role":"user","content":"\\ud800"}]}', 400, "bad_text"),      # a lone surrogate
    (b'{"messages":[{"role":"user","content":"hi \\udfff there"}]}', 400, "bad_text"),
    (b'{"messages":[{"role":"user","content":"hi"}],"options":{"\\ud800":1}}', 400, "bad_text"),
    (b'{"messages":[{"role":"assistant","content":"x","photos":[{"url":"/files/\\ud800"}]},'
     b'{"role":"user","content":"hi"}]}', 400, "bad_text"),
    (b'{"messages":[{"role":"user","content":"hi"}],"options":{"temperature":NaN}}', 400, "bad_json"),
    (b'{"messages":[{"role":"user","content":"hi"}],"options":{"seed":' + b"9" * 5000 + b"}}", 400, "bad_json"),
    (b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', 400, "bad_text"),  # UTF-8 of a surrogate
    (b'{"messages":[{"role":"user","content":"\\ud83d\\ude00"}],"options":{"max_new_tokens":500}}', 422,
     "invalid_request"),                                                           # a real pair passes to the next check
])
def test_malformed_json_bodies_are_4xx(srv, body, status, code):
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        error_of(chat_json(client, body), status, code)


@pytest.mark.parametrize("messages, charset, status", [
    (b'[{"role":"user","content":"\\ud800"}]', "", 400),
    (b"[" * 100_000, "", 400),
    (b'[{"role":"user","content":"\xff"}]', "", 422),                    # read as latin-1, then options: 500 > 32
    (b'[{"role":"user","content":"\\ud800"}]', "; charset=raw_unicode_escape", 400),  # the surrogate is in the str
    (b'[{"role":"user","content":"\xed\xa0\x80"}]', "; charset=utf-8", 422),
])
def test_malformed_multipart_fields_are_4xx(srv, messages, charset, status):
    boundary = "b0undary"
    field = lambda name, value: (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                                 + value + b"\r\n")
    body = field("messages", messages) + field("options", b'{"max_new_tokens": 500}') + f"--{boundary}--\r\n".encode()
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        r = client.post("/v1/chat", content=body,
                        headers={"content-type": f"multipart/form-data; boundary={boundary}{charset}"})
    assert r.status_code == status and r.json()["error"]["code"], r.text


@pytest.mark.parametrize("width, height", [(20_000, 20_000), (10_000, 10_000), (7_000, 7_000)])
def test_a_decompression_bomb_is_413(srv, width, height):
    bomb = png_declaring(width, height)
    assert len(bomb) < 100
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        r = chat_json(client, {"messages": [{"role": "user", "content": "look",
                                             "images": [base64.b64encode(bomb).decode()]}]})
        assert "pixels" in error_of(r, 413, "too_large")
        r = client.post("/v1/chat", data={"messages": json.dumps([{"role": "user", "content": "look"}])},
                        files=[("images", ("bomb.png", bomb, "image/png"))])
        error_of(r, 413, "too_large")
    assert not list(srv.uploads.iterdir())


# -- /files/ --------------------------------------------------------------------------------------
def test_only_photos_this_server_wrote_are_served_never_through_a_symlink(srv, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(small_png())
    planted = srv.photos / f"{uuid.uuid4().hex}.png"
    planted.symlink_to(secret)                                     # a link in the photos folder leading out
    copied = srv.photos / f"{uuid.uuid4().hex}.png"
    copied.write_bytes(small_png())                                # a plain file this process never wrote
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for p in (planted, copied):
            error_of(client.get(f"/files/{p.name}"), 404, "not_found")
        r = chat_json(client, {"messages": [{"role": "user", "content": CAT_PROMPT}]})
        assert r.status_code == 200 and r.json()["shared"], r.text
        photo = r.json()["photos"][0]
        assert client.get(photo["url"]).status_code == 200
        own = srv.photos / photo["url"].rsplit("/", 1)[-1]
        own.unlink()
        own.symlink_to(secret)                                     # one it did write, swapped for a link
        assert os.path.realpath(own) == str(secret.resolve())
        error_of(client.get(photo["url"]), 404, "not_found")
        r = chat_json(client, {"messages": [{"role": "user", "content": CAT_PROMPT},
                                            {"role": "assistant", "content": "here", "photos": [photo]},
                                            {"role": "user", "content": HELLO_PROMPT}]})
        assert "not a photo this server shared" in error_of(r, 422, "invalid_request")


# -- a server that holds (slow and hostile clients) ----------------------------------------------------
TIGHT = Limits(max_body_bytes=2**20, max_image_bytes=2**19, max_images=2, max_messages=6, max_new_tokens=32,
               max_batch=1, max_queue=1, header_timeout_s=1.0, body_timeout_s=1.5, max_connections=12, keep_photos=1)


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    out = tmp_path_factory.mktemp("tight") / "out"
    app = create_app(sharing_model(), out, TIGHT, seed=0, max_new_tokens=20)
    thread = ServerThread(app)
    yield thread, out
    thread.stop()


def port_of(thread) -> int:
    return thread.sock.getsockname()[1]


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``s`` (EOF or reset) within ``seconds``; what it sent is dropped."""
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_head_health_is_200_and_cors_is_refused_explicitly(srv):
    host = f"127.0.0.1:{srv.port}"
    status, headers, content = raw(srv.port, "HEAD", "/health", host)
    assert status == 200 and content == b""
    result = raw(srv.port, "OPTIONS", "/v1/chat/completions", host, {
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "cross-origin" in raw_error(result, 403, "cors_refused")
    for r in (result, raw(srv.port, "GET", "/health", host, {"Origin": "http://evil.example"})):
        assert not [k for k in r[1] if k.startswith("access-control-")]


def test_a_connection_that_never_finishes_its_headers_is_closed(tight):
    thread, _ = tight
    with socket.create_connection(("127.0.0.1", port_of(thread))) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and then nothing
        assert closed_within(s, TIGHT.header_timeout_s + 3)
    with socket.create_connection(("127.0.0.1", port_of(thread))) as s:  # nothing at all, likewise
        assert closed_within(s, TIGHT.header_timeout_s + 3)


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closes(tight):
    thread, _ = tight
    with socket.create_connection(("127.0.0.1", port_of(thread))) as s:
        s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"messages\"")
        s.settimeout(TIGHT.body_timeout_s + 5)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 408") and b"connection: close" in head, answer


def test_a_refused_chunked_body_is_not_read_any_further(tight):
    thread, _ = tight
    with socket.create_connection(("127.0.0.1", port_of(thread))) as s:
        s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        s.settimeout(10)
        sent, answer = 0, b""
        try:
            while sent < 64 * 2**20 and b"\r\n\r\n" not in answer:  # keep sending, as the attacker does
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                s.setblocking(False)
                try:
                    answer += s.recv(65536)
                except BlockingIOError:
                    pass
                s.setblocking(True)
                s.settimeout(10)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection: what it answered is still to be read
        s.setblocking(True)
        s.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer and (chunk := s.recv(65536)):
                answer += chunk
        except OSError:
            pass
        head = answer.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 413") and b"connection: close" in head, answer[:300]
        assert sent < 16 * 2**20  # the server stopped taking it soon after the limit (1 MiB)
        assert closed_within(s, 10)


def test_past_the_connection_cap_the_longest_idle_connections_go_and_health_answers(tight):
    thread, _ = tight
    idle = [socket.create_connection(("127.0.0.1", port_of(thread))) for _ in range(3 * TIGHT.max_connections)]
    try:
        with httpx.Client(base_url=thread.url, timeout=30) as client:
            assert client.get("/health").status_code == 200
        closed = sum(closed_within(s, 0.2) for s in idle[:TIGHT.max_connections])
        assert closed == TIGHT.max_connections  # the oldest were closed to make room
    finally:
        for s in idle:
            s.close()


def test_every_photo_reference_counts_against_max_images(srv):
    refs = [{"url": f"/files/{uuid.uuid4().hex}.png"} for _ in range(3)]
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        r = chat_json(client, {"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "x", "photos": refs},
                                            {"role": "user", "content": "more"}]})
        assert "limit is 2" in error_of(r, 422, "too_many_images")
        many = [{"type": "image_url", "image_url": {"url": f"/files/{uuid.uuid4().hex}.png"}}] * 30_000
        r = client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "images": many},
            {"role": "user", "content": "more"}]})
        assert "30000 images" in error_of(r, 422, "too_many_images")


def test_uploads_are_removed_after_503s_and_cut_streams(tight):
    thread, out = tight
    png = "data:image/png;base64," + base64.b64encode(small_png()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": HELLO_PROMPT},
                                                      {"type": "image_url", "image_url": {"url": png}}]}],
            "max_tokens": 8}
    with httpx.Client(base_url=thread.url, timeout=300) as client:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = sorted(r.status_code for r in pool.map(
                lambda _: client.post("/v1/chat/completions", json=body), range(8)))
        assert 503 in codes and 200 in codes, codes
        for _ in range(3):  # streams the client walks away from after the first event
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                next(r.iter_lines())
        served = thread.server.config.app.state.counters
        deadline = time.monotonic() + 120
        while (served["queued"] or served["active"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    time.sleep(0.5)
    assert not list((out / "uploads").iterdir())


def test_shared_photos_are_kept_within_their_bound(tight):
    thread, out = tight
    with httpx.Client(base_url=thread.url, timeout=300) as client:
        urls = []
        for _ in range(2):
            r = client.post("/v1/chat", json={"messages": [{"role": "user", "content": CAT_PROMPT}]})
            assert r.status_code == 200, r.text
            urls.append(r.json()["photos"][0]["url"])
        assert client.get(urls[0]).status_code == 404 and client.get(urls[1]).status_code == 200
        assert len(list((out / "photos").glob("*.png"))) == TIGHT.keep_photos
        r = client.post("/v1/chat", json={"messages": [{"role": "user", "content": CAT_PROMPT},
                                                       {"role": "assistant", "content": "here", "photos": [
                                                           {"url": urls[0]}]},
                                                       {"role": "user", "content": HELLO_PROMPT}]})
        assert "not a photo this server shared" in error_of(r, 422, "invalid_request")
