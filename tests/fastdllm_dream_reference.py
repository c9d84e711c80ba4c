"""Fast-dLLM's Dream threshold loop, transcribed from reading NVlabs/Fast-dLLM
``dream/model/generation_utils.py`` ``DreamGenerationMixin._sample`` (alg ``confidence_threshold``),
for the parity tests of ``threshold`` with ``dream_quota`` (and ``overrun``).

Kept as close to the source as a test allows (batch 1, temperature 0, top_p/top_k off, identity
hooks, no attention mask), so a reader can diff it. The one factoring: the model call and Dream's
shift (``self(x, ...).logits`` then ``cat([logits[:, :1], logits[:, :-1]])``) are the callable
``logits_fn(x)``; ``dream_logits(model)`` builds it for a model of ``vllm_dapd.models``, a test may
pass a table. Its quirk, transcribed as is: when the budget's last step leaves masks below the
threshold, ``steps += 1`` (once: the step is then no longer the last, so the other rejected masks
carry) and the loop goes on with a quota of every remaining mask, until a last step commits them all.
"""

from __future__ import annotations

from typing import Callable

import torch


def ref_sample_tokens(logits, temperature=0.0):
    """Dream's ``sample_tokens`` at top_p = top_k = None, margin/entropy off."""
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    return confidence, x0


def dream_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """``logits_fn`` for a model of ``vllm_dapd.models``: its forward, then Dream's shift."""
    def logits_fn(x):
        logits = model(x).logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits_fn


def ref_dream_threshold(x, logits_fn, mask_token_id, steps, threshold):
    """The loop on ``x`` [1, T] (prompt then masks; updated in place). Returns the per-forward
    transfer masks [1, T] bool: their count is the loop's forwards."""
    transfers = []
    i = 0
    mask_index = (x == mask_token_id)
    assert mask_index.sum() % steps == 0, "mask_index.sum() must be divisible by steps"
    assert x.shape[0] == 1, "batch size must be 1"
    number_transfer_tokens = mask_index.sum().item() // steps
    left_tokens_last_step = 0
    while i < steps:
        mask_index = (x == mask_token_id)
        logits = logits_fn(x)
        mask_logits = logits[mask_index]
        confidence, x0 = ref_sample_tokens(mask_logits, temperature=0.0)
        x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
        x_[mask_index] = x0.clone()
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        current_transfer_tokens = number_transfer_tokens + left_tokens_last_step
        left_tokens_last_step = 0
        selected_confidence, select_index = torch.topk(full_confidence, current_transfer_tokens)
        transfer_index = torch.zeros_like(x, dtype=torch.bool)
        transfer_index[0, select_index[0]] = True
        for k in range(1, current_transfer_tokens):
            if selected_confidence[0, k] < threshold:
                if i < steps - 1:
                    left_tokens_last_step += 1
                    transfer_index[0, select_index[0, k]] = False
                else:
                    number_transfer_tokens = 0
                    steps += 1
                    left_tokens_last_step += 1
                    transfer_index[0, select_index[0, k]] = False
        x[transfer_index] = x_[transfer_index].clone()
        transfers.append(transfer_index.clone())
        i += 1
    return transfers


def reference_answer(model, prompt: list[int], gen_length: int, steps: int, threshold: float
                     ) -> tuple[list[int], list[torch.Tensor]]:
    """One request through the transcription (one block of ``gen_length``): answer and transfers."""
    mask_id = int(model.mask_token_id)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    with torch.no_grad():
        transfers = ref_dream_threshold(x, dream_logits(model), mask_id, steps, threshold)
    return x[0, len(prompt):].tolist(), transfers


# Requests for the engine test (tests/engine/test_llm_dream.py): prompt, max_tokens (one block),
# steps, threshold. On the sharpened tiny Dream (``tests/engine/test_llm_dream.py``) the loop overruns
# ``steps`` in the first three.
OVERRUN_CASES = [
    ([5, 6, 7, 8, 9], 8, 4, 0.9),
    ([11, 12, 13], 8, 4, 0.95),
    ([20, 21, 22, 23, 24, 25, 26], 8, 2, 0.7),
    ([11, 12, 13], 6, 3, 0.5),  # stays in budget
]


def overrun_args(gen_length: int, steps: int, threshold: float) -> dict:
    """The request settings that reproduce the loop: ``threshold`` with ``dream_quota`` and ``overrun``."""
    return {"policy": "threshold", "dream_quota": True, "overrun": True, "threshold": threshold,
            "steps": steps, "block_length": gen_length}


def check_overrun_cases(llm, model) -> int:
    """Run OVERRUN_CASES in one batch through ``vllm.LLM``; each equals the transcription alone,
    token for token and forward for forward. Returns how many cases overran ``steps``."""
    from vllm import SamplingParams

    from vllm_dapd import cost

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=overrun_args(n, s, t))
              for _, n, s, t in OVERRUN_CASES]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in OVERRUN_CASES], params, use_tqdm=False)
    overran = 0
    for (prompt, n, steps, thr), out in zip(OVERRUN_CASES, outs):
        want, transfers = reference_answer(model, prompt, n, steps, thr)
        assert list(out.outputs[0].token_ids) == want, (prompt, steps, thr)
        assert cost(out.outputs[0]).nfe == len(transfers), (prompt, steps, thr)
        overran += int(len(transfers) > steps)
    return overran
