"""Per-request denoising state the runner keeps between engine steps (plain data, no vLLM import).

A request's generation region is ``gen_length`` positions (``max_tokens`` rounded up to whole blocks,
capped by the model length), all ``[MASK]`` at the start, as in LLaDA's ``generate``: every forward
sees the prompt, the committed blocks and every still-masked later position. Blocks are denoised in
order; the *active* block is the only one whose positions a policy may commit.

Infilling: ``suffix`` (the tokens after the hole of a request's prompt, ``engine/vllm/infill.py``) sits
after the canvas, ``prompt + canvas + suffix``: fixed context, fed (or, in cache mode ``dual``, read
from the pages) at every step and never committable. ``end`` is the length of that whole sequence.

Block-causal models (LLaDA2, ``models.transformer.AttentionStructure``) count blocks from absolute
position 0, as their reference loop does: ``block_offset = len(prompt) % block_length`` prompt
tokens share the first block with the first ``block_length - block_offset`` canvas positions, so
the first block is short in canvas coordinates (``block_span``); ``causal`` says the model attends
block-causally (each step then feeds only the active block over the cached prefix, ``stepper``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_dapd.decoding.registry import get_policy

from .settings import DecodeSettings, generation_length  # noqa: F401  (re-exported)


@dataclass
class Sequence:
    req_id: str
    prompt: list[int]
    gen_length: int
    settings: DecodeSettings
    params: Any  # the policy's validated Params
    mask_id: int
    temperature: float
    seed: int
    canvas: torch.Tensor = field(init=False)  # [gen_length] long, mask_id where still masked
    policy: Any = field(init=False)  # the policy object of ``settings.policy``, resolved once
    block: int = 0  # index of the active block
    step: int = 0  # steps spent on the active block
    nfe: int = 0  # forwards spent on this request
    trace: list[tuple[int, list[int]]] = field(default_factory=list)  # (nfe, committed canvas positions)
    stream_canvas: bool = False  # also record ``trace`` (for the runner's per-forward canvas, engine/vllm/canvas.py)
    # Cache modes "prefix"/"dual": the request's KV pages (vLLM block ids) and how many leading positions
    # (prompt, then committed blocks) hold final KV there.
    block_ids: list[int] = field(default_factory=list)
    cached_len: int = 0
    suffix_block: int = -1  # cache mode "dual": the block whose following canvas has KV in the pages
    # The policy's StepResult.memory rows for this request ({name: [gen_length, ...]}), handed back
    # at its next step (KLASS); None before its first step and after preemption.
    memory: dict[str, torch.Tensor] | None = None
    # Logprobs (``engine/core/scoring.py``): top-k asked for generated / prompt tokens (None: not asked),
    # the scoring options, and the commit-time logprobs of canvas positions not yet emitted.
    num_logprobs: int | None = None
    num_prompt_logprobs: int | None = None
    score: Any = None
    token_logprobs: dict[int, Any] = field(default_factory=dict)
    suffix: list[int] = field(default_factory=list)  # infilling: fixed tokens after the canvas
    num_prompt_tokens: int = -1  # vLLM's prompt length (hole and suffix included); -1: len(prompt)
    # Choices (``score.choices``): the token that follows the chosen one (EOS), the answer cap, the estimates.
    stop_id: int = -1
    max_tokens: int = 0
    score_values: list[float] | None = None
    causal: bool = False  # block-causal attention (see the module docstring)
    fed_rows: int = 0  # positions the last forward fed (the runner sums them: ``rows_fed``)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.prompt)
        self.canvas = torch.full((self.gen_length,), self.mask_id, dtype=torch.long)
        self.policy = get_policy(self.settings.policy)

    def tokens(self) -> torch.Tensor:
        """[end] long: prompt + canvas + suffix."""
        return torch.cat((torch.tensor(self.prompt, dtype=torch.long), self.canvas,
                          torch.tensor(self.suffix, dtype=torch.long)))

    @property
    def end(self) -> int:
        """Length of prompt + canvas + suffix (absolute positions ``[0, end)``)."""
        return len(self.prompt) + self.gen_length + len(self.suffix)

    @property
    def block_length(self) -> int:
        return self.settings.block_length

    @property
    def step_limit(self) -> int:
        """The most forwards a block may take (``Policy.step_limit``: the step budget, or more)."""
        return self.policy.step_limit(self.params, self.settings.steps_per_block, self.block_length)

    @property
    def block_offset(self) -> int:
        """Prompt tokens in the first block of a block-causal model (blocks count from position 0)."""
        return len(self.prompt) % self.block_length if self.causal else 0

    @property
    def num_blocks(self) -> int:
        return -(-(self.gen_length + self.block_offset) // self.block_length)

    @property
    def finished(self) -> bool:
        return self.block >= self.num_blocks

    def block_span(self, block: int | None = None) -> tuple[int, int]:
        """[start, end) of the active block (or of ``block``) in canvas coordinates (the last block,
        and with a ``block_offset`` the first, may be short)."""
        block = self.block if block is None else block
        start = block * self.block_length - self.block_offset
        return max(start, 0), min(start + self.block_length, self.gen_length)

    def grid_start(self) -> int:
        """Absolute position where the active block starts (block-causal: in the prompt for block 0)."""
        return len(self.prompt) + self.block * self.block_length - self.block_offset
