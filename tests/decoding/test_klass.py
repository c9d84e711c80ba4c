"""KLASS: the reference loop with ``klass`` against a literal transcription of DAWN's
``llada/generate.py`` ``generate_klass`` (temperature 0, alg ``klass``, unmask_strategy ``all``),
both driven by the same scripted model; and the memory contract of the policy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding import denoise, get_policy, stack_params
from vllm_dapd.decoding.model_api import DiffusionOutput

REF_MASK = 126336  # generate_klass hard-codes LLaDA's mask id


def get_num_transfer_tokens(block_mask_index, steps):
    device = block_mask_index.device
    total = block_mask_index.sum(dim=1)
    base = torch.div(total, steps, rounding_mode='floor')
    rem = total - base * steps
    num_transfer_tokens = base.unsqueeze(1).expand(-1, steps).to(torch.long)
    cols = torch.arange(steps, device=device).unsqueeze(0)
    add_mask = cols < rem.unsqueeze(1)
    return num_transfer_tokens + add_mask.to(torch.long)


@torch.no_grad()
def generate_klass(model, input_ids_original, gen_length, steps, block_length, temperature=0., mask_id=126336,
                   conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2, alg="klass", unmask_strategy="all"):
    """Transcription of the reference (its unused analysis lists and non-"all" strategies dropped)."""
    mask_id = 126336
    x = torch.full((1, input_ids_original.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :input_ids_original.shape[1]] = input_ids_original.clone()
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    used_steps = 0
    V = model.config.vocab_size
    kl_history = torch.zeros((1, x.shape[1], kl_history_length), dtype=torch.float64)
    p_prev = torch.zeros((1, x.shape[1], V), dtype=torch.float64)
    for num_block in range(num_blocks):
        block_start = input_ids_original.shape[1] + num_block * block_length
        block_end = input_ids_original.shape[1] + (num_block + 1) * block_length
        block_mask_index = (x[:, block_start:block_end] == mask_id)
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)
        for step in range(steps_per_block):
            mask_index = (x == mask_id)
            block_mask = torch.zeros_like(mask_index)
            block_mask[:, block_start:block_end] = True
            mask_index = mask_index & block_mask
            if not mask_index[:, block_start:block_end].any():
                break
            output, _ = model(x)
            logits = output.logits
            p_curr = F.softmax(logits.to(torch.float64), dim=-1)
            x0 = torch.argmax(p_curr, dim=-1)
            curr_conf = torch.squeeze(torch.gather(p_curr, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            eps = 1e-12
            kl_current_prev = (p_curr * (torch.log(p_curr + eps) - torch.log(p_prev + eps))).sum(dim=-1)
            kl_history = torch.roll(kl_history, shifts=-1, dims=-1)
            kl_history[..., -1] = kl_current_prev
            p_prev = p_curr.clone()
            if step >= kl_history_length - 1:
                stable_mask = torch.all(kl_history < kl_threshold, dim=-1)
            else:
                stable_mask = torch.zeros_like(curr_conf, dtype=torch.bool)
            conf_mask = curr_conf > conf_threshold
            ready_mask = stable_mask & conf_mask & mask_index
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(ready_mask.shape[0]):
                ready_indices = torch.where(ready_mask[j])[0]
                if len(ready_indices) > 0:
                    transfer_index[j, ready_indices] = True
                else:
                    curr_conf[:, input_ids_original.shape[1] + (num_block + 1) * block_length:] = -np.inf
                    confidence = torch.where(mask_index, curr_conf, -np.inf)
                    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
                    _, selected_indices = torch.topk(confidence[j], k=num_transfer_tokens[j, step].item())
                    transfer_index[j, selected_indices] = True
            x[transfer_index] = x0[transfer_index]
            used_steps += 1
    return x, used_steps


class ScriptedLM:
    """Logits of forward t: a fixed base plus noise whose size differs per position (some settle,
    some keep moving), independent of the input; records every input it is given."""

    def __init__(self, T: int, V: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(1, T, V, generator=g) * 3
        self.wobble = torch.tensor([0.0, 0.02, 0.05, 0.5, 2.0])[torch.randint(0, 5, (1, T, 1), generator=g)]
        self.g, self.seed, self.calls = g, seed, []
        self.config = SimpleNamespace(vocab_size=V)
        self.mask_token_id, self.logits_shift = REF_MASK, 0

    def logits(self, t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + t)
        return self.base + self.wobble * torch.randn(self.base.shape, generator=g)


class RefSide(ScriptedLM):
    def __call__(self, x):
        self.calls.append(x.clone())
        return SimpleNamespace(logits=self.logits(len(self.calls) - 1)), None


class OurSide(ScriptedLM):
    def __call__(self, x, attention_span=None, attention_layers=None):
        self.calls.append(x.clone())
        return DiffusionOutput(logits=self.logits(len(self.calls) - 1), attention=None)


@pytest.mark.parametrize("seed", range(12))
def test_klass_equals_reference(seed):
    rng = np.random.default_rng(seed)
    block = int(rng.integers(2, 9))
    blocks = int(rng.integers(1, 3))
    conf, kl = float(rng.choice([0.3, 0.6, 0.9])), float(rng.choice([0.015, 0.05, 0.2]))
    hist = int(rng.integers(1, 4))
    prompt = torch.randint(0, 7, (1, 3), generator=torch.Generator().manual_seed(seed))
    T, V = 3 + block * blocks, 7
    ref_lm, our_lm = RefSide(T, V, seed), OurSide(T, V, seed)
    want, used = generate_klass(ref_lm, prompt, block * blocks, block * blocks, block, conf_threshold=conf,
                                kl_threshold=kl, kl_history_length=hist)
    got = denoise(our_lm, prompt, gen_length=block * blocks, block_length=block, steps=block * blocks,
                  policy="klass", params={"conf_threshold": conf, "kl_threshold": kl, "kl_history": hist})
    assert len(our_lm.calls) == used
    for i, (a, b) in enumerate(zip(ref_lm.calls, our_lm.calls)):
        assert torch.equal(a, b), f"forward {i}: the canvases differ"
    assert torch.equal(got.sequences, want)


def test_klass_parity_cases_use_the_stability_rule():
    """Non-vacuous: in those cases some steps commit a ready set (more than the schedule's one)."""
    ready_steps = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        block = int(rng.integers(2, 9))
        blocks = int(rng.integers(1, 3))
        conf, kl = float(rng.choice([0.3, 0.6, 0.9])), float(rng.choice([0.015, 0.05, 0.2]))
        hist = int(rng.integers(1, 4))
        prompt = torch.randint(0, 7, (1, 3), generator=torch.Generator().manual_seed(seed))
        lm = OurSide(3 + block * blocks, 7, seed)
        res = denoise(lm, prompt, gen_length=block * blocks, block_length=block, steps=block * blocks,
                      policy="klass", params={"conf_threshold": conf, "kl_threshold": kl, "kl_history": hist},
                      trace=True)
        ready_steps += sum(int(c.sum()) > 1 for c in res.trace)
    assert ready_steps >= 5


def run_steps(helpers, B, L, seed, steps, memory_on: bool, wobble: float, scale: float):
    """Steps of ``klass`` over one block whose logits move by ``wobble`` per forward; commit counts."""
    pol = get_policy("klass")
    params = stack_params([pol.make_params()] * B)
    state = helpers.make_state(B, L, 5, seed=seed, masked_frac=1.0, steps=steps, logit_scale=scale)
    base = state.logits.clone()
    counts = []
    for i in range(steps):
        state.logits = base + wobble * helpers.make_state(B, L, 5, seed=seed + 1 + i).logits
        state.step = torch.full((B,), i, dtype=torch.long)
        res = pol.step(state, params)
        assert not (res.commit & ~state.masked).any()
        counts.append(res.commit.sum(-1).tolist())
        state.memory = {**res.memory, "present": torch.ones(B, dtype=torch.bool)} if memory_on else None
        state.tokens = torch.where(res.commit, res.tokens, state.tokens)
        state.masked = state.masked & ~res.commit
    assert not state.masked.any(), "the block must end within its budget"
    return counts


def test_memory_makes_settled_positions_go_together(helpers):
    """Confident, nearly constant logits over 8 positions and 8 steps: the schedule's one per step
    at forwards 0 and 1 (no history yet), then every remaining position at once; without memory
    every forward is a first one and KLASS stays at the schedule."""
    assert run_steps(helpers, 1, 8, 0, 8, True, 0.001, 40.0)[:3] == [[1], [1], [6]]
    assert run_steps(helpers, 1, 8, 0, 8, False, 0.001, 40.0) == [[1]] * 8


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), B=st.integers(1, 3), L=st.integers(1, 12), steps=st.integers(1, 12),
       wobble=st.sampled_from([0.0, 0.01, 1.0]))
def test_with_memory_the_budget_still_holds(helpers, seed, B, L, steps, wobble):
    run_steps(helpers, B, L, seed, steps, True, wobble, 4.0)


def test_memory_rows_absent_are_first_forwards(helpers):
    """A row whose ``present`` is False is treated as its request's first forward (no stability)."""
    pol = get_policy("klass")
    B, L = 2, 6
    state = helpers.make_state(B, L, 5, seed=3, masked_frac=1.0, steps=12, step=[2, 2], logit_scale=6.0)
    params = stack_params([pol.make_params({"conf_threshold": 0.0})] * B)
    first = pol.step(state, params)
    state.memory = {**first.memory, "stable_run": torch.full((B, L), 5), "present": torch.tensor([True, False])}
    res = pol.step(state, params)
    assert int(res.commit[0].sum()) == L  # same logits: KL 0, stable, every position ready
    assert int(res.commit[1].sum()) == 1  # no memory: the schedule's one


@pytest.mark.parametrize("field,value", [("conf_threshold", 1.5), ("kl_threshold", -1.0), ("kl_history", 0),
                                         ("kl_history", 1.5)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        get_policy("klass").make_params({field: value})
