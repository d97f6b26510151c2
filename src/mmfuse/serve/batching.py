"""Batching concurrent requests on the fly.

Requests wait in a queue; one worker takes the first, then whatever else arrives within
``max_wait_ms`` (up to ``max_batch``), and answers them all in one call of the model on a single
worker thread, so the event loop keeps accepting requests meanwhile. ``max_batch=1`` answers each
request alone (no batching), through the same queue and thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["Batcher"]

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """Collects items into batches for ``fn(list[In]) -> list[Out]``; call :meth:`submit` from the loop.

    Start it with :meth:`start` inside a running event loop and stop it with :meth:`stop`.
    """

    def __init__(self, fn: Callable[[list[In]], list[Out]], *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmfuse-model")
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # batches run and items answered, for logs and tests
        self.items = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, item: In) -> Out:
        """Queue ``item`` and wait for its result (or the exception its batch raised)."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())  # already waiting: no need to sleep
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            live = [(item, f) for item, f in batch if not f.cancelled()]  # clients that gave up
            if not live:
                continue
            start = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
            except Exception as e:  # one bad batch must not stop the worker
                log.exception("batch of %d failed", len(live))
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.items += len(live)
            log.debug("batch of %d answered in %.1f ms", len(live), 1000 * (time.monotonic() - start))
            for (_, f), result in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(result)
