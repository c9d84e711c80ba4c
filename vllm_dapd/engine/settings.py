"""Decoding settings: server defaults (``--plugin``, ``--additional-config``) and per-request overrides.

A request's settings come from four layers, later ones winning: the built-in defaults, the
checkpoint's ``generation_config.json`` (its ``"dapd"`` section), the server's
``additional_config["dapd"]`` (what ``--plugin NAME`` and ``--additional-config`` fill in), and the
request's ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP). The first three are folded once,
when the engine config is built (``engine.hooks``), into ``additional_config["dapd"]``, which every
process receives inside ``VllmConfig``; ``plan`` then turns one request into settings, policy params
and answer length (a ``Plan``). The scheduler (EngineCore process) makes each request's one ``Plan``
at ``add_request``, the first place the prompt length is known, and that ``Plan`` is the single
source of truth: the scheduler sizes the request's KV by it and sends it, with the request's first
scheduling (``SchedulerOutput.dapd_plans``), to the runner, which builds its canvas from it and
never calls ``plan``. Admission (API process, ``engine/validation.py``) also calls ``plan``, only
to refuse a bad value with an HTTP 400 naming it; it does not know the prompt length and throws its
result away. Direct users of the stepper (tests, benchmarks) call ``plan`` or ``resolve`` themselves.

Bounds (so nothing a client sends can overflow a tensor or buy an unbounded canvas): every integer
(``block_length``, ``steps``, every ``int`` field of a policy's ``Params``) lies in
[0, 2**31 - 1] (``INT_LIMIT``) besides its own lower bound; numbers are finite; booleans are
``true``/``false`` (or 0/1) and never stand for integers. The canvas is ``max_tokens`` rounded up to
whole blocks after ``block_length`` is clamped to ``max_tokens``: a 10-token answer never gets a
4096-position canvas.

Block-causal models (LLaDA2; ``models.transformer.AttentionStructure``): the block size is the
model's (``engine.hooks`` writes it to ``additional_config["dapd_attention"]`` once, read back with
``causal_block``); a request asking for another ``block_length``, or for ``cache_mode`` ``dual``
(which reads KV after the active block, never attended here), is refused naming the key; the canvas
runs to the end of the block holding the answer's last token, blocks counted from position 0 as in
the model's reference loop (``generation_length``'s ``offset`` = prompt length mod block size).

Keys of ``extra_args`` (flat: ``vllm_xargs`` carries no nested objects):

- ``policy``: a registered policy name (``vllm_dapd.decoding.registry``);
- ``block_length`` (alias ``diffusion_canvas_length``, vLLM's own dLLM key): canvas block size;
- ``steps`` (alias ``diffusion_max_steps``): denoising step budget per block (default: one token
  per step, i.e. ``block_length``);
- ``cache_mode``: ``none`` | ``prefix`` | ``dual``;
- ``cache_refresh`` (modes ``prefix``/``dual``): ``final`` (default: each position's KV is computed
  once, when its token is final) | ``block`` (Fast-dLLM's exact semantics: the cache is recomputed
  from the whole sequence at every block start; see ``engine/stepper.py``);
- ``trace``: 1 to return (``dapd.trace`` on each choice, ``engine/cost.py``) and log which positions each forward committed;
- ``stream_canvas``: 1 to stream one chunk per forward (``engine/canvas.py``; streamed requests only);
- ``score_*`` keys are scoring options for ``logprobs``/``prompt_logprobs`` (``engine/scoring.py``);
- every other key is a parameter of the chosen policy (its ``Params`` field); unknown keys are an
  error naming the key (vLLM's own keys such as ``kv_transfer_params`` are passed over).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from vllm_dapd.decoding.policy import INT_LIMIT, check_int

CACHE_MODES = ("none", "prefix", "dual")
CACHE_REFRESH = ("final", "block")
ADDITIONAL_CONFIG_KEY = "dapd"
ATTENTION_KEY = "dapd_attention"  # additional_config: {"kind": ..., "block_size": ...}, set by engine.hooks
_ALIASES = {"diffusion_canvas_length": "block_length", "diffusion_max_steps": "steps"}
_ENGINE_KEYS = ("policy", "block_length", "steps", "cache_mode", "cache_refresh", "trace")
# Keys vLLM itself keeps in extra_args (v1/request.py, chat_completion/protocol.py, generate serving).
_VLLM_KEYS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode", "session_id"})


def _check_int(name: str, value: Any, low: int) -> int:
    return check_int(name, value, low, INT_LIMIT, lenient=True)  # vllm_xargs may deliver "32" or 32.0


@dataclass(frozen=True)
class DecodeSettings:
    """One request's decoding settings, validated at construction (errors name the field)."""

    policy: str = "low_confidence"
    block_length: int = 32
    steps: int | None = None  # None: block_length (one commit per step)
    cache_mode: str = "none"
    cache_refresh: str = "final"  # "block": Fast-dLLM's refresh of the cache at every block start
    trace: bool = False
    policy_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy: must be a policy name, got {self.policy!r}")
        object.__setattr__(self, "block_length", _check_int("block_length", self.block_length, 1))
        if self.steps is not None:
            object.__setattr__(self, "steps", _check_int("steps", self.steps, 1))
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode: must be one of {', '.join(CACHE_MODES)}, got {self.cache_mode!r}")
        if self.cache_refresh not in CACHE_REFRESH:
            raise ValueError(f"cache_refresh: must be one of {', '.join(CACHE_REFRESH)}, got {self.cache_refresh!r}")
        if isinstance(self.trace, float) or self.trace not in (True, False, 0, 1):
            raise ValueError(f"trace: must be a boolean (or 0/1), got {self.trace!r}")
        object.__setattr__(self, "trace", bool(self.trace))

    @property
    def steps_per_block(self) -> int:
        return self.steps if self.steps is not None else self.block_length

    def as_overrides(self) -> dict[str, Any]:
        """The flat mapping ``with_overrides`` reads back into these settings."""
        flat = {"policy": self.policy, "block_length": self.block_length, "cache_mode": self.cache_mode,
                "cache_refresh": self.cache_refresh, "trace": self.trace, **self.policy_params}
        if self.steps is not None:
            flat["steps"] = self.steps
        return flat

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "DecodeSettings":
        """These settings updated by a flat mapping (``extra_args`` keys; see the module docstring)."""
        if not overrides:
            return self
        engine: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in _VLLM_KEYS or key.startswith("score_") or key == "stream_canvas":
                continue  # scoring options (engine/scoring.py), canvas streaming (engine/canvas.py)
            key = _ALIASES.get(key, key)
            (engine if key in _ENGINE_KEYS else params)[key] = value
        if "policy" in engine and engine["policy"] != self.policy:
            base_params: dict[str, Any] = {}  # another policy: the server's params do not carry over
        else:
            base_params = dict(self.policy_params)
        base_params.update(params)
        return dataclasses.replace(self, **engine, policy_params=base_params)


