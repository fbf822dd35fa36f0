"""`mmdialog serve`: the JSON API over real HTTP (uvicorn + httpx), limits and queueing."""
import base64
import concurrent.futures
import io
import json

import httpx
import pytest
from PIL import Image
from sharing_model import CAT_PROMPT, HELLO_PROMPT, shared_server


@pytest.fixture(scope="module")
def server():
    srv, app = shared_server()
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client, app


def png_b64(path, fmt="PNG", size=None) -> str:
    im = Image.open(path).convert("RGB")
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def error_of(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] and body["message"] and "\n" not in body["message"]
    return body["message"]


def test_health_page_and_a_reply_with_a_shared_photo(server):
    client, app = server
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text
    assert "http://" not in page.text and "https://" not in page.text      # no external assets
    r = client.post("/v1/chat", json={"messages": [{"role": "user", "content": CAT_PROMPT}]})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["text"] == "here she is" and data["shared"] and not data["truncated"]
    photo = data["photos"][0]
    assert photo["description"] == "my tabby cat" and photo["source"] == "retrieved"
    assert photo["file"].endswith("chelsea.png") and photo["plugin"] == "library" and photo["score"] > 0.4
    img = client.get(photo["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(img.content)).size == (451, 300)
    # the shared photo can be sent back as history; the model then sees it
    r = client.post("/v1/chat", json={"messages": [
        {"role": "user", "content": CAT_PROMPT},
        {"role": "assistant", "content": data["text"], "photos": [photo]},
        {"role": "user", "content": HELLO_PROMPT}], "options": {"max_new_tokens": 8}})
    assert r.status_code == 200 and r.json()["text"]


def test_images_as_base64_and_as_multipart_uploads(server, cat_photo):
    client, _ = server
    r = client.post("/v1/chat", json={"messages": [
        {"role": "user", "content": "look", "images": ["data:image/jpeg;base64," + png_b64(cat_photo, "JPEG")]}],
        "options": {"max_new_tokens": 6}})
    assert r.status_code == 200, r.text
    files = [("images", ("cat.webp", base64.b64decode(png_b64(cat_photo, "WEBP")), "image/webp"))]
    r = client.post("/v1/chat", data={"messages": json.dumps([{"role": "user", "content": "and this"}]),
                                      "options": json.dumps({"max_new_tokens": 6})}, files=files)
    assert r.status_code == 200, r.text


def test_requests_are_validated_with_4xx_json_errors(server, cat_photo):
    client, _ = server
    user = {"role": "user", "content": "hi"}
    post = lambda body: client.post("/v1/chat", json=body)
    assert "messages" in error_of(post({"messages": []}), 422)
    assert "limit is 6" in error_of(post({"messages": [user] * 7}), 422)
    assert "last message" in error_of(post({"messages": [user, {"role": "assistant", "content": "x"}]}), 422)
    assert "role" in error_of(post({"messages": [{"role": "system", "content": "x"}]}), 422)
    assert "extra" in error_of(post({"messages": [user], "stream": True}), 422).lower()
    assert "over this server's limit of 32" in error_of(post({"messages": [user], "options": {"max_new_tokens": 500}}), 422)
    assert "limit is 4000" in error_of(post({"messages": [{"role": "user", "content": "a" * 4001}]}), 422)
    assert "not a photo this server shared" in error_of(post({"messages": [
        {"role": "assistant", "content": "x", "photos": [{"url": "/files/../../etc/passwd"}]}, user]}), 422)
    with_image = lambda b64: post({"messages": [{**user, "images": [b64]}]})
    assert "not valid base64" in error_of(with_image("%%%not base64"), 400)
    assert "is GIF" in error_of(with_image(png_b64(cat_photo, "GIF")), 415)
    assert "not a PNG, JPEG or WebP" in error_of(with_image(base64.b64encode(b"hello world").decode()), 415)
    truncated = base64.b64decode(png_b64(cat_photo))[:2000]
    assert "damaged or truncated" in error_of(with_image(base64.b64encode(truncated).decode()), 400)
    big = png_b64(cat_photo, "PNG", size=(1200, 1200))                     # > 1 MiB of PNG
    assert "over 1,048,576 bytes" in error_of(with_image(big), 413)
    assert "limit is 2 per request" in error_of(post({"messages": [{**user, "images": [png_b64(cat_photo)] * 3}]}), 422)
    assert "over the limit" in error_of(client.post("/v1/chat", content=b"x" * (3 * 2**20 + 1),
                                                    headers={"content-type": "application/json"}), 413)
    assert "not valid JSON" in error_of(client.post("/v1/chat", content=b"{nope",
                                                    headers={"content-type": "application/json"}), 400)
    assert "application/json" in error_of(client.post("/v1/chat", content=b"hi",
                                                      headers={"content-type": "text/plain"}), 415)


@pytest.mark.parametrize("path", ["/files/..%2F..%2Fetc%2Fpasswd", "/files/%2e%2e/uploads",
                                  "/files/" + "0" * 32 + ".png", "/files/x.png", "/uploads/a.png", "/nope"])
def test_only_generated_photos_are_served(server, path):
    client, app = server
    r = client.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_concurrent_requests_are_queued_never_run_together(server):
    client, app = server
    body = {"messages": [{"role": "user", "content": HELLO_PROMPT}], "options": {"max_new_tokens": 12}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.post("/v1/chat", json=body), range(4)))
    codes = sorted(r.status_code for r in results)
    # one runs, one waits (max_queue=1), the rest are told to come back: nothing crashes
    assert set(codes) <= {200, 503} and codes.count(200) >= 2, codes
    served = [r.json()["text"] for r in results if r.status_code == 200]
    assert len(set(served)) == 1  # same prompt, greedy: the same reply each time it ran
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "busy"
    assert app.state.counters["max_active"] == 1 and app.state.counters["queued"] == 0
    assert client.get("/health").json()["busy"] is False
