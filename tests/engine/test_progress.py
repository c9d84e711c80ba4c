"""The runner owns progress: ``DiffusionScheduler`` records the runner's per-request report
(``DiffusionRunnerOutput.dapd_progress``) and nothing else, neither vLLM's own per-draft count nor
anything inferred from what it scheduled. A real scheduler (tiny LLaDA config), no engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # builds a VllmConfig (~20 s on a busy CPU)

BLOCK = 16  # KV page size


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_dapd.engine.vllm.scheduler import DiffusionScheduler
    from vllm_dapd.models.tiny import make_tiny_llada

    path = make_tiny_llada(str(tmp_path_factory.mktemp("progress") / "llada"))
    config = EngineArgs(model=path, max_model_len=64, dtype="float32", block_size=BLOCK,
                        additional_config={"dapd": {"block_length": 8}}).create_engine_config()
    config.cache_config.num_gpu_blocks = 20
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=20, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layers.0"], spec)])
    return lambda: DiffusionScheduler(vllm_config=config, kv_cache_config=kv, block_size=BLOCK, log_stats=True,
                                      structured_output_manager=StructuredOutputManager(config))


def test_the_scheduler_records_the_runners_report_only(scheduler):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from vllm_dapd.engine.vllm.runner import DiffusionRunnerOutput, Progress

    s = scheduler()
    s.add_request(Request("a", list(range(3, 13)), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                          None))
    record = s.requests["a"].spec_decode_metrics
    # (tokens returned, the runner's report): the prompt step (vLLM schedules no drafts), a step the
    # runner reports nothing for (drafts scheduled), a block, a forward of a 2-forward step, the last block.
    steps = [([], Progress(1, 0, 16)), ([], None), ([5] * 8, Progress(1, 8, 16)), ([], Progress(2, 0, 8)),
             ([6] * 8, Progress(1, 8, 8))]
    seen = []
    for sampled, progress in steps:
        so = s.schedule()
        out = DiffusionRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[sampled],
                                    logprobs=None, prompt_logprobs_dict={},
                                    dapd_progress={} if progress is None else {"a": progress})
        stats = next(iter(s.update_from_output(so, out).values())).scheduler_stats.spec_decoding_stats
        seen.append(None if stats is None else (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens))
    assert seen == [(1, 16, 0), None, (1, 16, 8), (2, 8, 0), (1, 8, 8)]
    assert "a" not in s.requests  # finished: 16 tokens
    # One observation per reported forward (5; vLLM saw 4 steps with drafts), the canvas once per step.
    assert record.histogram[0] == 3 and record.histogram[8] == 2 and sum(record.histogram) == 5
    assert record.num_draft_tokens == 16 + 16 + 8 + 8
