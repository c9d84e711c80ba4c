"""The authors' DAPD loop, transcribed for the parity tests (not a test module itself).

Written from reading quasar529/DAPD as vendored in wyffffff/cora-diff-llada (commit a08ed01),
``llada/vendor_methods/dapd/generation.py`` (``generate_dapd_with_blocks``, ``generate_dapd``,
``_compute_tau``, ``_compute_dapd_direct_selection``, ``_apply_dapd_staged_selection``) and
``llada/vendor_methods/dapd/core.py`` (``AttentionCaptureHook.compute_attention_weights``,
``build_dependency_graph``, ``compute_dependency_scores``, ``select_independent_set``). Greedy
only, as theirs; statistics dropped. Kept line for line where the test allows, so a reader can diff:

* attention: post-RoPE q, k captured from every layer's attention call (theirs wraps LLaDA's
  ``_scaled_dot_product_attention``; ours wraps the shared model's ``attend``), the last
  ``max(1, n - int(n * (1 - layer_ratio)))`` layers kept, KV heads repeated for GQA,
  ``softmax(q k^T / sqrt(d))`` in fp32 over all keys, mean over heads, mean over layers;
* ``generate_dapd`` (one block) is the same loop as the block loop with one block over the
  answer (its mask index is the block's), so one function serves both;
* Dream (not in the authors' code): its logits are shifted as Dream's ``diffusion_generate`` does
  (row j - 1 scores position j); everything else is the same.

The loop is the authors': batch-wide tau, batch-wide "nothing selected" top-1 fallback and
batch-wide block exit. Their scripts run batch 1; the tests run each request alone and compare
per request (what ``dapd`` does for a batch: every request as if alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import vllm_dapd.models.transformer as transformer


class CaptureQK:
    """Capture (q, k) at every layer's attention call, as the authors' hook does."""

    def __init__(self):
        self.captured_qk: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._original = None

    def __enter__(self):
        self._original = transformer.attend

        def wrapper(q, k, v, key_mask):
            self.captured_qk.append((q.detach().clone(), k.detach().clone()))
            return self._original(q, k, v, key_mask)

        transformer.attend = wrapper
        return self

    def __exit__(self, *exc):
        transformer.attend = self._original

    def clear(self):
        self.captured_qk = []

    def compute_attention_weights(self, capture_layers: list[int]) -> torch.Tensor:
        running_attn = None
        used_layers = 0
        for idx, (q, k) in enumerate(self.captured_qk):
            if idx not in capture_layers:
                continue
            n_heads, n_kv_heads = q.shape[1], k.shape[1]
            if n_heads != n_kv_heads:
                k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
            d_k = q.size(-1)
            scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) / math.sqrt(d_k)
            attn_weights = F.softmax(scores, dim=-1)
            attn_avg = attn_weights.mean(dim=1)
            running_attn = attn_avg if running_attn is None else running_attn + attn_avg
            used_layers += 1
        return running_attn / used_layers


def build_dependency_graph(attention, mask_index):
    dependency = (attention + attention.transpose(-1, -2)) / 2
    _, T, _ = dependency.shape
    diag_mask = torch.eye(T, dtype=torch.bool, device=dependency.device)
    dependency = dependency.masked_fill(diag_mask.unsqueeze(0), 0.0)
    mask_2d = mask_index.unsqueeze(-1) & mask_index.unsqueeze(-2)
    dependency = dependency * mask_2d.float()
    raw_dependency = dependency.clone()
    masked_dependency = dependency.masked_fill(~mask_2d, float("-inf"))
    normalizer = masked_dependency.max(dim=-1, keepdim=True)[0]
    normalizer = torch.where(normalizer == float("-inf"), torch.ones_like(normalizer), normalizer)
    normalizer = normalizer.clamp(min=1e-8)
    normalized_dependency = dependency / normalizer
    normalized_dependency = normalized_dependency * mask_2d.float()
    return raw_dependency, normalized_dependency


def compute_dependency_scores(dependency, mask_index):
    return dependency.sum(dim=-1) * mask_index.float()


def select_independent_set(confidence, dependency_score, dependency, mask_index, tau):
    B, T = confidence.shape
    dependency_norm = dependency_score / (dependency_score.max(dim=-1, keepdim=True)[0] + 1e-8)
    conf_norm = confidence / (confidence.max(dim=-1, keepdim=True)[0] + 1e-8)
    combined_score = dependency_norm * conf_norm
    combined_score = combined_score * mask_index.float()
    selected = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        dep_b = dependency[b]
        mask_positions = mask_index[b].nonzero(as_tuple=True)[0]
        if len(mask_positions) == 0:
            continue
        scores_at_mask = combined_score[b, mask_positions]
        sorted_indices = torch.argsort(scores_at_mask, descending=True)
        sorted_positions = mask_positions[sorted_indices].tolist()
        selected_positions = []
        for pos_item in sorted_positions:
            can_select = True
            for sel_pos in selected_positions:
                if dep_b[pos_item, sel_pos] > tau:
                    can_select = False
                    break
            if can_select:
                selected_positions.append(pos_item)
                selected[b, pos_item] = True
    return selected


def compute_tau(remaining_masks, gen_length, tau_min, tau_max):
    remaining_ratio = remaining_masks / gen_length
    progress = 1.0 - remaining_ratio
    return float(tau_min + (tau_max - tau_min) * progress)


def resolve_capture_layers(num_layers, layer_ratio):
    count = max(1, num_layers - int(num_layers * (1 - float(layer_ratio))))
    return list(range(num_layers - count, num_layers))


def select_step(confidence, attention, block_mask_index, remaining_masks, gen_length, alg, current_tau):
    """One step's selection: the body of the authors' block loop after the forward."""
    raw_dependency, dependency = build_dependency_graph(attention, block_mask_index)
    dependency_scores = compute_dependency_scores(raw_dependency, block_mask_index)
    greedy_mask_index = block_mask_index
    direct_selected = torch.zeros_like(block_mask_index)
    if alg == "dapd_direct":
        direct_selected = (confidence >= 1.0) & block_mask_index
        greedy_mask_index = block_mask_index & ~direct_selected
    selected = select_independent_set(confidence, dependency_scores, dependency, greedy_mask_index, current_tau)
    selected = selected | direct_selected
    if alg == "dapd_staged":
        progress = 1.0 - (remaining_masks / gen_length)
        if progress >= 0.5:
            selected = selected | ((confidence >= 0.9) & block_mask_index)
    num_selected = int(selected.sum().item())
    if num_selected < 1:
        mask_positions = block_mask_index.nonzero(as_tuple=True)
        mask_confidences = confidence[mask_positions]
        top_k = min(1, len(mask_confidences))
        _, top_indices = mask_confidences.topk(top_k)
        for idx in top_indices:
            b, t = mask_positions[0][idx].item(), mask_positions[1][idx].item()
            selected[b, t] = True
    return selected


@torch.no_grad()
def generate_dapd_with_blocks(model, prompt, gen_length, block_length, alg="dapd_staged", tau_min=0.01,
                              tau_max=0.15, layer_ratio=0.3):
    """Returns (x [B, P + gen_length], forwards per block)."""
    mask_id = int(model.mask_token_id)
    shift = int(getattr(model, "logits_shift", 0))
    capture_layers = resolve_capture_layers(len(model.layers), layer_ratio)
    batch_size, prompt_len = prompt.shape
    num_blocks = gen_length // block_length
    x = torch.cat([prompt, torch.full((batch_size, gen_length), mask_id, dtype=torch.long)], dim=1)
    forwards = []
    step = 0
    with CaptureQK() as hook:
        for block_idx in range(num_blocks):
            block_start = prompt_len + block_idx * block_length
            block_end = block_start + block_length
            block_step_start = step
            while True:
                full_mask_index = x == mask_id
                block_mask_index = full_mask_index.clone()
                block_mask_index[:, :block_start] = False
                block_mask_index[:, block_end:] = False
                remaining_in_block = int(block_mask_index.sum().item())
                if remaining_in_block == 0:
                    break
                remaining_masks = int(full_mask_index[:, prompt_len:].sum().item())
                current_tau = compute_tau(remaining_masks, gen_length, tau_min, tau_max)
                hook.clear()
                logits = model(x).logits
                if shift:  # Dream: row j - 1 scores position j
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                attention = hook.compute_attention_weights(capture_layers)
                probs = F.softmax(logits, dim=-1)
                confidence, predictions = probs.max(dim=-1)
                selected = select_step(confidence, attention, block_mask_index, remaining_masks, gen_length, alg,
                                       current_tau)
                x = torch.where(selected, predictions, x)
                step += 1
                if (step - block_step_start) > block_length:
                    break
            forwards.append(step - block_step_start)
    return x, forwards


def sharpen_checkpoint(path: str, factor: float) -> str:
    """Scale the output head of a tiny random checkpoint in place, so confidences span (0, 1]
    (a random head gives ~1/V everywhere, and then no DAPD rule that reads confidence is exercised)."""
    import glob

    from safetensors.torch import load_file, save_file

    for shard in glob.glob(f"{path}/*.safetensors"):
        tensors = load_file(shard)
        heads = [k for k in tensors if k.endswith(("ff_out.weight", "lm_head.weight"))]
        for k in heads:
            tensors[k] = tensors[k] * factor
        if heads:
            save_file(tensors, shard, metadata={"format": "pt"})
    return path


def authors_answer(model, prompt: list[int], gen: int, block: int, variant: str = "staged",
                   tau_max: float = 0.15) -> tuple[list[int], int]:
    """One request alone through the authors' loop: (answer tokens, forwards)."""
    x, forwards = generate_dapd_with_blocks(model, torch.tensor([prompt]), gen, block, alg=f"dapd_{variant}",
                                            tau_max=tau_max)
    return x[0, len(prompt):].tolist(), sum(forwards)


