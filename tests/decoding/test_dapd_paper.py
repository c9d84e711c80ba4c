"""``dapd`` variants ``staged`` / ``direct`` against a literal transcription of the authors' loop.

``tests/dapd_paper_reference.py`` transcribes quasar529/DAPD's ``generate_dapd_with_blocks`` and
its step functions (see there). Our reference loop (``denoise``) with ``steps`` >= ``block_length``
per block must give the same tokens and the same forwards per block, on tiny LLaDA (GQA) and Dream
checkpoints whose heads are sharpened so that confidences reach 0.9 and 1.0 (Staged's union rule,
Direct's sure set), one block and several, both variants, ``tau_max`` 0.15 and 0.05.

Batched: the authors' loop is per batch (tau from the batch's total masks, one top-1 fallback and
one block exit for the whole batch; their scripts run batch 1). ``dapd`` is per request: a batch
decodes each request exactly as the authors' loop decodes it alone, which the batched cases check.
The same comparison through ``vllm.LLM`` lives in ``tests/engine/test_llm.py`` / ``test_llm_dream.py``.
"""

from __future__ import annotations

import pytest
import torch

from dapd_paper_reference import compute_tau, generate_dapd_with_blocks, select_step, sharpen_checkpoint
from vllm_dapd.decoding import DenoiseState, denoise, get_policy, stack_params
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3, 40, 2, 17, 9], [30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dapd_paper")
    out = {}
    for sharp in (20, 40):
        out["llada", sharp] = load_model(sharpen_checkpoint(
            make_tiny_llada(str(root / f"llada{sharp}"), n_layers=4, n_kv_heads=2), sharp))
        out["dream", sharp] = load_model(sharpen_checkpoint(
            make_tiny_dream(str(root / f"dream{sharp}"), num_hidden_layers=4), sharp))
    return out


def authors(model, prompt, gen, block, variant, tau_max):
    x, forwards = generate_dapd_with_blocks(model, torch.tensor([prompt]), gen, block, alg=f"dapd_{variant}",
                                            tau_max=tau_max)
    return x[0, len(prompt):].tolist(), sum(forwards)


def ours(model, prompts, gen, block, variant, tau_max, extra_steps=0):
    out = denoise(model, torch.tensor(prompts), gen, block, (block + extra_steps) * (gen // block), policy="dapd",
                  params={"variant": variant, "tau_max": tau_max})
    return out.tokens.tolist(), out.nfe.tolist()


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("variant", ["staged", "direct"])
@pytest.mark.parametrize("tau_max", [0.15, 0.05])
def test_matches_the_authors_loop_token_for_token(models, kind, variant, tau_max):
    checked = 0
    for sharp in (20, 40):
        model = models[kind, sharp]
        for gen, block in ((12, 12), (12, 4)):
            want = [authors(model, p, gen, block, variant, tau_max) for p in PROMPTS]
            # batch 1 and batched (per request); a budget above block_length changes nothing
            for prompts, extra in (([PROMPTS[0]], 0), (PROMPTS, 0), (PROMPTS, 5)):
                tokens, nfe = ours(model, prompts, gen, block, variant, tau_max, extra)
                assert tokens == [w[0] for w in want[: len(prompts)]], (sharp, gen, block, extra)
                assert nfe == [w[1] for w in want[: len(prompts)]], (sharp, gen, block, extra)
                checked += 1
    assert checked == 12


@pytest.mark.parametrize("variant", ["staged", "direct"])
def test_one_step_matches_the_authors_selection_on_random_tensors(variant, helpers):
    """The step alone, on random attention/logits (canvas = the whole sequence, so every maximum
    is the reference's), active blocks anywhere in the canvas, sharp and flat logits: exercises
    the row-normalised, one-directional edge test (a candidate tests its own row against the
    positions already chosen), the union after half the answer is decoded, the sure set and the
    fallback. ``steps`` large: the budget floor is at most 1."""
    policy = get_policy("dapd")
    seen = set()
    for seed in range(60):
        L, lo = 12, seed % 3 * 4
        st = helpers.make_state(B=1, L=L, V=16, seed=seed, masked_frac=0.3 + 0.6 * (seed % 5) / 4, steps=L, attention=True,
                        logit_scale=(2.0, 8.0, 30.0)[seed % 3], block=(lo, lo + 4 + seed % 2 * 4))
        st.canvas_length = torch.tensor([L])
        tau_max = (0.15, 0.05, 0.5)[seed % 3]
        params = policy.make_params({"variant": variant, "tau_max": tau_max})
        got = policy.step(st, stack_params([params])).commit & st.masked
        remaining = L - int(st.decoded.sum())
        conf = st.logits.softmax(-1).amax(-1)
        want = select_step(conf, st.attention, st.masked, remaining, L, f"dapd_{variant}",
                           compute_tau(remaining, L, 0.01, tau_max))
        assert got.tolist() == want.tolist(), seed
        seen.add(int(got.sum()))
    assert max(seen) >= 3  # sets, not single commits, were compared


def test_edge_test_reads_the_candidates_own_row():
    """j is visited first (degree x confidence), then i, then k. The dependency i-j is small for
    i (its row max is its link to k) but j's largest, so i tests N[i, j] = 0.1 <= tau and joins,
    where a symmetric edge (N[j, i] = 1) would keep it out; k is kept out by i."""
    raw = torch.tensor([[0.0, 0.1, 0.05], [0.1, 0.0, 1.0], [0.05, 1.0, 0.0]]) * 0.4  # j, i, k
    conf = torch.tensor([0.8, 0.1, 0.06])
    V = 20
    logits = torch.zeros(1, 3, V)
    logits[0, :, 1] = torch.log(19 * conf / (1 - conf))  # softmax max = conf at token 1
    st = DenoiseState(logits=logits, tokens=torch.zeros(1, 3, dtype=torch.long), masked=torch.ones(1, 3, dtype=torch.bool),
                      decoded=torch.zeros(1, 3, dtype=torch.bool), step=torch.tensor([0]), steps=torch.tensor([3]),
                      temperature=torch.tensor([0.0]), seed=torch.tensor([0]), attention=raw[None].clone())
    policy = get_policy("dapd")
    for variant in ("staged", "direct"):
        params = stack_params([policy.make_params({"variant": variant, "tau_min": 0.15, "tau_max": 0.15})])
        assert policy.step(st, params).commit.tolist() == [[True, True, False]]
        want = select_step(logits.softmax(-1).amax(-1), raw[None], st.masked, 3, 3, f"dapd_{variant}", 0.15)
        assert want.tolist() == [[True, True, False]]


def test_variants_differ_where_the_paper_says(models):
    """The rules are exercised: Direct commits sure positions and Staged's late union adds some,
    so the variants (and the two tau schedules) do not all decode alike."""
    model = models["llada", 40]
    runs = {(v, t): authors(model, PROMPTS[0], 12, 12, v, t) for v in ("staged", "direct") for t in (0.15, 0.05)}
    assert len({r[1] for r in runs.values()}) > 1  # forwards differ somewhere
    assert runs["direct", 0.15][1] < 12 and runs["staged", 0.15][1] < 12  # parallel, not one per step


def test_layers_follow_layer_ratio():
    from vllm_dapd.decoding import get_policy

    policy = get_policy("dapd")
    layers = lambda n, **kw: policy.attention_layers(policy.make_params({"variant": "staged", **kw}), n)  # noqa: E731
    assert layers(32) == tuple(range(-10, 0))  # LLaDA-8B: 10 of 32
    assert layers(28) == tuple(range(-9, 0))  # Dream-7B: 28 - int(19.6) = 9
    assert layers(4) == (-2, -1) and layers(2) == (-1,) and layers(4, layer_ratio=1.0) == (-4, -3, -2, -1)
    assert layers(4, variant="tuned") == (-4, -3, -2, -1)  # tuned: attention_window


@pytest.mark.parametrize("bad", [{"variant": "paper"}, {"variant": 3}, {"variant": True}, {"layer_ratio": 0.0},
                                 {"layer_ratio": 1.5}, {"tau_min": -0.1},
                                 # a setting the variant does not read is refused, not ignored
                                 {"edge_threshold": 1.0, "variant": "staged"}, {"safe_confidence": 0.5, "variant": "direct"},
                                 {"tau_max": 0.1, "variant": "tuned"}])
def test_bad_settings_name_the_field(bad):
    from vllm_dapd.decoding import get_policy

    with pytest.raises(ValueError, match=f"^{next(iter(bad))}:"):
        get_policy("dapd").make_params(bad)
