"""What a request to ``mmdialog serve`` holds, and how it becomes turns.

Two request shapes, one path to the model:

* ``ChatRequest`` (``POST /v1/chat``): ``messages`` with ``content``,
  ``images`` (base64 or data: URLs) and ``photos`` (this server's earlier
  photos sent back), plus ``options`` (``GenerationOptions`` fields);
* ``CompletionRequest`` (``POST /v1/chat/completions``): the OpenAI chat
  format (``content`` as a string or text / ``image_url`` parts, the
  sampling fields), converted to a ``ChatRequest`` by ``from_openai``.

Both are read by ``read_body`` and turned into ``Turn``s by ``to_turns``;
every failure is a 4xx ``ApiError`` with a one-line message.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from mmdialog.core.data.schema import Photo, Turn
from mmdialog.core.errors import MMDialogError, validation_message
from mmdialog.core.reply import GenerationOptions
from mmdialog.sdk.server.limits import ApiError, Limits, decode_image

SURROGATE = re.compile(r"[\ud800-\udfff]")
M = TypeVar("M", bound=BaseModel)
#: ``/files/NAME`` → (path, description) of a photo this server shared, or None.
OwnPhoto = Callable[[str], "tuple[Path, str] | None"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- POST /v1/chat ---------------------------------------------------------------------------------
class SharedPhotoRef(BaseModel):
    """A photo from an earlier reply, sent back as it came (extra keys ignored)."""

    url: str = Field(description="its URL as the server gave it (/files/NAME)")
    description: str = ""


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str = ""
    images: list[str] = Field(default_factory=list, description="base64 or data: URLs (user messages)")
    photos: list[SharedPhotoRef] = Field(default_factory=list, description="photos this server shared "
                                                                           "(assistant messages)")


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, description="GenerationOptions fields for this "
                                                                      "reply: max_new_tokens, temperature, …")


# -- POST /v1/chat/completions (OpenAI format) --------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str = Field(description="data:image/…;base64,… (user images) or this server's /files/NAME URL")
    detail: str | None = None


class ImagePart(BaseModel):
    """An image: in a user message a data: URL; in an assistant message a photo this
    server shared, as its reply gave it (extra keys, e.g. ``description``, ignored)."""

    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class CompletionMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="system/developer messages are accepted and not used: the model was trained without one")
    content: str | list[Part] | None = None
    images: list[ImagePart] = Field(default_factory=list, description="an assistant reply's photos, sent back")
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="a last chunk with ``usage`` (and no choices) before [DONE]")


class ResponseFormat(BaseModel):
    type: str = Field("text", description="only text")


class CompletionRequest(_Strict):
    """The OpenAI chat request. Fields this server cannot honour are accepted
    at their neutral value (``n`` 1, ``top_p`` 1, penalties 0, ``logprobs``
    false, ``response_format`` text, no ``tools``), any other value is a 400
    naming the field; ``user``, ``store``, ``metadata`` and the like are
    accepted and not used."""

    model: str | None = Field(None, description="ignored: the server serves one model (GET /v1/models)")
    messages: list[CompletionMessage] = Field(min_length=1)
    stream: bool = Field(False, description="server-sent events: text as it is written, then the photos")
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, description="reply length limit (tokens)")
    max_tokens: int | None = Field(None, description="the older name of max_completion_tokens")
    temperature: float | None = Field(None, description="0 = greedy (the default)")
    top_p: float | None = Field(None, description="only 1 is supported")
    n: int | None = Field(None, description="only 1 is supported")
    seed: int | None = Field(None, description="fixes sampling and the noise of drawn photos")
    stop: str | list[str] | None = Field(None, description="up to 4 strings: the reply ends before the first "
                                                           "(and its photos after that point are dropped)")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    logprobs: bool | None = Field(None, description="only false is supported")
    top_logprobs: int | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="only empty is supported")
    response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(None, description="only none: the model calls no tools")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only "none"')
    parallel_tool_calls: bool | None = Field(None, description="accepted, not used (no tools)")
    modalities: list[str] | None = Field(None, description='"text" (photos come with the text anyway)')
    user: str | None = Field(None, description="accepted, not used")
    safety_identifier: str | None = Field(None, description="accepted, not used")
    prompt_cache_key: str | None = Field(None, description="accepted, not used")
    store: bool | None = Field(None, description="accepted, not used: the server keeps nothing")
    metadata: dict[str, str] | None = Field(None, description="accepted, not used")
    service_tier: str | None = Field(None, description="accepted, not used")
    num_beams: int | None = Field(None, description="mmdialog: beam search width")
    num_inference_steps: int | None = Field(None, description="mmdialog: diffusion steps of a drawn photo")
    guidance_scale: float | None = Field(None, description="mmdialog: classifier-free guidance of a drawn photo")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _unsupported(field: str, why: str) -> ApiError:
    return ApiError(400, "unsupported_value", f"{field}: {why}", param=field)


def check_supported(req: CompletionRequest) -> None:
    """400 naming the first field whose value this server cannot honour."""
    neutral = {"n": 1, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
               "top_logprobs": 0}
    for name, value in neutral.items():
        got = getattr(req, name)
        if got is not None and got != value:
            raise _unsupported(name, f"only {json.dumps(value)} is supported (got {json.dumps(got)})")
    if req.logit_bias:
        raise _unsupported("logit_bias", "not supported; send {} or leave it out")
    if req.response_format is not None and req.response_format.type != "text":
        raise _unsupported("response_format", f"only {{\"type\": \"text\"}} is supported (got "
                                              f"{req.response_format.type!r})")
    if req.tools:
        raise _unsupported("tools", "this model calls no tools; send [] or leave it out")
    if req.tool_choice not in (None, "none"):
        raise _unsupported("tool_choice", 'only "none" is supported (the model calls no tools)')
    if req.modalities is not None and not set(req.modalities) <= {"text", "image"}:
        raise _unsupported("modalities", 'only "text" (and "image": shared photos) are produced')
    stops = req.stops()
    if len(stops) > 4 or any(not s for s in stops):
        raise _unsupported("stop", "give up to 4 non-empty strings")


def from_openai(req: CompletionRequest) -> ChatRequest:
    """The OpenAI-format request as a ``ChatRequest`` (fields checked by ``check_supported``)."""
    check_supported(req)
    messages = []
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            continue
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else list(m.content or [])
        parts += m.images
        text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
        urls = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        if m.role == "user":
            if any(not u.startswith("data:") for u in urls):
                raise ApiError(422, "invalid_request", f"messages.{i}: user images must be data: URLs "
                                                       "(data:image/png;base64,…); this server fetches nothing")
            messages.append(Message(role="user", content=text, images=urls))
        else:
            messages.append(Message(role="assistant", content=text, photos=[SharedPhotoRef(url=u) for u in urls]))
    if not messages:
        raise ApiError(422, "invalid_request", "messages: give at least one user message")
    options = {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
               "seed": req.seed, "num_beams": req.num_beams, "num_inference_steps": req.num_inference_steps,
               "guidance_scale": req.guidance_scale}
    return ChatRequest(messages=messages, options={k: v for k, v in options.items() if v is not None})


# -- responses (documented in the OpenAPI schema; the routes build them as dicts) -------------------
class PhotoOut(BaseModel):
    """A photo the model shared."""

    url: str = Field(description="where this server serves it: /files/NAME (kept for a bounded time)")
    description: str = Field(description="what the model wrote between [img] and [/img]")
    source: Literal["retrieved", "drawn"] = Field(description="from the photo library, or drawn by the generator")
    plugin: str = Field(description="the generator plugin that produced it")
    file: str | None = Field(None, description="the library file's name (retrieved photos)")
    caption: str | None = Field(None, description="the library's caption of it (retrieved photos)")
    score: float | None = Field(None, description="the retriever's similarity score (retrieved photos)")


class ChatResponse(BaseModel):
    text: str = Field(description="the reply without its [img] markup")
    raw_text: str = Field(description="the reply as the model wrote it")
    shared: bool
    photos: list[PhotoOut]
    truncated: bool = Field(description="older turns were dropped to fit the model's context")
    length_capped: bool = Field(description="the reply hit max_new_tokens")
    dropped_turns: int
    notice: str | None = None


class ImageOut(BaseModel):
    """A shared photo as an image part: ``image_url.url`` and the photo's
    fields beside it (``description``, ``source``, …)."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl
    description: str
    source: Literal["retrieved", "drawn"]
    plugin: str
    file: str | None = None
    caption: str | None = None
    score: float | None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="LLM tokens of the prompt's text (photo slots not counted)")
    completion_tokens: int = Field(description="LLM tokens of the reply's text, [img] markup included")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    images: list[ImageOut] = Field(description="the photos the model shared, in order")


