"""Adversarial run against a real ``snipserve serve`` on 127.0.0.1: the issue-12 goals, measured.

    .venv/bin/python benchmarks/adversarial.py [--engine fake|onnxruntime] [--slow-clients 64] [--json OUT]

Families (bounded loops, loopback only): hostile options (unicode digits, 5000-digit ids, deep/huge ``levels``,
10^400, NaN, amplification), decompression-bomb GIFs in parallel, slow-body and slow-header clients, oversized
heads, idle connections. Prints, and checks against the goals:

- number of 5xx answers (goal 0);
- the slowest hostile-option answer in ms (goal: 4xx under 50 ms) and the server's RSS growth across them;
- a normal request's median latency with ``--slow-clients`` slow-body clients connected, as a ratio to idle (goal
  at most 2x);
- the server's peak RSS over the whole run (goal under 1.5 GB), sampled every 50 ms from /proc;
- ``/readyz`` afterwards (goal 200).

The fake engine is the default: the model's speed is not what these families test. ``--engine onnxruntime`` runs
the shipped model instead (normal requests are then slower, the ratios still apply).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.cli.serve_process import running_server, serve_command  # noqa: E402

HUGE = "9" * 5000
REPEATS = 5  # each hostile option; the slowest median and the slowest single answer are reported
PNG_TYPE = {"Content-Type": "image/png"}
SLOW_HEAD = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
HOSTILE: list[tuple[str, str]] = [
    ("classes", "\u00b2"),
    ("classes", HUGE),
    ("classes", ",".join(["red"] * 5000)),
    ("levels", "[" * 3000 + "]" * 3000),
    ("levels", '[{"short_side": 1' + "0" * 400 + "}]"),
    ("levels", '[{"long_side": 1000000000000}]'),
    ("levels", '[{"long_side": 1316000}]'),
    ("levels", '[{"short_side": 1048576}]'),
    ("levels", '[{"scale": 1, "valid": [NaN, NaN]}]'),
    ("levels", '[{"scale": 1e400}]'),
    ("levels", json.dumps([{"scale": 1}] * 1000)),
    ("min_object_size", "1e400"),
    ("score_threshold", "NaN"),
    ("max_detections", HUGE),
    ("sigma", "inf"),
    ("preset", "p" * 20000),
    ("timeout", "nan"),
]


def png(width: int = 256, height: int = 256) -> bytes:
    image = np.full((height, width, 3), 128, np.uint8)
    image[40:70, 40:70] = (255, 0, 0)
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def gif_bomb(side: int = 8000) -> bytes:
    """A ~40-byte GIF whose logical screen and frame declare ``side x side`` pixels."""
    header = b"GIF89a" + struct.pack("<HHBBB", side, side, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


class RssSampler:
    """Peak resident memory of a process, sampled from /proc every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


async def normal_latency(client: httpx.AsyncClient, n: int) -> tuple[float, list[int]]:
    body, times, statuses = png(), [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post("/v1/detect", content=body, headers={"Content-Type": "image/png"})
        times.append(time.perf_counter() - t0)
        statuses.append(r.status_code)
    return statistics.median(times) * 1e3, statuses


async def hostile_options(client: httpx.AsyncClient, rss: RssSampler) -> dict[str, Any]:
    body, rows = png(64, 64), []
    before = rss.now()
    for name, value in HOSTILE:
        times, statuses = [], set()
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            if name == "timeout":  # a query parameter only
                r = await client.post("/v1/detect", params={name: value}, content=body, headers=PNG_TYPE)
            else:
                r = await client.post("/v1/detect", files={"file": ("a.png", body, "image/png")}, data={name: value})
            times.append((time.perf_counter() - t0) * 1e3)
            statuses.add(r.status_code)
        row = {"option": name, "value": value[:24], "statuses": sorted(statuses)}
        rows.append(row | {"median_ms": statistics.median(times), "max_ms": max(times)})
    return {
        "rows": rows,
        "max_median_ms": max(r["median_ms"] for r in rows),
        "max_ms": max(r["max_ms"] for r in rows),
        "rss_growth": rss.now() - before,
    }


async def big_images(client: httpx.AsyncClient, n: int, side: int) -> tuple[list[int], float]:
    """``n`` valid ``side x side`` PNGs at once, one coarse level each: the pixel budget makes some wait."""
    body, params = png(side, side), {"levels": '[{"long_side": 512}]'}
    t0 = time.perf_counter()

    async def one() -> int:
        r = await client.post("/v1/detect", params=params, content=body, headers=PNG_TYPE)
        return r.status_code

    statuses = list(await asyncio.gather(*(one() for _ in range(n))))
    return statuses, time.perf_counter() - t0


async def gif_bombs(client: httpx.AsyncClient, n: int) -> list[int]:
    async def one() -> int:
        r = await client.post("/v1/detect", content=gif_bomb(), headers={"Content-Type": "image/gif"})
        return r.status_code

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def slow_body_clients(url: str, n: int, seconds: float, stop: threading.Event) -> list[bytes]:
    """``n`` clients each declaring a 1 MB body and sending it at 10 bytes/s; returns each one's reply head."""
    socks = []
    for _ in range(n):
        sock = _open(url)
        sock.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
        )
        socks.append(sock)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"\0" * 10)
        time.sleep(1.0)
    return _first_replies(socks, timeout=30)


