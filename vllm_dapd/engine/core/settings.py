"""A request's resolved plan: server defaults (``--plugin``, ``--additional-config``) + per-request overrides.

A request's settings come from four layers, later ones winning: the built-in defaults, the
checkpoint's ``generation_config.json`` (its ``"dapd"`` section), the server's
``additional_config["dapd"]`` (what ``--plugin NAME`` and ``--additional-config`` fill in), and the
request's ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP). The first three make the
server's ``Defaults`` (``server_defaults``, the one place they are built), folded once, when the
engine config is built (``engine.hooks``), back into ``additional_config["dapd"]``, which every
process receives inside ``VllmConfig``.

``plan`` is the one function that resolves a request: it layers the request's ``extra_args`` over
the defaults and returns a ``Plan`` (decoding settings, the policy and its validated params, the
answer's canvas length, scoring options, canvas streaming). Served requests call it once, at
admission (``engine/vllm/validation.py``, API-server or ``LLM`` process, which knows the prompt length),
and carry the plan to the EngineCore as a plain dict under ``extra_args[PLAN_KEY]``
(``Plan.to_dict``; vLLM serialises ``SamplingParams`` with msgpack, which keeps dicts, lists,
strings, ints, floats and bools). The scheduler reads it back (``Plan.from_dict``: types checked,
nothing re-resolved), sizes the request's KV by it and hands it to the runner in a declared
``SchedulerOutput`` subclass (``scheduler.DiffusionSchedulerOutput.dapd_plans``). Only a request
that reached the scheduler without an admission plan (an ``EngineCoreRequest`` handed to the
engine directly) is resolved there, once. Direct users of the stepper (tests, benchmarks) call
``plan`` or ``resolve`` themselves.

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
  from the whole sequence at every block start; see ``engine/core/stepper.py``);
- ``trace``: 1 to return (``dapd.trace`` on each choice, ``engine/vllm/cost.py``) and log which positions each forward committed;
- ``stream_canvas``: 1 to stream one chunk per forward (``engine/vllm/canvas.py``; streamed requests
  only, so never a server default);
- ``score_*`` keys are scoring options for ``logprobs``/``prompt_logprobs`` (``ScoreOptions``,
  ``engine/core/scoring.py``);
- every other key is a parameter of the chosen policy (its ``Params`` field); unknown keys are an
  error naming the key (vLLM's own keys such as ``kv_transfer_params`` are passed over; ``PLAN_KEY``
  is reserved for the admitted plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from vllm_dapd.decoding.likelihood import ESTIMATORS, ScoreSettings
from vllm_dapd.decoding.policy import INT_LIMIT, Policy, check_field_types, check_int
from vllm_dapd.decoding.registry import get_policy

CACHE_MODES = ("none", "prefix", "dual")
CACHE_REFRESH = ("final", "block")
ADDITIONAL_CONFIG_KEY = "dapd"
ATTENTION_KEY = "dapd_attention"  # additional_config: {"kind": ..., "block_size": ...}, set by engine.hooks
PLAN_KEY = "dapd_plan"  # extra_args key: the admitted request's Plan.to_dict() (set by admission only)
STREAM_CANVAS = "stream_canvas"
SCORE_PREFIX = "score_"
_ALIASES = {"diffusion_canvas_length": "block_length", "diffusion_max_steps": "steps"}
_ENGINE_KEYS = ("policy", "block_length", "steps", "cache_mode", "cache_refresh", "trace")
# Keys vLLM itself keeps in extra_args (v1/request.py, chat_completion/protocol.py, generate serving).
_VLLM_KEYS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode", "session_id"})


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool: ``true``/``false`` or 0/1 (never 1.0 or "1"); errors name ``name``."""
    if isinstance(value, float) or value not in (True, False, 0, 1):
        raise ValueError(f"{name}: must be a boolean (or 0/1), got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class DecodeSettings:
    """One request's decoding settings, validated at construction (errors name the field; integers
    are ``check_int``'s, lenient: ``vllm_xargs`` may deliver "32" or 32.0)."""

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
        object.__setattr__(self, "block_length", check_int("block_length", self.block_length, 1, lenient=True))
        if self.steps is not None:
            object.__setattr__(self, "steps", check_int("steps", self.steps, 1, lenient=True))
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode: must be one of {', '.join(CACHE_MODES)}, got {self.cache_mode!r}")
        if self.cache_refresh not in CACHE_REFRESH:
            raise ValueError(f"cache_refresh: must be one of {', '.join(CACHE_REFRESH)}, got {self.cache_refresh!r}")
        object.__setattr__(self, "trace", check_flag("trace", self.trace))
        if not isinstance(self.policy_params, Mapping):
            raise ValueError(f"policy_params: must be a mapping, got {self.policy_params!r}")

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
            if key == PLAN_KEY:
                raise ValueError(f"{PLAN_KEY}: reserved for the plan admission attaches; not a request option")
            if key in _VLLM_KEYS or key.startswith(SCORE_PREFIX) or key == STREAM_CANVAS:
                continue  # scoring options (ScoreOptions), canvas streaming (Plan.stream_canvas)
            key = _ALIASES.get(key, key)
            (engine if key in _ENGINE_KEYS else params)[key] = value
        if "policy" in engine and engine["policy"] != self.policy:
            base_params: dict[str, Any] = {}  # another policy: the server's params do not carry over
        else:
            base_params = dict(self.policy_params)
        base_params.update(params)
        return dataclasses.replace(self, **engine, policy_params=base_params)


# ---------------------------------------------------------------- scoring options

SAMPLES_LIMIT = 1024  # Monte Carlo samples per split: each is a forward over the sequence
DEFAULT_WINDOW = 32  # prompt positions (the last ones) that carry ELBO terms by default: bounds long prompts
MAX_CHOICES = 64  # choices of one request (each costs score_samples rows of prompt + choice)
_SCORE_FIELDS = ("samples", "estimator", "window", "start", "choices")


def _choices(value: Any) -> tuple[tuple[int, ...], ...]:
    """``score_choices`` as a tuple of non-empty token-id tuples (errors name the key)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"score_choices: must be a list of token-id lists, got {type(value).__name__}")
    if len(value) > MAX_CHOICES:
        raise ValueError(f"score_choices: at most {MAX_CHOICES} choices, got {len(value)}")
    out = []
    for choice in value:
        if (not isinstance(choice, (list, tuple)) or not choice
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT_LIMIT for t in choice)):
            raise ValueError(f"score_choices: each choice must be a non-empty list of token ids, got {choice!r}")
        out.append(tuple(choice))
    return tuple(out)


@dataclass(frozen=True)
class ScoreOptions:
    """A request's scoring options (``score_*`` keys; validated, errors name the key; see
    ``engine/core/scoring.py`` for what each means)."""

    samples: int = 32
    estimator: str = "auto"
    window: int = DEFAULT_WINDOW
    start: int = 0
    choices: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", check_int("score_samples", self.samples, 1, SAMPLES_LIMIT, lenient=True))
        object.__setattr__(self, "choices", _choices(self.choices))
        object.__setattr__(self, "window", check_int("score_window", self.window, 0, lenient=True))
        object.__setattr__(self, "start", check_int("score_start", self.start, 0, lenient=True))
        if self.estimator not in ("auto", *ESTIMATORS):
            raise ValueError(f"score_estimator: must be one of auto, {', '.join(ESTIMATORS)}, got {self.estimator!r}")

    def settings(self, logits_shift: int) -> ScoreSettings:
        estimator = self.estimator if self.estimator != "auto" else ("dream" if logits_shift else "llada")
        return ScoreSettings(samples=self.samples, estimator=estimator)

    def as_overrides(self) -> dict[str, Any]:
        """The flat ``score_*`` mapping ``with_overrides`` reads back into these options."""
        flat = {f"{SCORE_PREFIX}{name}": getattr(self, name) for name in _SCORE_FIELDS}
        flat[f"{SCORE_PREFIX}choices"] = [list(c) for c in self.choices]
        return flat

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "ScoreOptions":
        """These options updated by the ``score_*`` keys of a flat mapping (others are passed over)."""
        fields: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            if key.startswith(SCORE_PREFIX):
                name = key[len(SCORE_PREFIX):]
                if name not in _SCORE_FIELDS:
                    raise ValueError(f"{key}: unknown scoring option "
                                     f"({', '.join(SCORE_PREFIX + n for n in _SCORE_FIELDS)})")
                fields[name] = value
        return dataclasses.replace(self, **fields) if fields else self


# ---------------------------------------------------------------- server defaults

def _section(config: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    section = (config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}.{ADDITIONAL_CONFIG_KEY}: must be a mapping, got {section!r}")
    return section


@dataclass(frozen=True)
class Defaults:
    """The server's defaults for every request: decoding settings and scoring options. Built by
    ``server_defaults`` only; validated at construction (the default policy's params included), so
    a bad server default fails at start-up, naming the key."""

    settings: DecodeSettings = field(default_factory=DecodeSettings)
    score: ScoreOptions = field(default_factory=ScoreOptions)

    def __post_init__(self) -> None:
        get_policy(self.settings.policy).make_params(self.settings.policy_params)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Defaults":
        if STREAM_CANVAS in overrides:
            raise ValueError(f"{STREAM_CANVAS}: a per-request option (a streamed request's vllm_xargs), "
                             "not a server default")
        return Defaults(self.settings.with_overrides(overrides), self.score.with_overrides(overrides))

    def as_config(self) -> dict[str, Any]:
        """The flat ``additional_config["dapd"]`` section ``server_defaults`` reads back into these."""
        return {**self.settings.as_overrides(), **self.score.as_overrides()}


def server_defaults(additional_config: Mapping[str, Any] | None,
                    generation_config: Mapping[str, Any] | None = None) -> Defaults:
    """The server's defaults: built-in < ``generation_config["dapd"]`` (the checkpoint's) <
    ``additional_config["dapd"]`` (flags). ``engine.hooks`` calls it once with both and folds the
    result back into ``additional_config["dapd"]``; every later call (admission, the scheduler)
    reads that folded section alone."""
    checkpoint = _section(generation_config, "generation_config")
    flags = _section(additional_config, "additional_config")
    return Defaults().with_overrides(checkpoint).with_overrides(flags)


# ---------------------------------------------------------------- the plan

def resolve(server: DecodeSettings, extra_args: Mapping[str, Any] | None) -> tuple[DecodeSettings, Any]:
    """Validated settings and policy ``Params`` of one request (the settings part of ``plan``, for
    direct users of the stepper); raises ValueError naming the key."""
    settings = server.with_overrides(extra_args)
    return settings, get_policy(settings.policy).make_params(settings.policy_params)


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
    """One request, resolved: settings (``block_length`` clamped to the canvas), the policy's
    params, canvas size, scoring options, canvas streaming. Made by ``plan`` only."""

    settings: DecodeSettings
    params: Any
    gen_length: int
    score: ScoreOptions = field(default_factory=ScoreOptions)
    stream_canvas: bool = False

    @property
    def policy(self) -> Policy:
        return get_policy(self.settings.policy)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, bool, None, lists, dicts) that ``from_dict`` reads back."""
        settings = {f.name: getattr(self.settings, f.name) for f in dataclasses.fields(self.settings)}
        settings["policy_params"] = dict(self.settings.policy_params)
        score = {name: getattr(self.score, name) for name in _SCORE_FIELDS}
        score["choices"] = [list(c) for c in self.score.choices]
        return {"settings": settings, "params": dataclasses.asdict(self.params), "gen_length": self.gen_length,
                "score": score, "stream_canvas": self.stream_canvas}

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """The plan ``to_dict`` wrote, as it arrives after msgpack (tuples as lists). Every part is
        checked by its own type's validation; nothing is layered, clamped or re-resolved."""
        keys = {"settings", "params", "gen_length", "score", "stream_canvas"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"{PLAN_KEY}: not a plan (need the keys {', '.join(sorted(keys))})")
        try:
            settings = DecodeSettings(**data["settings"])
            params = get_policy(settings.policy).Params(**data["params"])  # not make_params: no new choice
            check_field_types(params)
            score = ScoreOptions(**data["score"])
        except TypeError as e:  # a missing or unknown field
            raise ValueError(f"{PLAN_KEY}: not a plan ({e})") from None
        gen_length = check_int("gen_length", data["gen_length"], 1)  # block-causal: may be under a block
        return cls(settings, params, gen_length, score, check_flag(STREAM_CANVAS, data["stream_canvas"]))