# Requests for the engine tests (tests/engine/test_llm.py, test_llm_dream.py): prompt, max_tokens,
# extra_args. Mixed prompt lengths (the engine pads them into one batch), one block and several,
# both variants, tau_max 0.15 and 0.05, a budget above block_length.
ENGINE_CASES = [
    ([5, 6, 7, 8, 9], 16, {"policy": "dapd", "variant": "staged", "block_length": 16}),
    ([11, 12, 13], 16, {"policy": "dapd", "variant": "direct", "tau_max": 0.05, "block_length": 4}),
    ([20, 21, 22, 23, 24, 25, 26], 16, {"policy": "dapd", "variant": "staged", "tau_max": 0.05, "block_length": 8}),
    ([30, 31, 32, 33], 16, {"policy": "dapd", "variant": "direct", "block_length": 16}),
    ([40, 41, 42, 43, 44, 45], 12, {"policy": "dapd", "variant": "staged", "block_length": 4, "steps": 9}),
]


def check_engine_cases(llm, model) -> None:
    """Run ENGINE_CASES in one batch through ``vllm.LLM``; each equals the authors' loop alone."""
    from vllm import SamplingParams

    from vllm_dapd import cost

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=x) for _, n, x in ENGINE_CASES]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in ENGINE_CASES], params, use_tqdm=False)
    for (prompt, n, extra), out in zip(ENGINE_CASES, outs):
        want, nfe = authors_answer(model, prompt, n, extra["block_length"], extra.get("variant", "staged"),
                                   extra.get("tau_max", 0.15))
        assert list(out.outputs[0].token_ids) == want, extra
        assert cost(out.outputs[0]).nfe == nfe, extra
