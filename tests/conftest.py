from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def seed() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for tests on tiny tensors.

    Their cost is per-op overhead, which a second thread cannot cut; on a busy machine, waking it
    costs a scheduler slice per op and made a float64 gradcheck 10-20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fp32_unless_asked(monkeypatch) -> None:
    """``precision="auto"`` times fp32 against bf16 on CPUs with native bf16 and keeps the faster; two runs
    that must agree to the bit could then choose differently. Tests see a CPU without native bf16 (auto =
    fp32); tests of that choice patch ``cpu_bf16_support`` themselves."""
    monkeypatch.setattr("mmfuse.train.cpu_bf16_support", lambda: "none")


@pytest.fixture(autouse=True)
def one_default_thread(monkeypatch) -> None:
    """``threads=0`` picks the cores other work leaves free, measured at start: two runs of one test could
    then get different thread counts (and different sums) as the machine's load changes. Tests on tiny
    tensors want one thread anyway; tests of that choice call ``mmfuse.device.default_threads`` itself."""
    monkeypatch.setattr("mmfuse.train.default_threads", lambda: 1)
