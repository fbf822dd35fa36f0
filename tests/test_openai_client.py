"""`mmdialog serve` driven by the official `openai` Python client, unchanged:
the standard request fields, usage (also streamed), stop, the photos, a 400
naming the field for values the server cannot honour, one access-log line per
request."""
import logging

import httpx
import openai
import pytest
from sharing_model import CAT_PROMPT, HELLO_PROMPT, ServerThread, sharing_model

from mmdialog import Turn
from mmdialog.sdk.server import Limits, create_app

# What common clients and UIs send along with every request: all accepted.
STANDARD = dict(seed=0, top_p=1, n=1, max_completion_tokens=12, user="u-1", store=False, metadata={"app": "test"},
                logprobs=False, response_format={"type": "text"}, frequency_penalty=0, presence_penalty=0,
                tools=[], tool_choice="none")


@pytest.fixture(scope="module")
def client():
    app = create_app(sharing_model(), limits=Limits(max_batch=4), seed=0, max_new_tokens=12, name="cat-model")
    srv = ServerThread(app)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300), srv.url
    srv.stop()


def tokens(text: str) -> int:
    return len(sharing_model().llm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_models_and_a_completion_with_the_standard_fields_and_usage(client):
    c, url = client
    assert [m.id for m in c.models.list()] == ["cat-model"]
    r = c.chat.completions.create(model="cat-model", messages=[{"role": "system", "content": "be nice"},
                                                               {"role": "user", "content": CAT_PROMPT}], **STANDARD)
    choice = r.choices[0]
    assert choice.message.content == "here she is" and choice.finish_reason == "stop"
    images = choice.message.model_extra["images"]
    assert [i["description"] for i in images] == ["my tabby cat"] and images[0]["source"] == "retrieved"
    u = r.usage
    assert u is not None and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    raw = httpx.post(url + "/v1/chat", json={"messages": [{"role": "user", "content": CAT_PROMPT}],
                                             "options": {"max_new_tokens": 12, "seed": 0}}, timeout=300).json()
    assert "[img]" in raw["raw_text"] and u.completion_tokens == tokens(raw["raw_text"])
    assert u.prompt_tokens == tokens(sharing_model().collator.prompt_text([Turn("user", CAT_PROMPT)], "assistant"))


def test_a_stream_ends_with_the_usage_chunk_when_asked(client):
    c, _ = client
    whole = c.chat.completions.create(model="m", messages=[{"role": "user", "content": CAT_PROMPT}], **STANDARD)
    chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": CAT_PROMPT}],
                                            stream=True, stream_options={"include_usage": True}, **STANDARD))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content == "here she is"
    images = [i for ch in chunks if ch.choices for i in (ch.choices[0].delta.model_extra or {}).get("images", [])]
    assert [i["description"] for i in images] == ["my tabby cat"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])
    plain = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": HELLO_PROMPT}],
                                           stream=True, max_tokens=6))
    assert all(ch.usage is None for ch in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_cuts_the_reply_and_the_photos_after_it(client):
    c, _ = client
    for stream in (False, True):
        kwargs = dict(model="m", messages=[{"role": "user", "content": CAT_PROMPT}], stop=[" she", "never"], seed=0)
        if stream:
            chunks = list(c.chat.completions.create(stream=True, **kwargs))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            images = [i for ch in chunks for i in (ch.choices[0].delta.model_extra or {}).get("images", [])]
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = c.chat.completions.create(**kwargs)
            text, images, finish = r.choices[0].message.content, r.choices[0].message.model_extra["images"], \
                r.choices[0].finish_reason
        assert (text, images, finish) == ("here", [], "stop"), stream
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": CAT_PROMPT}], stop="zebra")
    assert r.choices[0].message.content == "here she is" and r.choices[0].message.model_extra["images"]


@pytest.mark.parametrize("field,value", [("n", 2), ("top_p", 0.5), ("frequency_penalty", 0.5),
                                         ("presence_penalty", -1), ("logprobs", True), ("top_logprobs", 3),
                                         ("response_format", {"type": "json_object"}), ("tool_choice", "auto"),
                                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("logit_bias", {"42": 10}), ("stop", ["a", "b", "c", "d", "e"])])
def test_values_the_server_cannot_honour_are_a_400_naming_the_field(client, field, value):
    c, _ = client
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": HELLO_PROMPT}], **{field: value})
    assert e.value.status_code == 400 and e.value.param == field and field in e.value.message


def test_an_unknown_field_is_a_400_naming_it(client):
    c, _ = client
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": HELLO_PROMPT}],
                                  extra_body={"frobnicate": 1})
    assert e.value.param == "frobnicate" and "frobnicate" in e.value.message


def test_each_request_writes_one_access_log_line(client, caplog):
    c, _ = client
    caplog.set_level(logging.INFO, logger="mmdialog.server.access")
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": HELLO_PROMPT}], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": HELLO_PROMPT}], n=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmdialog.server.access"]
    assert len(lines) == 2, lines
    assert '"POST /v1/chat/completions" 200' in lines[0] and '"POST /v1/chat/completions" 400' in lines[1]
    assert lines[0].startswith("127.0.0.1 ") and lines[0].endswith("ms")
