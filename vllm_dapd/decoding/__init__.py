"""Pure-PyTorch decoding layer: the policy contract, the registry, and the shared math of policies.

No vLLM import here or in ``plugins/``: everything is tensors in, tensors out (README "Design").
"""

from .confidence import entropy, max_probability, negative_entropy, probabilities, token_probability, top2_margin
from .block_diffusion import BlockDiffusionResult, block_diffusion_generate
from .generate import DenoiseResult, denoise
from .model_api import DiffusionLM, DiffusionOutput
from .policy import (
    DenoiseState,
    Policy,
    StepResult,
    check_finite,
    check_int,
    check_logits,
    check_range,
    stack_params,
)
from .registry import ENTRY_POINT_GROUP, available_policies, get_policy, register_policy
from .sampling import gumbel_noise, sample_tokens, uniform_noise
from .schedule import (
    dream_timesteps,
    dream_transfer_count,
    llada_transfer_count,
    llada_transfer_counts,
    min_commits,
)
from .select import commit_top, propose_tokens, rank_order, top_k_mask
from .graph import dependency_graph
from .independent_set import greedy_independent_set

__all__ = [
    "DenoiseState", "Policy", "StepResult", "stack_params",
    "check_finite", "check_int", "check_logits", "check_range",
    "ENTRY_POINT_GROUP", "available_policies", "get_policy", "register_policy",
    "DiffusionLM", "DiffusionOutput", "DenoiseResult", "denoise", "BlockDiffusionResult", "block_diffusion_generate",
    "entropy", "max_probability", "negative_entropy", "probabilities", "token_probability", "top2_margin",
    "gumbel_noise", "sample_tokens", "uniform_noise",
    "dream_timesteps", "dream_transfer_count", "llada_transfer_count", "llada_transfer_counts", "min_commits",
    "commit_top", "propose_tokens", "rank_order", "top_k_mask",
    "dependency_graph", "greedy_independent_set",
]