def plan(server: Defaults, extra_args: Mapping[str, Any] | None, max_tokens: int | None, room: int,
         causal: int | None = None, prompt_length: int = 0) -> Plan:
    """The one function that resolves a request: its settings, params, canvas and options layered
    over the server's defaults; ``room`` = model length - prompt. Served requests: called once, at
    admission (``validation.admit``); raises ValueError naming the key. ``causal``: the block size
    of a block-causal model (then ``prompt_length`` places the block grid)."""
    extra = extra_args or {}
    settings, params = resolve(server.settings, extra)
    key = get_policy(settings.policy).key_attention_setting(params)
    if key is not None and (settings.cache_mode != "none" or causal is not None):
        raise ValueError(f"{key}: needs the attention of every query, the prompt's included, which only cache_mode "
                         f"'none' on a bidirectional model computes (got cache_mode {settings.cache_mode!r}"
                         f"{', a block-causal model' if causal is not None else ''})")
    score = server.score.with_overrides(extra)
    stream_canvas = check_flag(STREAM_CANVAS, extra.get(STREAM_CANVAS, False))
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
        return Plan(settings, params, gen_length, score, stream_canvas)
    gen_length = generation_length(max_tokens, settings.block_length, room)
    if settings.block_length > gen_length:
        settings = dataclasses.replace(settings, block_length=gen_length)
    return Plan(settings, params, gen_length, score, stream_canvas)
