"""Parity with the peers' step functions, transcribed literally from their code and run on random tensors.

Each ``ref_*`` below is a line-by-line transcription (temperature 0, ``remasking='low_confidence'``)
of one reference step, kept as close to the source as the test allows so a reader can diff it:

* ``ref_factor``: lizhuo-luo/DAWN ``llada/generate.py`` ``get_transfer_index_dynamic``;
* ``ref_localleap``: lizhuo-luo/DAWN ``llada/generate.py`` ``get_transfer_index_localleap`` (as
  called by its ``generate``: ``num_transfer_tokens=None`` with a threshold);
* ``ref_dream_threshold`` (``tests/fastdllm_dream_reference.py``): NVlabs/Fast-dLLM
  ``dream/model/generation_utils.py`` ``_sample``, alg ``confidence_threshold`` (its whole loop,
  batch 1, on a table of logits per forward).

Our policies are then run on the same logits with a step budget large enough that the
``min_commits`` floor (ours, not theirs) is 1, unless a test says otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdllm_dream_reference import ref_dream_threshold
from vllm_dapd.decoding import DenoiseState, get_policy, min_commits, stack_params


def ref_confidence(logits, mask_index, x):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    return x0, confidence


def ref_factor(logits, mask_index, x, factor=1):
    x0, confidence = ref_confidence(logits, mask_index, x)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        num_tokens = int(num_transfer_tokens[j].item())
        if num_tokens == 0:
            continue
        ns = list(range(1, num_transfer_tokens[j] + 1))
        es = [factor / (n + 1) for n in ns]
        threshs = [1 - e for e in es]
        threshs[0] = -1
        sorted_confidence = torch.sort(confidence[j][mask_index[j]], dim=-1, descending=True)[0]
        assert len(sorted_confidence) == len(threshs)
        for top_i in range(len(threshs)):
            if sorted_confidence[top_i] < threshs[top_i]:
                break
        if top_i == 0 or top_i == len(threshs) - 1:
            top_i += 1
        _, select_index = torch.topk(confidence[j], k=top_i)
        transfer_index[j, select_index] = True
    return x0, transfer_index


def ref_localleap(logits, mask_index, x, threshold=0.9, relaxed_threshold=0.75, radius=4):
    x0, confidence = ref_confidence(logits, mask_index, x)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer_index[j, select_index] = True
        mask_positions = torch.where(mask_index[j])[0]
        neighbor_positions = set()
        use_localleap = False
        if relaxed_threshold is not None:
            anchor_mask = confidence[j][mask_positions] >= threshold
            anchor_count = anchor_mask.sum().item()
            if anchor_count >= 1:
                use_localleap = True
                anchor_positions = mask_positions[anchor_mask]
                for pos in anchor_positions:
                    pos_val = pos.item()
                    for neighbor_pos in range(max(0, pos_val - radius), min(confidence.shape[1], pos_val + radius + 1)):
                        neighbor_positions.add(neighbor_pos)
        for k in range(1, int(num_transfer_tokens[j])):
            pos = select_index[k].item()
            if use_localleap:
                effective_threshold = relaxed_threshold if pos in neighbor_positions else threshold
            else:
                effective_threshold = threshold
            if confidence[j, select_index[k]] < effective_threshold:
                transfer_index[j, select_index[k]] = False
    return x0, transfer_index


def random_case(seed: int, B: int, L: int, V: int, scale: float, frac: float):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * scale
    masked = torch.rand(B, L, generator=g) < frac
    masked[:, int(torch.randint(0, L, (1,), generator=g))] = True  # every row has a mask
    x = torch.randint(1, V, (B, L), generator=g)
    return logits, masked, x


def our_state(logits, masked, x, step=0, steps=10_000, block_size=None) -> DenoiseState:
    B = logits.shape[0]
    full = lambda v: torch.full((B,), v, dtype=torch.long)
    return DenoiseState(
        logits=logits, tokens=torch.where(masked, 0, x), masked=masked, decoded=~masked,
        step=full(step), steps=full(steps), temperature=torch.zeros(B), seed=full(0), nfe=full(0),
        block_size=block_size,
    )


def run_ours(name, state, **overrides):
    pol = get_policy(name)
    return pol.step(state, stack_params([pol.make_params(overrides)] * state.batch_size))


# ---- factor ----

@pytest.mark.parametrize("seed", range(40))
def test_factor_equals_reference(seed):
    rng = np.random.default_rng(seed)
    factor = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
    logits, masked, x = random_case(seed, B=3, L=int(rng.integers(1, 24)), V=6, scale=float(rng.uniform(1, 8)),
                                    frac=float(rng.uniform(0.1, 1.0)))
    x0, want = ref_factor(logits, masked, x, factor)
    got = run_ours("factor", our_state(logits, masked, x), factor=factor)
    assert torch.equal(got.commit, want)
    assert torch.equal(got.tokens[want], x0[want])


def test_factor_parity_covers_the_off_by_one():
    """The random cases above include the reference's lone-last-failure case, where the rule (our
    ``reference_exact=False``) differs: the parity test would fail without the exact mode."""
    hits = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        factor = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        logits, masked, x = random_case(seed, B=3, L=int(rng.integers(1, 24)), V=6,
                                        scale=float(rng.uniform(1, 8)), frac=float(rng.uniform(0.1, 1.0)))
        rule = run_ours("factor", our_state(logits, masked, x), factor=factor, reference_exact=False)
        hits += int(not torch.equal(rule.commit, ref_factor(logits, masked, x, factor)[1]))
    assert hits >= 3


# ---- localleap ----

@pytest.mark.parametrize("seed", range(40))
def test_localleap_equals_reference(seed):
    rng = np.random.default_rng(seed)
    thr, relaxed = float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.3, 0.95))  # relaxed > thr too
    radius = int(rng.integers(0, 6))
    logits, masked, x = random_case(seed, B=3, L=int(rng.integers(1, 30)), V=4, scale=float(rng.uniform(2, 9)),
                                    frac=float(rng.uniform(0.1, 1.0)))
    x0, want = ref_localleap(logits, masked, x, thr, relaxed, radius)
    got = run_ours("localleap", our_state(logits, masked, x), threshold=thr, relaxed_threshold=relaxed, radius=radius)
    assert torch.equal(got.commit, want)
    assert torch.equal(got.tokens[want], x0[want])


def test_localleap_parity_cases_use_the_relaxed_bar():
    """Non-vacuous: in the random cases the relaxed neighbourhood changes the commit set (the plain
    threshold rule, relaxed = threshold, differs from the reference)."""
    differ = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        thr, relaxed = float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.3, 0.95))
        radius = int(rng.integers(0, 6))
        logits, masked, x = random_case(seed, B=3, L=int(rng.integers(1, 30)), V=4,
                                        scale=float(rng.uniform(2, 9)), frac=float(rng.uniform(0.1, 1.0)))
        plain = run_ours("localleap", our_state(logits, masked, x), threshold=thr, relaxed_threshold=thr, radius=radius)
        differ += int(not torch.equal(plain.commit, ref_localleap(logits, masked, x, thr, relaxed, radius)[1]))
    assert differ >= 5


# ---- Dream's threshold rule with its quota ----

def ref_dream(x, logits_at, mask_token_id, steps, threshold):
    """The transcription (``tests/fastdllm_dream_reference.py``) with ``logits_at(i, x)`` standing for
    the model (and Dream's shift) at its ``i``-th forward."""
    forwards = iter(range(1 << 30))
    return ref_dream_threshold(x, lambda x_: logits_at(next(forwards), x_), mask_token_id, steps, threshold)


MASK_ID = 0


def dream_case(seed: int):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(1, 6))
    size = steps * int(rng.integers(1, 5))  # the reference needs masks % steps == 0
    prompt = int(rng.integers(0, 4))
    V_ = 5
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(64, 1, prompt + size, V_, generator=g) * float(rng.uniform(1.0, 9.0))
    table[..., MASK_ID] = -1e4  # the model never proposes the mask
    x = torch.cat([torch.randint(1, V_, (1, prompt), generator=g), torch.full((1, size), MASK_ID)], dim=1)
    return x, (lambda i, _x: table[i]), steps, size, prompt, float(rng.choice([0.5, 0.7, 0.9]))


