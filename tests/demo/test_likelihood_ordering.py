"""The demo model's ELBO ranks the right answer above corrupted ones (a few items per task; the full
figure comes from benchmarks/likelihood_ordering.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vllm_dapd.decoding.likelihood import ScoreSettings
from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.tasks import TASKS
from vllm_dapd.demo.vocab import Vocab
from vllm_dapd.models.loading import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "likelihood_ordering.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("likelihood_ordering", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("task", TASKS)
def test_right_answer_outscores_corruptions(bench, task):
    r = bench.ordering(load_model(CHECKPOINT), Vocab.build(), task, 4, ScoreSettings(samples=8))
    assert r["pairs"] == 12 and r["pair_share"] >= 11 / 12 and r["mean_margin_nats"] > 0
