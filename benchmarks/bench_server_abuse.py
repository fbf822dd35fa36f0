"""`mmdialog serve` under slow and hostile clients, on loopback: does it hold?

    python benchmarks/bench_server_abuse.py [--model tiny] [--slow 3000] [--attack-s 15]

Starts the real ``mmdialog serve`` in a subprocess on 127.0.0.1, then, each
bounded in count and time:

* **slow connections**: ``--slow`` sockets that send half a request line and
  then a byte now and then (slowloris), re-opened as the server closes them,
  for ``--attack-s`` seconds, while ``GET /health`` is timed every 0.25 s on a
  fresh connection;
* **oversized chunked bodies**: clients that keep sending a chunked body past
  the limit: how many bytes the server took before it answered 413 and closed;
* **cut streams and a full queue**: concurrent requests with an image, half of
  them streams the client walks away from after the first event, many
  refused with 503 after admission.

Prints JSON: health latency before and under attack (median, p95, max,
failures), connections the server closed, the biggest refused body it read,
uploads left behind once all requests ended (must be 0), and the server's
memory (RSS) growth.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def health_ms(port: int, timeout: float = 5.0) -> float | None:
    """One ``GET /health`` on a new connection, in ms; None when it failed."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return (time.perf_counter() - t0) * 1000 if data.startswith(b"HTTP/1.1 200") else None
    except OSError:
        return None


def summary(samples: list[float | None]) -> dict:
    ok = sorted(x for x in samples if x is not None)
    if not ok:
        return {"n": len(samples), "failed": len(samples)}
    return {"n": len(samples), "failed": len(samples) - len(ok), "median_ms": round(statistics.median(ok), 1),
            "p95_ms": round(ok[min(len(ok) - 1, int(0.95 * len(ok)))], 1), "max_ms": round(ok[-1], 1)}


def slow_attack(port: int, count: int, seconds: float) -> tuple[list[float | None], int]:
    """Hold ``count`` half-sent requests open for ``seconds`` (re-opening those the
    server closes) while timing health checks. Health samples, connections closed."""
    stop = time.monotonic() + seconds
    socks: list[socket.socket | None] = [None] * count
    closed = 0

    def open_one() -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
            s.setblocking(False)
            return s
        except OSError:
            return None

    samples: list[float | None] = []

    def prober() -> None:
        while time.monotonic() < stop:
            samples.append(health_ms(port))
            time.sleep(0.25)

    probe = threading.Thread(target=prober)
    probe.start()
    for i in range(count):
        socks[i] = open_one()
    while time.monotonic() < stop:
        for i, s in enumerate(socks):
            if s is None:
                socks[i] = open_one()
                continue
            try:
                gone = s.recv(4096) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if not gone:
                try:
                    s.send(b"a")  # one more byte of a header that never ends
                except BlockingIOError:
                    pass
                except OSError:
                    gone = True
            if gone:
                closed += 1
                s.close()
                socks[i] = open_one()
        time.sleep(1.0)
    probe.join()
    for s in socks:
        if s is not None:
            s.close()
    return samples, closed


def chunked_flood(port: int, seconds: float = 5.0) -> dict:
    """A chunked body sent as fast as the server takes it: bytes taken before the answer."""
    chunk = b"x" * 65536
    sent, answer = 0, b""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while time.monotonic() - t0 < seconds:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass
        try:
            s.settimeout(2)
            while data := s.recv(65536):
                answer += data
        except OSError:
            pass
    return {"sent_mb": round(sent / 2**20, 1), "status": answer[9:12].decode() or None,
            "connection_close": b"connection: close" in answer.split(b"\r\n\r\n")[0].lower()}


def cut_streams_and_full_queue(url: str, n: int) -> dict:
    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, format="PNG")
    png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look at this"},
                                                      {"type": "image_url", "image_url": {"url": png}}]}],
            "max_tokens": 8}
    codes: list[int] = []

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            if i % 2:
                with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        next(r.iter_lines())  # then walk away
            else:
                codes.append(client.post("/v1/chat/completions", json=body).status_code)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return {"requests": n, "answered": codes.count(200), "refused_503": codes.count(503)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--slow", type=int, default=3000, help="slow connections held at once")
    ap.add_argument("--attack-s", type=float, default=15.0)
    ap.add_argument("--requests", type=int, default=40, help="concurrent requests with an image")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the attacker's sockets are this process's files
    want = min(hard, max(soft, args.slow + 512)) if hard != resource.RLIM_INFINITY else max(soft, args.slow + 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    slow = min(args.slow, want - 256)

    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="mmdialog-abuse-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mmdialog", "serve", args.model, "--port", str(port),
                             "--photos-dir", str(out), "--max-batch", "4", "--max-queue", "4",
                             "--max-body-mb", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(out / "server.log", "w"))
    try:
        deadline = time.monotonic() + 600
        while health_ms(port, 1) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {out / 'server.log'}")
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        cut_streams_and_full_queue(url, 4)  # warm-up: the first reply loads lazily built parts
        rss_before = rss_mb(proc.pid)
        before = summary([health_ms(port) for _ in range(20)])
        samples, closed = slow_attack(port, slow, args.attack_s)
        flood = [chunked_flood(port) for _ in range(3)]
        queue = cut_streams_and_full_queue(url, args.requests)
        while True:  # every request ended (cut streams run to their end on the server)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            state = json.loads(data.split(b"\r\n\r\n", 1)[1])
            if not state["queued"] and not state["busy"]:
                break
            time.sleep(0.5)
        time.sleep(1)
        leaked = sorted(p.name for p in (out / "uploads").iterdir())
        rss_after = rss_mb(proc.pid)
        print(json.dumps({
            "model": args.model, "slow_connections": slow, "attack_s": args.attack_s,
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "health_before": before, "health_under_slow_attack": summary(samples),
            "slow_connections_closed_by_server": closed,
            "chunked_flood": flood, "cut_streams_and_full_queue": queue,
            "leaked_uploads": len(leaked), "server_rss_mb_before": round(rss_before, 1),
            "server_rss_mb_after": round(rss_after, 1), "server_rss_growth_mb": round(rss_after - rss_before, 1),
            "server_tracebacks": (out / "server.log").read_text().count("Traceback"),
        }, indent=2))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