class Choice(BaseModel):
    index: int = 0
    finish_reason: Literal["stop", "length"]
    message: AssistantMessage


class Completion(BaseModel):
    """``stream: false``. With ``stream: true``, ``chat.completion.chunk`` events
    carry ``delta.content`` (the text), then ``delta.images`` (one ``ImageOut``
    each), then ``finish_reason``, then (``stream_options.include_usage``) a
    chunk with ``usage`` and no choices, then ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


# -- reading and checking ----------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` whose every failure is a 400: bad syntax, bytes that are
    not UTF-8, nesting too deep for the parser, NaN/Infinity, numbers too long."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, "bad_json", f"{what} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ApiError(400, "bad_encoding", f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "bad_json", f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:
        first = str(e).splitlines()[0][:200] if str(e) else "bad value"
        raise ApiError(400, "bad_json", f"{what} is not valid JSON: {first}") from None


def _check_text(data: Any, what: str) -> None:
    """400 for a string holding a lone UTF-16 surrogate (a ``\\ud800`` escape):
    it cannot be encoded, saved or sent back. Iterative: depth costs no stack."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                raise ApiError(400, "bad_text", f"{what} holds a lone surrogate (\\ud800-\\udfff): send valid "
                                                "Unicode text")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


#: Bodies bigger than this are parsed and checked in a worker thread, not on the event loop.
INLINE_PARSE_BYTES = 64 * 2**10


