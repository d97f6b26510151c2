"""Batcher: items arriving together share a batch, up to max_batch; a failing batch does not stop it."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmfuse[serve]')")
from mmfuse.serve.batching import Batcher


def test_batches_fill_up_to_max_batch_in_order() -> None:
    sizes: list[int] = []

    def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [2 * x for x in items]

    async def main() -> list[int]:
        batcher = Batcher(double, max_batch=8, max_wait_ms=200)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert sizes == [8, 2]


def test_no_batching_with_max_batch_1_and_errors_reach_their_callers() -> None:
    sizes: list[int] = []

    def fn(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if items[0] < 0:
            raise ValueError("negative")
        return items

    async def main() -> tuple[list[int], BaseException | None]:
        batcher = Batcher(fn, max_batch=1, max_wait_ms=50)
        batcher.start()
        try:
            with pytest.raises(ValueError, match="negative"):
                await batcher.submit(-1)
            return await asyncio.gather(*(batcher.submit(i) for i in range(4))), None
        finally:
            await batcher.stop()

    results, _ = asyncio.run(main())
    assert results == [0, 1, 2, 3]
    assert sizes == [1, 1, 1, 1, 1]


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Batcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms must be >= 0"):
        Batcher(lambda x: x, max_wait_ms=-1)