def _section(config: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    section = (config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}.{ADDITIONAL_CONFIG_KEY}: must be a mapping, got {section!r}")
    return section


def server_settings(additional_config: Mapping[str, Any] | None,
                    generation_config: Mapping[str, Any] | None = None) -> DecodeSettings:
    """The server's defaults: built-in < ``generation_config["dapd"]`` (the checkpoint's) <
    ``additional_config["dapd"]`` (flags). Engine processes call it with the folded
    ``additional_config`` alone (``engine.hooks`` wrote the checkpoint's layer into it)."""
    checkpoint = _section(generation_config, "generation_config")
    flags = _section(additional_config, "additional_config")
    return DecodeSettings().with_overrides(checkpoint).with_overrides(flags)


def resolve(server: DecodeSettings, extra_args: Mapping[str, Any] | None) -> tuple[DecodeSettings, Any]:
    """Validated settings and policy ``Params`` of one request; raises ValueError naming the key."""
    from vllm_dapd.decoding.registry import get_policy

    settings = server.with_overrides(extra_args)
    policy = get_policy(settings.policy)
    return settings, policy.make_params(settings.policy_params)


def causal_block(additional_config: Mapping[str, Any] | None) -> int | None:
    """The served model's block size if it is block-causal (``engine.hooks`` wrote it), else None."""
    structure = (additional_config or {}).get(ATTENTION_KEY) or {}
    return int(structure["block_size"]) if structure.get("kind") == "block_causal" else None


def generation_length(max_tokens: int, block_length: int, room: int, offset: int | None = None) -> int:
    """Canvas size: ``max_tokens`` rounded up to whole blocks of ``min(block_length, max_tokens)``,
    never past ``room`` (model length - prompt). With ``offset`` (block-causal: the prompt's
    positions in the first block) the blocks are ``block_length`` wide and the canvas ends at the end
    of the block holding position ``offset + max_tokens - 1``."""
    if offset is not None:
        return max(1, min(-(-(max_tokens + offset) // block_length) * block_length - offset, room))
    block = max(1, min(block_length, max_tokens))
    return max(1, min(-(-max_tokens // block) * block, room))


@dataclass(frozen=True)
class Plan:
    """One request, resolved: settings (``block_length`` clamped to the canvas), params, canvas size."""

    settings: DecodeSettings
    params: Any
    gen_length: int


def plan(server: DecodeSettings, extra_args: Mapping[str, Any] | None, max_tokens: int | None,
         room: int, causal: int | None = None, prompt_length: int = 0) -> Plan:
    """The single function that decides a request's settings and canvas; ``room`` = model length -
    prompt. Served requests: called once, by the scheduler (whose ``Plan`` the runner receives);
    admission calls it only to validate. ``causal``: the block size of a block-causal model."""
    settings, params = resolve(server, extra_args)
    if max_tokens is None:  # vLLM always fills it; only a direct caller may leave it out
        max_tokens = room
    if causal is not None:
        if settings.block_length != causal:
            raise ValueError(f"block_length: the served model is block-causal with block size {causal}; "
                             f"block_length must be {causal} (or left out), got {settings.block_length}")
        if settings.cache_mode == "dual":
            raise ValueError("cache_mode: 'dual' reads KV after the active block, which a block-causal model "
                             "never attends; use 'prefix' (exact here) or 'none'")
        gen_length = generation_length(max_tokens, causal, room, prompt_length % causal)
        return Plan(settings, params, gen_length)
    gen_length = generation_length(max_tokens, settings.block_length, room)
    if settings.block_length > gen_length:
        settings = dataclasses.replace(settings, block_length=gen_length)
    return Plan(settings, params, gen_length)
