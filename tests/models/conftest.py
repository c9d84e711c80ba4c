"""Tiny LLaDA/Dream/LLaDA2 checkpoints (made once per session by our factory) and the parity fixtures.

The fixtures in tests/fixtures/parity were recorded by tools/make_parity_fixtures.py (LLaDA2:
tools/make_llada2_parity_fixtures.py) from the
reference implementations on checkpoints made by the same factory with the same seeds; the
manifest's weight checksum guards against the factory drifting from what was recorded.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada, make_tiny_llada2

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "parity")
MAKERS = {"llada": make_tiny_llada, "dream": make_tiny_dream, "llada2": make_tiny_llada2}


def manifest() -> dict:
    with open(os.path.join(FIXTURES, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def weight_checksum(path: str) -> float:
    total = 0.0
    for f in sorted(x for x in os.listdir(path) if x.endswith(".safetensors")):
        with safe_open(os.path.join(path, f), "pt") as st:
            total += sum(float(st.get_tensor(k).double().sum()) for k in st.keys())
    return total


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """{"llada": dir, "dream": dir, "llada2": dir}: the checkpoints the parity fixtures were recorded on."""
    m = manifest()
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for name, make in MAKERS.items():
        dirs[name] = make(str(root / name), seed=m[name]["seed"])
        assert weight_checksum(dirs[name]) == pytest.approx(m[name]["checksum"], rel=1e-9), (
            f"{name}: tiny factory output changed since the fixtures were recorded; "
            "rerun tools/make_parity_fixtures.py (LLaDA2: tools/make_llada2_parity_fixtures.py)")
    return dirs


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs) -> dict[str, torch.nn.Module]:
    return {name: load_model(path) for name, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def parity() -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(os.path.join(FIXTURES, f"{name}.safetensors")) for name in MAKERS}
