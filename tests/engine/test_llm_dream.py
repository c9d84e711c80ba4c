"""Dream (shifted logits, Qwen2 layout) end to end through ``vllm.LLM``: one engine for the module.

Cache mode ``none`` equals the reference loop token for token; ``prefix``/``dual`` equal the
stepper run alone with its own pages; all in one batch with mixed policies and prompt lengths.
Infilling (a prompt with a hole, the mask token, then a suffix) is in the batch too: Dream scores
canvas position j with row j - 1, so the last canvas position is scored by a canvas row and the
suffix's first token by the last canvas row; the engine must equal ``denoise(suffix_ids=...)``.
"""

from __future__ import annotations

import os

import pytest
import torch

from dapd_paper_reference import check_engine_cases, sharpen_checkpoint
from fastdllm_dream_reference import check_overrun_cases
from vllm_dapd import cost
from vllm_dapd.decoding import denoise
from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.settings import DecodeSettings, resolve
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream

pytestmark = pytest.mark.slow


def test_dream_mixed_batch(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    # head sharpened: confidences reach 0.9 and 1.0, so confidence rules (DAPD's) are exercised
    path = sharpen_checkpoint(make_tiny_dream(str(tmp_path_factory.mktemp("engine_dream") / "dream")), 20)
    model = load_model(path)
    hole = model.mask_token_id
    cases = [  # prompt, extra_args, temperature, seed
        ([5, 6, 7, 8, 9], {"steps": 4}, 0.0, 1),
        ([11, 12, 13], {"steps": 4, "policy": "dapd"}, 0.7, 2),
        ([20, 21, 22, 23, 24, 25, 26], {"steps": 2, "block_length": 4, "policy": "entropy"}, 0.0, 3),
        ([30, 31, 32, 33], {"steps": 4, "cache_mode": "prefix"}, 0.0, 4),
        ([40, 41, 42, 43, 44, 45], {"steps": 4, "cache_mode": "dual", "policy": "dapd"}, 0.5, 5),
        ([50, 51, 52, hole, 60, 61, 62], {"steps": 4}, 0.0, 6),  # infilling
        ([53, 54, hole, 63, 64], {"steps": 4, "policy": "dapd", "block_length": 16}, 0.6, 7),
        ([55, 56, 57, 58, hole, 65, 66, 67, 68], {"steps": 4, "cache_mode": "dual"}, 0.0, 8),
        # DAWN's absolute sink rule (every query's column means) next to the relative one, one with a suffix
        ([60, 61, 62, 63, 64], {"steps": 8, "policy": "dawn", "tau_sink": 0.05}, 0.0, 9),
        ([70, 71, 72], {"steps": 8, "policy": "dawn"}, 0.0, 10),
        ([73, 74, hole, 75, 76], {"steps": 8, "policy": "dawn", "tau_sink": 0.05}, 0.0, 11),
    ]
    llm = LLM(model=path, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=8, dtype="float32",
              additional_config={"dapd": {"block_length": 8}})
    try:
        params = [SamplingParams(max_tokens=16, temperature=t, seed=s, ignore_eos=True, extra_args=x)
                  for _, x, t, s in cases]
        outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], params, use_tqdm=False)
        # dapd staged/direct equal the authors' loop (tests/dapd_paper_reference.py) run alone
        check_engine_cases(llm, load_model(path))
        # threshold's overrun equals Fast-dLLM's Dream loop (tests/fastdllm_dream_reference.py), past steps too
        assert check_overrun_cases(llm, load_model(path)) >= 3
    finally:
        llm.llm_engine.engine_core.shutdown()
    server = DecodeSettings(block_length=8)
    for (template, extra, temp, seed), out in zip(cases, outs):
        got = list(out.outputs[0].token_ids)
        settings, params = resolve(server, extra)
        prompt, suffix = (template[:template.index(hole)], template[template.index(hole) + 1:]) \
            if hole in template else (template, [])
        if settings.cache_mode == "none":
            ref = denoise(model, torch.tensor([prompt]), gen_length=16, block_length=settings.block_length,
                          steps=settings.steps_per_block * (16 // settings.block_length), policy=settings.policy,
                          params=params, temperature=temp, seed=seed, suffix_ids=torch.tensor([suffix], dtype=torch.long))
            expected, nfe = ref.tokens[0].tolist(), int(ref.nfe[0])
        else:
            (result,) = offline.run(model, [offline.Request(prompt, extra, 16, temp, seed, suffix)], server=server)
            expected, nfe = result.tokens, result.nfe
        assert got == expected, f"prompt {prompt} {extra}"
        assert cost(out.outputs[0]).nfe == nfe
