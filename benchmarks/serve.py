"""``mmfuse serve`` under load: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients, with
batching (``--max-batch 32 --max-wait-ms 5``) and without (``--max-batch 1``).

The server is ``mmfuse serve`` in its own process on 127.0.0.1, restarted for each model and batching
setting, serving two models with untrained weights (the same computation as trained ones): the
default VQA model, whose forward on one question is mostly Python overhead (~12 ms), and one with a
VGG11 (half width) vision encoder, whose forward is mostly convolution (~60 ms). The clients are
asyncio tasks in this process on keep-alive connections, each sending its next request (a multipart
upload of a 64x64 easy-VQA PNG and a question) as soon as the last one is answered; a minimal HTTP
client, since a full one (httpx) took more of the shared CPU than the server and set the pace. Each
level sends a fixed number of requests after a warm-up, so the run stops by itself. The server runs
torch on one thread: on a shared 2-core machine, two torch threads fighting the client and the event
loop for cores made a single-question forward ~8x slower than one thread did.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import markdown_table
from mmfuse.data import AnswerVocab, WordTokenizer
from mmfuse.models.vqa import VQAConfig, VQAModel

CONCURRENCY = (1, 8, 32)
SETTINGS = {"batching": ["--max-batch", "32", "--max-wait-ms", "5"], "no batching": ["--max-batch", "1"]}
QUESTIONS = ["what is the red shape?", "what is the color of the rectangle?", "what is the blue shape?",
             "what color is the circle?"]
EASY_VQA_ANSWERS = ["black", "blue", "brown", "circle", "gray", "green", "no", "rectangle", "red", "teal",
                    "triangle", "yellow", "yes"]


MODELS = {"default": {}, "vgg11 x0.5": {"vision": "vgg11", "vgg_width": 0.5}}


def _checkpoint(directory: Path, options: dict[str, Any]) -> Path:
    tokenizer = WordTokenizer.fit([*QUESTIONS, "is there a shape in the image?", "does it contain a triangle?"])
    config = VQAConfig(num_answers=len(EASY_VQA_ANSWERS), vocab_size=len(tokenizer), **options)
    VQAModel(config, answers=AnswerVocab(EASY_VQA_ANSWERS), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``mmfuse serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, options: list[str], threads: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmfuse.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
             "--threads", str(threads), *options],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mmfuse serve did not start: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _multipart(image: bytes, question: str) -> tuple[bytes, str]:
    boundary = "mmfusebench7d1c"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{question}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def _load(url: str, images: list[bytes], *, concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs from ``concurrency`` keep-alive connections, each sending its next request when
    the last is answered. A minimal HTTP/1.1 client on asyncio streams: the requests are prepared
    up front, so the client takes as little of the shared CPU as it can."""
    host, port = url.removeprefix("http://").split(":")
    prepared = []
    for k, image in enumerate(images):
        body, kind = _multipart(image, QUESTIONS[k % len(QUESTIONS)])
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        prepared.append(head + body)
    latencies: list[float] = []
    answers: dict[int, str] = {}
    failures = 0
    counter = iter(range(requests))

    async def worker() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                k = i % len(images)
                start = time.perf_counter()
                writer.write(prepared[k])
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    failures += 1
                else:
                    answers.setdefault(k, json.loads(body)["answer"])
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": requests, "failures": failures, "seconds": wall, "requests_per_s": requests / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "answers": answers}


def run(*, quick: bool) -> dict[str, Any]:
    examples = resources.files("mmfuse.serve").joinpath("examples")
    images = [examples.joinpath(f"easy-vqa-{i}.png").read_bytes() for i in range(4)]
    threads = 1  # see the module docstring
    rows, answers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"default": MODELS["default"]} if quick else MODELS  # quick: the suite runs, in fewer starts
        for model, model_options in models.items():
            checkpoint = _checkpoint(Path(tmp) / model, model_options)
            for setting, options in SETTINGS.items():
                server = _Server(checkpoint, options, threads)
                try:
                    asyncio.run(_load(server.url, images, concurrency=4, requests=8 if quick else 32))  # warm-up
                    for c in CONCURRENCY:
                        n = (2 if quick else 8) * max(c, 4)  # 32, 64, 256 requests at full size
                        result = asyncio.run(_load(server.url, images, concurrency=c, requests=n))
                        answers[(model, setting, c)] = result.pop("answers")
                        rows.append({"model": model, "setting": setting, "concurrency": c, **result})
                finally:
                    server.stop()
    by = {(r["model"], r["setting"], r["concurrency"]): r for r in rows}
    speedup = {model: by[(model, "batching", 32)]["requests_per_s"] / by[(model, "no batching", 32)]["requests_per_s"]
               for model in models}
    checks = {
        "every request answered": all(r["failures"] == 0 for r in rows),
        "same answers with and without batching": all(
            a == answers[(key[0], "no batching", 1)] for key, a in answers.items()),
    }
    if not quick:  # too few requests in quick mode to compare throughput
        checks.update({f"batching raises throughput at 32 clients ({m})": x > 1.0 for m, x in speedup.items()})
    return {"threads": threads, "rows": rows, "speedup_at_32": speedup, "checks": checks}


def to_markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        ["model", "setting", "clients", "requests", "requests/s", "p50 ms", "p99 ms"],
        [[r["model"], r["setting"], r["concurrency"], r["requests"], f"{r['requests_per_s']:.0f}",
          f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}"] for r in result["rows"]])
    ratios = ", ".join(f"{m} {x:.2f}x" for m, x in result["speedup_at_32"].items())
    return (f"{table}\n\nRequests/s with batching over without, at 32 clients: {ratios} (server on "
            f"{result['threads']} torch thread).")