async def read_body(request, model: type[M], limits: Limits) -> tuple[M, list[bytes]]:
    """The request's JSON (or multipart form: fields ``messages`` and ``options``,
    files ``images``) as a checked ``model``, and its uploaded files; every
    failure a 4xx ``ApiError``. A big body is parsed off the event loop."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[bytes] = []
    try:
        if ctype == "multipart/form-data":
            form = await request.form(max_files=limits.max_images, max_fields=8,
                                      max_part_size=limits.max_image_bytes)
            try:
                raw_messages = form.get("messages")
                if not isinstance(raw_messages, str):
                    raise ApiError(422, "invalid_request", "multipart field 'messages' (a JSON list) is required")
                raw_options = form.get("options")
                raw = {"messages": raw_messages, "options": raw_options if isinstance(raw_options, str) else "{}"}
                for j, f in enumerate(form.getlist("images")):
                    if isinstance(f, str):
                        raise ApiError(422, "invalid_request", "multipart 'images' must be files")
                    blob = await f.read(limits.max_image_bytes + 1)
                    if len(blob) > limits.max_image_bytes:
                        raise ApiError(413, "too_large", f"images.{j} is over {limits.max_image_bytes:,} bytes")
                    uploads.append(blob)
            finally:
                await form.close()  # the parser's spooled temporary files
        elif ctype == "application/json":
            raw = await request.body()
        else:
            raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    except ApiError:
        raise
    except Exception as e:  # multipart parser limits and malformed forms
        if type(e).__name__ in ("MultiPartException", "HTTPException"):
            raise ApiError(413 if "size" in str(e).lower() or "too" in str(e).lower() else 400,
                           "bad_form", str(getattr(e, "detail", e) or e)) from None
        raise
    size = len(raw) if isinstance(raw, bytes) else sum(len(v) for v in raw.values())
    if size <= INLINE_PARSE_BYTES:
        return parse(raw, model, len(uploads), limits), uploads
    return await run_in_threadpool(parse, raw, model, len(uploads), limits), uploads


def parse(raw: bytes | dict[str, str], model: type[M], uploads: int, limits: Limits) -> M:
    """JSON text (or the multipart fields) → checked ``model``: syntax, text,
    then the counts (cheap, on the raw data), then the fields."""
    if isinstance(raw, bytes):
        data = loads(raw, "body")
    else:
        data = {"messages": loads(raw["messages"], "field 'messages'"),
                "options": loads(raw["options"], "field 'options'")}
    _check_text(data, "the request")
    _check_counts(data, uploads, limits)
    return validate(model, data)


def _check_counts(data: Any, uploads: int, limits: Limits) -> None:
    """Messages, images and photo references counted on the raw data, before
    any becomes a model object: a request costs what its size says."""
    msgs = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(msgs, list):
        return  # validation says what is wrong
    if len(msgs) > limits.max_messages:
        raise ApiError(422, "too_many_messages", f"{len(msgs)} messages; the limit is {limits.max_messages}",
                       param="messages")
    per_message = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            continue
        n = sum(len(m[k]) for k in ("images", "photos") if isinstance(m.get(k), list))
        content = m.get("content")
        if isinstance(content, list):
            if len(content) > limits.max_images + 32:
                raise ApiError(422, "invalid_request", f"messages.{i}.content has {len(content)} parts; the limit "
                                                       f"is {limits.max_images + 32}", param=f"messages.{i}.content")
            n += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
        per_message.append(n)
    count_images(per_message, uploads, limits)


def count_images(per_message: list[int], uploads: int, limits: Limits) -> None:
    """422 when the images and photo references of all messages (user and
    assistant alike) and the uploads are more than ``max_images``."""
    n = sum(per_message) + uploads
    if n > limits.max_images:
        raise ApiError(422, "too_many_images", f"{n} images and photo references; the limit is "
                                               f"{limits.max_images} per request", param="messages")


def validate(model: type[M], data: Any) -> M:
    """``model`` from ``data``; an unknown field of an OpenAI request is a 400
    naming it (as OpenAI answers), any other problem a 422."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        if model is CompletionRequest and first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
            name = str(first["loc"][0])
            raise ApiError(400, "unknown_parameter", f"{name}: unrecognized request field", param=name) from None
        raise ApiError(422, "invalid_request", validation_message(e)) from None