def our_dream_threshold_step(x, logits, i, steps, size, prompt, threshold, exact=True, overrun=False):
    canvas, lg = x[:, prompt:], logits[:, prompt:]
    st_ = our_state(lg, canvas == MASK_ID, canvas, step=i, steps=steps, block_size=torch.tensor([size]))
    res = run_ours("threshold", st_, threshold=threshold, dream_quota=True, exact_schedule=exact, overrun=overrun)
    full = torch.zeros_like(x, dtype=torch.bool)
    full[:, prompt:] = res.commit
    return full, torch.cat([x[:, :prompt], res.tokens], dim=1)


@pytest.mark.parametrize("seed", range(60))
def test_dream_threshold_quota_equals_reference(seed):
    x, logits_at, steps, size, prompt, thr = dream_case(seed)
    want = ref_dream(x.clone(), logits_at, MASK_ID, steps, thr)
    ours = x.clone()
    for i in range(steps):
        commit, tokens = our_dream_threshold_step(ours, logits_at(i, ours), i, steps, size, prompt, thr)
        if i < steps - 1:
            assert torch.equal(commit, want[i]), f"step {i}"
        else:  # the budget's last step: everything left, where the reference may keep stepping
            assert not (want[i] & ~commit).any() and torch.equal(commit, ours == MASK_ID)
            assert torch.equal(commit, want[i]) == (len(want) == steps)
        ours = torch.where(commit, tokens, ours)


