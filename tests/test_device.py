"""Device and precision resolution, the thread default, and the trainer's device plumbing on the CPU."""

from __future__ import annotations

import pytest
import torch

import mmfuse.device as device_mod
from mmfuse.device import autocast, default_threads, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device(CPU) == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")


@pytest.mark.parametrize("support, expected", [("amx", "bf16"), ("avx512_bf16", "fp32"), ("none", "fp32")])
def test_precision_auto_on_cpu_follows_the_bf16_units(monkeypatch, support, expected):
    monkeypatch.setattr(device_mod, "cpu_bf16_support", lambda: support)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_fp16_on_cpu_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", CPU)


def test_autocast_runs_matmuls_in_the_chosen_dtype():
    a = torch.randn(4, 4)
    with autocast(CPU, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("cpus, busy, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 2.7, 1), (8, 3.2, 5),
                                                  (1, 5.0, 1)])
def test_default_threads_leaves_busy_cores_alone(cpus, busy, expected):
    assert default_threads(cpus, busy) == expected


def test_busy_cores_sees_a_spinning_process():
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = device_mod.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is None or busy >= 0.7, busy  # one core taken (more if the machine is busy anyway)


def test_cpu_bf16_support_reads_cpuinfo():
    assert device_mod.cpu_bf16_support() in ("amx", "avx512_bf16", "none")
