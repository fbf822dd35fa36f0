"""Download the photos of a dataset (standard library only: urllib + threads).

``fetch_images(dialogues, out_dir)`` downloads every distinct photo URL to
``out_dir/<url_filename(url)>`` (SHA-1 name, see
``mmdialog.core.data.images``), which is where ``load_dialogues(...,
image_dir=out_dir)`` looks. It is

* **parallel**: ``workers`` threads;
* **resumable**: a file that already exists is skipped, and every download is
  written to a hidden temporary file (``core/files.py``) and renamed into place only when complete
  and valid, so an interrupted run never leaves a half file under the final name;
* **retrying**: network errors, time-outs, truncated bodies, bodies that are not
  a decodable image, and HTTP 408/425/429/5xx are retried up to ``retries``
  times with exponential backoff (``backoff · 2^attempt`` seconds, capped at
  ``max_backoff``, ±10 % jitter; a ``Retry-After`` header is honoured within the
  cap); other HTTP errors (404, 403, …) fail at once;
* **polite**: ``rate_limit`` caps requests per second over all threads.

Only ``http``/``https`` URLs are fetched.
"""
from __future__ import annotations

import http.client
import io
import os
import random
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from mmdialog.core.data.images import url_filename
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.files import atomic_write

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "mmdialog-fetch/1.0 (+https://github.com/; research dataset download)"


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class _Permanent(Exception):
    pass


@dataclass
class FetchFailure:
    url: str
    error: str
    attempts: int

    def __str__(self) -> str:
        return f"{self.url}: {self.error} (after {self.attempts} attempt{'s' if self.attempts != 1 else ''})"


@dataclass
class FetchReport:
    total: int = 0  # distinct URLs
    downloaded: int = 0
    skipped: int = 0  # already present
    failed: int = 0
    no_url: int = 0  # photos without a URL (not fetchable)
    bytes: int = 0
    failures: list[FetchFailure] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # url → HTTP attempts made

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def summary(self) -> str:
        return (f"urls: {self.total}, downloaded: {self.downloaded}, skipped (present): {self.skipped}, "
                f"failed: {self.failed}, photos without url: {self.no_url}, bytes: {self.bytes:,}")


class _RateLimiter:
    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second and per_second > 0 else 0.0
        self.lock = threading.Lock()
        self.next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _validate_image(data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (64, 64))
                im.load()
    except Image.DecompressionBombError:
        return  # a valid (huge) image; load_image decides what to do with it
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not a usable image"
        raise _Retryable(f"not a valid image ({type(e).__name__}: {e})") from None


def _download(url: str, timeout: float, max_bytes: int, user_agent: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length")
            chunks, size = [], 0
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise _Permanent(f"larger than max_bytes={max_bytes:,}")
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        code = e.code
        e.close()
        if code in RETRY_STATUS or code >= 500:
            raise _Retryable(f"HTTP {code} {e.reason}", _retry_after(e.headers)) from None
        raise _Permanent(f"HTTP {code} {e.reason}") from None
    except http.client.IncompleteRead as e:
        raise _Retryable(f"truncated body ({len(e.partial)} bytes received)") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
            ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Retryable(f"{type(e).__name__}: {reason}") from None
    data = b"".join(chunks)
    if expected is not None and expected.isdigit() and int(expected) != len(data):
        raise _Retryable(f"truncated body ({len(data)} of {expected} bytes)")
    if not data:
        raise _Retryable("empty body")
    return data


def _fetch_one(url: str, dest: Path, *, retries: int, backoff: float, max_backoff: float,
               timeout: float, max_bytes: int, user_agent: str, verify: bool,
               limiter: _RateLimiter) -> tuple[str, int, int, str | None]:
    """→ (status "downloaded"|"failed", attempts, bytes, error)."""
    attempts = 0
    last = "unknown error"
    for attempt in range(retries + 1):
        attempts += 1
        limiter.wait()
        try:
            data = _download(url, timeout, max_bytes, user_agent)
            if verify:
                _validate_image(data)
            with atomic_write(dest) as tmp:
                tmp.write_bytes(data)
            return "downloaded", attempts, len(data), None
        except _Permanent as e:
            return "failed", attempts, 0, str(e)
        except _Retryable as e:
            last = str(e)
            if attempt == retries:
                break
            delay = min(max_backoff, backoff * (2 ** attempt)) * random.uniform(0.9, 1.1)
            if e.retry_after is not None:
                delay = min(max_backoff, max(delay, e.retry_after))
            time.sleep(delay)
        except OSError as e:  # writing the file
            return "failed", attempts, 0, f"cannot write {dest}: {e}"
    return "failed", attempts, 0, last


def fetch_urls(
    urls: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    workers: int = 8,
    retries: int = 3,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    timeout: float = 30.0,
    rate_limit: float | None = None,
    max_bytes: int = 64 * 2**20,
    verify: bool = True,
    user_agent: str = USER_AGENT,
    progress: Callable[[int, int], None] | None = None,
) -> FetchReport:
    """Download ``urls`` (deduplicated) to ``out_dir/<url_filename(url)>``. See the module docs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = FetchReport()
    todo: list[str] = []
    seen: set[str] = set()
    for url in urls:
        if not url or url in seen:
            continue
        seen.add(url)
        report.total += 1
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            report.failed += 1
            report.failures.append(FetchFailure(url, "unsupported URL scheme (only http/https)", 0))
            continue
        if (out / url_filename(url)).is_file():
            report.skipped += 1
            continue
        todo.append(url)
    done = report.skipped + report.failed
    if progress:
        progress(done, report.total)
    limiter = _RateLimiter(rate_limit)
    kwargs = dict(retries=max(0, retries), backoff=backoff, max_backoff=max_backoff, timeout=timeout,
                  max_bytes=max_bytes, user_agent=user_agent, verify=verify, limiter=limiter)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mmdialog-fetch") as pool:
        futures = {pool.submit(_fetch_one, url, out / url_filename(url), **kwargs): url for url in todo}
        try:
            for fut in as_completed(futures):
                url = futures[fut]
                status, attempts, nbytes, error = fut.result()
                report.attempts[url] = attempts
                if status == "downloaded":
                    report.downloaded += 1
                    report.bytes += nbytes
                else:
                    report.failed += 1
                    report.failures.append(FetchFailure(url, error or "failed", attempts))
                done += 1
                if progress:
                    progress(done, report.total)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return report


def fetch_images(dialogues: Iterable[Dialogue], out_dir: str | os.PathLike, *, update_paths: bool = True,
                 **kwargs: Any) -> FetchReport:
    """Download the photos of ``dialogues`` (a list or a ``LoadResult``) into ``out_dir``.

    With ``update_paths`` (default) each photo whose file is now present gets
    ``Photo.path`` set. Keyword arguments go to ``fetch_urls`` (``workers``,
    ``retries``, ``backoff``, ``timeout``, ``rate_limit``, ``max_bytes``, …).
    """
    photos = [p for d in dialogues for p in d.photos]
    no_url = sum(1 for p in photos if not p.url)
    report = fetch_urls((p.url for p in photos if p.url), out_dir, **kwargs)
    report.no_url = no_url
    if update_paths:
        out = Path(out_dir)
        for p in photos:
            if p.url:
                f = out / url_filename(p.url)
                if f.is_file():
                    p.path = f
    return report