def _first_replies(socks: list[socket.socket], timeout: float | None = None) -> list[bytes]:
    """The first bytes each socket answers (or the error's name), closing each; ``timeout`` per socket if given."""
    replies = []
    for sock in socks:
        if timeout is not None:
            sock.settimeout(timeout)
        try:
            replies.append(sock.recv(200))
        except OSError as exc:
            replies.append(f"{type(exc).__name__}".encode())
        sock.close()
    return replies


def slow_header_clients(url: str, n: int) -> list[bytes]:
    socks = [_open(url) for _ in range(n)]
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    return _first_replies(socks)


def oversized_head(url: str, size: int) -> bytes:
    with _open(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(size // 65536):
                sock.sendall(b"a" * 65536)
        except OSError:
            pass
        try:
            return sock.recv(200)
        except OSError as exc:
            return type(exc).__name__.encode()


def status_of(reply: bytes) -> int:
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def run(url: str, pid: int, slow_clients: int) -> dict[str, Any]:
    rss = RssSampler(pid)
    out: dict[str, Any] = {"slow_clients": slow_clients}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await normal_latency(client, 10)  # warm-up: first calls allocate
        out["idle_ms"], idle_statuses = await normal_latency(client, 30)
        out["hostile"] = await hostile_options(client, rss)
        out["gif_bombs"] = await gif_bombs(client, 8)
        out["big_images"], out["big_images_s"] = await big_images(client, 8, 6000)
        stop = threading.Event()
        replies: list[bytes] = []
        worker = threading.Thread(
            target=lambda: replies.extend(slow_body_clients(url, slow_clients, 8.0, stop)), daemon=True
        )
        worker.start()
        await asyncio.sleep(1.5)  # all connected and trickling
        out["loaded_ms"], loaded_statuses = await normal_latency(client, 30)
        stop.set()
        await asyncio.to_thread(worker.join, 60)
        out["slow_body_replies"] = sorted({status_of(r) for r in replies})
        out["slow_header_replies"] = sorted(
            {status_of(r) for r in await asyncio.to_thread(slow_header_clients, url, 64)}
        )
        out["oversized_head"] = status_of(await asyncio.to_thread(oversized_head, url, 8 * 1024 * 1024))
        out["readyz"] = (await client.get("/readyz")).status_code
        hostile = [s for row in out["hostile"]["rows"] for s in row["statuses"]]
        statuses = idle_statuses + loaded_statuses + hostile + out["gif_bombs"] + out["big_images"]
    rss.stop()
    out["peak_rss_mb"] = rss.peak / 2**20
    out["5xx"] = sum(s >= 500 for s in statuses)
    return out


def report(r: dict[str, Any]) -> None:
    h = r["hostile"]
    print("| check | measured | goal |")
    print("|---|---|---|")
    print(f"| 5xx answers | {r['5xx']} | 0 |")
    statuses = sorted({s for row in h["rows"] for s in row["statuses"]})
    slowest = f"{h['max_median_ms']:.1f} ms (slowest single answer {h['max_ms']:.1f} ms)"
    what = f"hostile options ({len(h['rows'])} x {REPEATS}): statuses, slowest median"
    print(f"| {what} | {statuses}, {slowest} | 4xx, < 50 ms |")
    print(f"| hostile options: server RSS growth | {h['rss_growth'] / 2**20:.1f} MiB | no spike |")
    print(f"| 8 parallel 8000x8000 GIF bombs | {sorted(set(r['gif_bombs']))} | 4xx |")
    big = f"{sorted(set(r['big_images']))} in {r['big_images_s']:.1f} s"
    print(f"| 8 parallel valid 6000x6000 PNGs (36 MP each) | {big} | 200, bounded memory |")
    ratio = r["loaded_ms"] / r["idle_ms"]
    latency = f"{r['idle_ms']:.1f} / {r['loaded_ms']:.1f} ms = {ratio:.2f}x"
    print(f"| normal request, idle / with {r['slow_clients']} slow-body clients | {latency} | <= 2x |")
    print(f"| slow-body clients' answers | {r['slow_body_replies']} | 408 |")
    print(f"| slow-header clients' answers | {r['slow_header_replies']} | 408 |")
    print(f"| 8 MiB request head | {r['oversized_head']} | 431 |")
    print(f"| peak server RSS | {r['peak_rss_mb']:.0f} MiB | < 1536 MiB |")
    print(f"| /readyz after | {r['readyz']} | 200 |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["fake", "onnxruntime"], default="fake")
    parser.add_argument("--slow-clients", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    env = {"SNIPSERVE_ENGINE": args.engine, "SNIPSERVE_WARMUP": "false", "SNIPSERVE_LOG_LEVEL": "warning"}
    env |= {k: v for k, v in os.environ.items() if k.startswith("SNIPSERVE_") and k not in env}
    with running_server(serve_command(), env=env) as server:
        results = asyncio.run(run(server.url, server.proc.pid, args.slow_clients))
    report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
