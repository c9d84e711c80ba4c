"""Scoring options in the runner's scoring code, without an engine: ``score_start`` (one ELBO per
request) and ``score_choices`` (choices by likelihood), on a tiny LLaDA checkpoint."""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.decoding.likelihood import ScoreSettings, draws, elbo, left_to_right_top, split_masks
from vllm_dapd.engine.core import scoring
from vllm_dapd.engine.core.sequence import Sequence
from vllm_dapd.engine.core.settings import DecodeSettings
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_tiny_llada(str(tmp_path_factory.mktemp("scoring_options") / "llada")))


def scored(model, prompt, **options):
    s = Sequence("r", prompt, 4, DecodeSettings(), None, model.mask_token_id, 0.0, 5, num_prompt_logprobs=0,
                 score=scoring.ScoreOptions(**options))
    return s, scoring.prompt_logprobs(model, [s], torch.device("cpu"))["r"]


def count_rows(model, monkeypatch):
    rows = []
    real = type(model).forward

    def spy(self, ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    return rows


def distinct_masks(n: int, starts: range, samples: int, seed: int) -> int:
    """How many distinct masks the rows of one request have: the ELBO samples of every split in
    ``starts`` (``split_masks``, one split at a time) and the left-to-right rows of positions 1..n-1."""
    v, u = draws(samples, n, seed)
    masks = {tuple(m.tolist()) for c in starts for m in split_masks(v, u, c, ScoreSettings(samples=samples))[0]}
    return len(masks | {tuple(j >= i for j in range(n)) for i in range(1, n)})


def test_score_start_is_one_elbo_over_the_continuation(model, monkeypatch):
    prompt, c = list(range(20, 32)), 8
    rows = count_rows(model, monkeypatch)
    _, out = scored(model, prompt, samples=8, start=c)
    values = out.logprobs[:, 0].double()  # row r: prompt token r + 1
    settings = ScoreSettings(samples=8)
    monkeypatch.undo()
    assert float(values[c - 1:].sum()) == pytest.approx(elbo(model, torch.tensor(prompt), c, settings, 5), abs=1e-4)
    l2r = left_to_right_top(model, torch.tensor(prompt), 1)["token"].double()
    torch.testing.assert_close(values[: c - 1], l2r[: c - 1].float().double(), atol=1e-5, rtol=0)
    # 8 ELBO rows plus the 11 left-to-right rows (without score_start: 8 rows per position (88) + 11),
    # each distinct mask once
    assert sum(rows) == distinct_masks(len(prompt), range(c, c + 1), 8, 5) <= 8 + len(prompt) - 1


def test_choice_scores_equal_the_scorers_elbos(model):
    prompt = [20, 21, 22, 23]
    choices = ((30, 31), (40,), (50, 51, 52))
    s = Sequence("r", prompt, 4, DecodeSettings(), None, model.mask_token_id, 0.0, 9,
                 score=scoring.ScoreOptions(samples=8, choices=choices))
    got = scoring.choice_scores(model, [s], torch.device("cpu"))["r"]
    want = [elbo(model, torch.tensor(prompt + list(c)), len(prompt), ScoreSettings(samples=8), 9) for c in choices]
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("options,key", [({"score_start": -1}, "score_start"), ({"score_choices": []}, None),
                                         ({"score_choices": [[]]}, "score_choices"),
                                         ({"score_choices": [[1]] * 65}, "score_choices"),
                                         ({"score_choices": [[True]]}, "score_choices")])
def test_scoring_options_are_validated(options, key):
    if key is None:
        assert scoring.ScoreOptions().with_overrides(options).choices == ()
        return
    with pytest.raises(ValueError, match=f"^{key}:"):
        scoring.ScoreOptions().with_overrides(options)


def test_default_window_bounds_a_long_prompt(model, monkeypatch):
    """By default only the last ``DEFAULT_WINDOW`` positions carry ELBO terms: a long prompt costs
    ``samples`` rows per window position plus its left-to-right rows, not ``samples`` per position;
    a continuation inside the window still sums to its ELBO."""
    prompt, W = [20 + (i % 200) for i in range(100)], scoring.DEFAULT_WINDOW
    assert scoring.ScoreOptions().window == W < len(prompt)
    rows = count_rows(model, monkeypatch)
    _, out = scored(model, prompt, samples=4)
    monkeypatch.undo()
    # 4 * W + 99 rows at most (4 * 99 + 99 without the window), each distinct mask once
    assert sum(rows) == distinct_masks(len(prompt), range(len(prompt) - W, len(prompt)), 4, 5) <= 4 * W + len(prompt) - 1
    values = out.logprobs[:, 0].double()
    c = len(prompt) - 10
    assert float(values[c - 1:].sum()) == pytest.approx(elbo(model, torch.tensor(prompt), c, ScoreSettings(samples=4), 5),
                                                        abs=1e-4)
