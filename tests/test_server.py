"""`mmdialog serve`: the JSON API over real HTTP (uvicorn + httpx), limits and queueing."""
import base64
import concurrent.futures
import io
import json

import httpx
import pytest
from PIL import Image
from sharing_model import CAT_PROMPT, COFFEE_PROMPT, HELLO_PROMPT, shared_server


@pytest.fixture(scope="module")
def server():
    srv, app = shared_server()
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client, app


def test_a_history_cut_to_fit_says_so_in_the_reply(server):
    client, _ = server
    filler = "tell me more about your day, " * 30
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: {filler}"} for i in range(4)]
    r = client.post("/v1/chat", json={"messages": [*turns, {"role": "user", "content": HELLO_PROMPT}],
                                      "options": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["truncated"] and data["dropped_turns"] > 0 and "dropping the oldest turns" in data["notice"]
    r = client.post("/v1/chat", json={"messages": [{"role": "user", "content": HELLO_PROMPT}],
                                      "options": {"max_new_tokens": 4}})
    assert not r.json()["truncated"] and "notice" not in r.json()


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
    assert photo["file"] == "chelsea.png" and photo["plugin"] == "library" and photo["score"] > 0.4
    assert "path" not in photo  # no path on the server's machine goes out
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


def test_a_full_queue_answers_503_and_nothing_crashes(server):
    client, app = server
    body = {"messages": [{"role": "user", "content": HELLO_PROMPT}], "options": {"max_new_tokens": 12}}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: client.post("/v1/chat", json=body), range(6)))
    codes = sorted(r.status_code for r in results)
    # max_batch=2, max_queue=1: three may wait (a batch of two and one more), the rest are told to come back
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and 503 in codes, codes
    served = [r.json()["text"] for r in results if r.status_code == 200]
    assert len(set(served)) == 1  # same prompt, greedy: the same reply each time it ran
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "busy"
    assert app.state.counters["queued"] == 0 and client.get("/health").json()["busy"] is False


@pytest.fixture(scope="module")
def batching_server():
    from sharing_model import ServerThread, sharing_model

    from mmdialog.sdk.server import Limits, create_app

    app = create_app(sharing_model(), limits=Limits(max_batch=8, max_queue=16), seed=0, max_new_tokens=12,
                     name="cat-model")
    srv = ServerThread(app)
    with httpx.Client(base_url=srv.url, timeout=300) as client:
        yield client, app
    srv.stop()


def test_concurrent_requests_are_answered_together_in_batches(batching_server):
    client, app = batching_server
    prompts = [CAT_PROMPT, HELLO_PROMPT, COFFEE_PROMPT, HELLO_PROMPT] * 2
    alone = {p: client.post("/v1/chat", json={"messages": [{"role": "user", "content": p}]}).json() for p in set(prompts)}
    before = dict(app.state.counters)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: client.post("/v1/chat", json={"messages": [{"role": "user", "content": p}]}),
                                prompts))
    assert [r.status_code for r in results] == [200] * len(prompts)
    counters = app.state.counters
    assert counters["served"] - before["served"] == len(prompts)
    assert counters["batches"] - before["batches"] < len(prompts) and counters["max_active"] > 1  # batched
    for p, r in zip(prompts, results):  # a reply in a batch is the reply it gets alone
        assert r.json()["text"] == alone[p]["text"] and r.json()["shared"] == alone[p]["shared"]
    assert [r.json()["photos"][0]["description"] for p, r in zip(prompts, results) if p == CAT_PROMPT] == \
        ["my tabby cat", "my tabby cat"]


def sse(response) -> list[dict]:
    """The events of a server-sent-event stream; it must end with [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_openai_chat_completions_with_photos_as_image_parts(batching_server, cat_photo):
    client, app = batching_server
    assert client.get("/v1/models").json()["data"][0]["id"] == "cat-model"
    r = client.post("/v1/chat/completions", json={"model": "anything", "messages": [
        {"role": "system", "content": "You are a friendly cat owner."},
        {"role": "user", "content": [{"type": "text", "text": CAT_PROMPT}]}]})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "cat-model" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "here she is"
    image = choice["message"]["images"][0]
    assert image["type"] == "image_url" and image["description"] == "my tabby cat" and image["source"] == "retrieved"
    assert image["file"] == "chelsea.png" and "path" not in image
    url = image["image_url"]["url"]
    assert url.startswith(client.base_url.__str__().rstrip("/") + "/files/")
    assert Image.open(io.BytesIO(client.get(url).content)).size == (451, 300)
    # the reply goes back as history, as an OpenAI client keeps it; a user photo as a data: URL part
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": CAT_PROMPT}, {**choice["message"]},
        {"role": "user", "content": [{"type": "text", "text": "look at mine"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + png_b64(cat_photo)}}]}], "max_tokens": 6})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    post = lambda body: client.post("/v1/chat/completions", json=body)
    user = {"role": "user", "content": "hi"}
    assert "this server fetches nothing" in error_of(post({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}), 422)
    assert "n: only 1" in error_of(post({"messages": [user], "n": 2}), 400)
    assert "not a photo this server shared" in error_of(post({"messages": [
        {"role": "assistant", "content": "x", "images": [{"type": "image_url", "image_url": {"url": "/files/x.png"}}]},
        user]}), 422)
    assert "at least one user message" in error_of(post({"messages": [{"role": "system", "content": "x"}]}), 422)
    assert "max_new_tokens" in error_of(post({"messages": [user], "max_tokens": 0}), 422)


def test_streamed_completion_sends_the_text_then_the_photo(batching_server):
    client, _ = batching_server
    body = {"messages": [{"role": "user", "content": CAT_PROMPT}]}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    events = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    text = "".join(d.get("content", "") for d in deltas)
    assert text == whole["content"] == "here she is"
    images = [i for d in deltas for i in d.get("images", [])]
    assert [i["description"] for i in images] == ["my tabby cat"] and images[0]["source"] == "retrieved"
    first_image = next(n for n, d in enumerate(deltas) if d.get("images"))
    assert all(not d.get("content") for d in deltas[first_image:])  # the photo comes after the text
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # an invalid streamed request is a plain 4xx before any event
    assert "n: only 1" in error_of(client.post("/v1/chat/completions", json={**body, "stream": True, "n": 3}), 400)


def test_api_docs_and_schema_are_served_without_external_assets(batching_server):
    client, _ = batching_server
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/chat", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/CompletionRequest"
    schemas = spec["components"]["schemas"]
    assert {"messages", "stream", "max_tokens"} <= set(schemas["CompletionRequest"]["properties"])
    assert {"messages", "options"} <= set(schemas["ChatRequest"]["properties"]) and "Message" in schemas
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text
    page = client.get("/").text
    assert "<title>cat-model" in page and "{{" not in page and "attach a photo" in page
