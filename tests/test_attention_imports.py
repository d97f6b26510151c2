"""``import mmfuse.attention`` / ``mmfuse.layers`` stay light: no data package, no image or progress libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("mmfuse.data", "mmfuse.models", "PIL", "tqdm", "matplotlib", "easy_vqa", "transformers")
LIGHT = ["mmfuse.attention", "mmfuse.layers", "mmfuse.fusion", "mmfuse.encoders", "mmfuse"]

# One fresh interpreter imports each module in turn and reports what each import added. torch itself
# may import tqdm (torch.hub), so only what the mmfuse imports add is counted.
PROBE = """
import importlib, json, sys
import torch
added = {}
for name in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(name)
    added[name] = sorted(set(sys.modules) - before)
print(json.dumps(added))
"""


def test_the_attention_stack_imports_without_the_data_package():
    proc = subprocess.run([sys.executable, "-c", PROBE, *LIGHT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    added = json.loads(proc.stdout)
    assert "mmfuse.attention" in added["mmfuse.attention"]  # the probe measured something
    heavy = {name: [m for m in modules if m.startswith(HEAVY)] for name, modules in added.items()}
    assert heavy == {name: [] for name in LIGHT}


def test_the_models_still_come_from_the_top_level_package():
    import mmfuse
    from mmfuse.models import VQAModel

    assert mmfuse.VQAModel is VQAModel and "VQAModel" in mmfuse.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mmfuse.Nope  # noqa: B018