def to_turns(req: ChatRequest, uploads: list[bytes], limits: Limits, own_photo: OwnPhoto,
           uploads_dir: Path, written: list[Path]) -> tuple[list[Turn], tuple[str, list[Path]]]:
    """The request as (history, (last text, last images)); its images are
    checked, then written to ``uploads_dir`` and listed in ``written`` (the
    caller deletes them)."""
    msgs = req.messages
    if len(msgs) > limits.max_messages:
        raise ApiError(422, "too_many_messages", f"{len(msgs)} messages; the limit is {limits.max_messages}")
    if msgs[-1].role != "user":
        raise ApiError(422, "invalid_request", "the last message must be the user's")
    count_images([len(m.images) + len(m.photos) for m in msgs], len(uploads), limits)
    for i, m in enumerate(msgs):
        if len(m.content) > limits.max_message_chars:
            raise ApiError(422, "message_too_long", f"messages.{i}.content has {len(m.content)} characters; "
                                                    f"the limit is {limits.max_message_chars}")
        if m.role == "assistant" and m.images:
            raise ApiError(422, "invalid_request", f"messages.{i}: images belong to user messages "
                                                   "(an assistant's shared photos go in 'photos')")
    checked: list[list[tuple[bytes, str]]] = [
        [decode_image(b, limits, f"messages.{i}.images.{j}") for j, b in enumerate(m.images)]
        for i, m in enumerate(msgs)]
    checked[-1] += [decode_image(b, limits, f"images.{j}") for j, b in enumerate(uploads)]

    def save(blob: bytes, ext: str) -> Path:
        path = uploads_dir / f"{uuid.uuid4().hex}{ext}"
        written.append(path)
        path.write_bytes(blob)
        return path

    history: list[Turn] = []
    for i, (m, imgs) in enumerate(zip(msgs[:-1], checked[:-1])):
        photos = [Photo(description="a photo", path=save(b, e)) for b, e in imgs]
        for ref in m.photos:
            path = urlsplit(ref.url).path
            name = path.rsplit("/", 1)[-1]
            found = own_photo(name) if path == f"/files/{name}" else None
            if found is None:
                raise ApiError(422, "invalid_request", f"messages.{i}.photos: {ref.url[:200]!r} is not a photo this "
                                                       "server shared")
            photos.append(Photo(description=found[1], path=found[0]))  # the description the server recorded
        history.append(Turn(m.role, m.content.strip(), photos))
    last = (msgs[-1].content, [save(b, e) for b, e in checked[-1]])
    if not last[0].strip() and not last[1]:
        raise ApiError(422, "invalid_request", "the last message is empty: give some text or an image")
    return history, last


def to_options(options: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The request's generation options, checked against ``GenerationOptions``
    and this server's own caps."""
    try:
        GenerationOptions.parse(options, field="options")
    except MMDialogError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    for name, cap in (("max_new_tokens", limits.max_new_tokens), ("num_inference_steps", limits.max_inference_steps),
                      ("num_beams", limits.max_beams)):
        value = options.get(name)
        if value is not None and value > cap:
            raise ApiError(422, "invalid_request", f"options.{name}: {value} is over this server's limit of {cap}")
    return {k: v for k, v in options.items() if v is not None}