def test_dream_threshold_parity_exercises_the_cap_and_the_carry():
    """Non-vacuous: in those cases the cap binds (more pass than the quota) and leftovers carry."""
    capped = carried = 0
    for seed in range(60):
        x, logits_at, steps, size, prompt, thr = dream_case(seed)
        want = ref_dream(x.clone(), logits_at, MASK_ID, steps, thr)
        ours = x.clone()
        for i in range(steps - 1):
            commit, tokens = our_dream_threshold_step(ours, logits_at(i, ours), i, steps, size, prompt, thr)
            lg = logits_at(i, ours)
            passing = ((torch.softmax(lg, -1).amax(-1) >= thr) & (ours == MASK_ID)).sum()
            capped += int(passing > commit.sum())
            carried += int(commit.sum() < size // steps)
            ours = torch.where(want[i], tokens, ours)
    assert capped >= 5 and carried >= 5


def run_overrun(x, logits_at, steps, size, prompt, thr):
    """Our overrun mode stepped like the loops step it (``step_limit``): the commit of each forward."""
    pol = get_policy("threshold")
    limit = pol.step_limit(pol.make_params({"overrun": True}), steps, size)
    ours, commits = x.clone(), []
    while bool((ours == MASK_ID).any()) and len(commits) < limit:
        commit, tokens = our_dream_threshold_step(ours, logits_at(len(commits), ours), len(commits), steps, size,
                                                  prompt, thr, overrun=True)
        commits.append(commit)
        ours = torch.where(commit, tokens, ours)
    return ours, commits


@pytest.mark.parametrize("seed", range(60))
def test_dream_threshold_overrun_equals_reference_past_the_budget(seed):
    """``overrun``: every forward commits what the reference's commits, past ``steps`` too, and the
    block takes as many forwards."""
    x, logits_at, steps, size, prompt, thr = dream_case(seed)
    want = ref_dream(x.clone(), logits_at, MASK_ID, steps, thr)
    ours, commits = run_overrun(x, logits_at, steps, size, prompt, thr)
    assert not (ours == MASK_ID).any()
    assert len(commits) == len(want)
    for i, commit in enumerate(commits):
        assert torch.equal(commit, want[i]), f"forward {i}"


def test_dream_threshold_overrun_cases_run_past_the_budget():
    """Non-vacuous: the reference overruns ``steps`` in many cases, by more than one forward in some
    (where ``exact_schedule`` alone commits the rest at the last step and differs)."""
    overran = twice = 0
    for seed in range(60):
        x, logits_at, steps, size, prompt, thr = dream_case(seed)
        want = ref_dream(x.clone(), logits_at, MASK_ID, steps, thr)
        overran += int(len(want) > steps)
        twice += int(len(want) > steps + 1)
    assert overran >= 10 and twice >= 5, (overran, twice)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 6), size=st.integers(1, 14), thr=st.floats(0.0, 1.0),
       exact=st.booleans())
def test_dream_quota_caps_and_finishes_in_budget(seed, steps, size, thr, exact):
    """Any block size (not only multiples of steps): each step commits at most its quota (unless the
    floor or the last step needs more), at least the floor unless exact, and the block ends in budget."""
    g = torch.Generator().manual_seed(seed)
    canvas = torch.full((1, size), MASK_ID)
    quota_so_far = 0
    for i in range(steps):
        lg = torch.randn(1, size, 5, generator=g) * 4
        lg[..., MASK_ID] = -1e4
        masked = canvas == MASK_ID
        st_ = our_state(lg, masked, canvas, step=i, steps=steps, block_size=torch.tensor([size]))
        res = run_ours("threshold", st_, threshold=thr, dream_quota=True, exact_schedule=exact)
        n, got = int(masked.sum()), int(res.commit.sum())
        quota_so_far += size // steps + int(i < size % steps)  # LLaDA's even split
        committed_before = size - n
        floor = int(min_commits(torch.tensor([n]), torch.tensor([i]), torch.tensor([steps]))[0])
        if i < steps - 1:
            assert got <= max(quota_so_far - committed_before, 1 if exact else floor)
            assert got >= (1 if exact else floor) or n == 0
        canvas = torch.where(res.commit, res.tokens, canvas)
    assert not (canvas == MASK_ID).any()
