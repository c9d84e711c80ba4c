"""The contract between the denoising loop (reference loop or vLLM engine) and an unmasking policy.

A policy sees one denoising step of a batch of canvases and decides, per sequence, which still-masked
positions of the active block to commit now and with which tokens. It is a pure function of tensors:
no vLLM import, no Python loop over sequences or positions.

Per-sequence settings: every policy declares a frozen ``Params`` dataclass (validated at construction,
errors name the field). A batch mixes requests with different settings by stacking each field into a
``[B]`` tensor (``stack_params``), so one batched call serves them all.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch


@dataclass
class DenoiseState:
    """One denoising step of ``B`` canvases of (padded) length ``L``.

    The canvas is the generation region of each sequence (prompt excluded). Padding positions of a
    shorter canvas are neither ``masked`` nor ``decoded``.
    """

    # [B, L, V] float: row j scores canvas position j (Dream's shift already undone); or, when
    # ``rows`` is given, [B, W, V]: row i scores canvas position rows[:, i].
    logits: torch.Tensor
    tokens: torch.Tensor  # [B, L] long; current canvas (mask id where masked)
    masked: torch.Tensor  # [B, L] bool; still masked *and* in the active block: the only committable positions
    decoded: torch.Tensor  # [B, L] bool; positions of the canvas committed in earlier steps (anchors for DAWN)
    step: torch.Tensor  # [B] long; steps already spent on the active block (0 at its first step)
    steps: torch.Tensor  # [B] long; step budget of the active block (>= 1; ``step`` may pass it: ``Policy.step_limit``)
    temperature: torch.Tensor  # [B] float; 0 = greedy (argmax)
    seed: torch.Tensor  # [B] long; per-sequence noise seed (sampling/random order stay batch-independent)
    nfe: torch.Tensor | None = None  # [B] long; forwards already spent on the request (noise counter)
    # [B, L, L] float: attention probability from canvas query i to canvas key j, averaged over the
    # heads/layers the model hook was asked for, normalised over *all* keys (prompt included), so a
    # row sums to <= 1. None unless the policy declares needs_attention.
    attention: torch.Tensor | None = None
    # [B] long: positions in the active block, all masked at its first step (both loops start a
    # block fully masked). Lets a stateless policy know what a block-level schedule has committed
    # so far (block_size - masked); None where the caller does not say.
    block_size: torch.Tensor | None = None
    # What the policy returned as ``StepResult.memory`` at each request's previous forward, rows
    # stacked: {name: [B, L, ...]} plus ``"present"`` [B] bool (False: no previous forward, e.g. a
    # request that just joined the batch; its rows are zeros). None when no row has any. Only
    # policies that keep state across forwards (KLASS) return or read it.
    memory: dict[str, torch.Tensor] | None = None
    # [B, W] long, or None (``logits`` covers the whole canvas): the canvas position each row of
    # ``logits`` scores. Every committable (``masked``) position has a row; a row may repeat (padding
    # of a shorter list). The engine gives a policy that declares ``accepts_row_subset`` only the rows
    # of its active block's still-masked positions (and, with ``reads_decoded_rows``, of the decoded
    # positions it scores), so the vocabulary work is per masked position, not per canvas. Such
    # policies read per-position values of the logits through ``at_rows`` / ``on_canvas``.
    rows: torch.Tensor | None = None
    # [B] long: canvas positions of each sequence (the whole answer, every block; padding of a
    # shorter canvas excluded), so a policy can count the answer's masks left, later blocks included
    # (DAPD's tau schedule: gen_length - decoded). None: every row spans all L positions.
    canvas_length: torch.Tensor | None = None
    # [B, L] float: the attention each canvas key receives, averaged over *every* query of the
    # sequence (prompt, canvas, suffix; same heads/layers as ``attention``): DAWN's column mean for
    # its absolute sink rule. None unless a request's ``Policy.key_attention_setting`` names one.
    key_attention: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def at_rows(self, values: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] canvas values -> [B, W, ...] at the positions the logits rows score."""
        if self.rows is None:
            return values
        index = self.rows.view(*self.rows.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
        return values.gather(1, index)

    def on_canvas(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[B, W] values of the logits rows -> [B, L], ``fill`` where no row scores the position
        (never a committable one)."""
        if self.rows is None:
            return values
        out = torch.full(self.tokens.shape, fill, dtype=values.dtype, device=values.device)
        return out.scatter(1, self.rows, values)  # repeated rows carry equal values


@dataclass
class StepResult:
    commit: torch.Tensor  # [B, L] bool; subset of state.masked; >= 1 per sequence that has a masked position
    tokens: torch.Tensor  # [B, L] long; proposed token per position (read only where commit)
    confidence: torch.Tensor | None = None  # [B, L] float; the score the policy ranked by (for traces)
    # {name: [B, L, ...]}: handed back to the policy as DenoiseState.memory at the request's next
    # forward (the loops keep it per request, across blocks). None: nothing to keep.
    memory: dict[str, torch.Tensor] | None = None


def _field_to_tensor(values: Sequence[Any], device: torch.device | str | None) -> torch.Tensor:
    first = values[0]
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool, device=device)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def stack_params(params: Sequence[Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Stack per-sequence ``Params`` dataclasses into ``{field: [B] tensor}`` (fields are numbers)."""
    if not params:
        raise ValueError("params: need one Params object per sequence, got none")
    kind = type(params[0])
    if any(type(p) is not kind for p in params):
        raise ValueError("params: all sequences in one policy call must use the same Params class")
    return {
        f.name: _field_to_tensor([getattr(p, f.name) for p in params], device)
        for f in dataclasses.fields(kind)
    }


class Policy:
    """Base class of unmasking policies. Subclasses set ``name``, ``Params`` and implement ``step``."""

    name: ClassVar[str]
    Params: ClassVar[type]
    needs_attention: ClassVar[bool] = False
    # Which layers' attention the model hook averages for this policy when the server does not say
    # (negative = counted from the last layer). Only read when needs_attention.
    default_attention_layers: ClassVar[tuple[int, ...]] = (-1,)
    # True: the policy reads per-position values of the logits only through ``DenoiseState.at_rows``
    # / ``on_canvas`` and only at committable positions, so the engine may give it the rows of the
    # active block alone (``DenoiseState.rows``). False (the default, e.g. KLASS's history reads
    # every position): the logits always cover the whole canvas.
    accepts_row_subset: ClassVar[bool] = False
    # With ``accepts_row_subset``: the policy also reads the logits of decoded positions (DAWN's
    # anchors), so the engine adds the rows of every decoded position it scores.
    reads_decoded_rows: ClassVar[bool] = False

    def attention_layers(self, params: Any, num_layers: int | None = None) -> tuple[int, ...]:
        """The layers to average for one request (its ``Params``); the class default unless a
        policy makes them a parameter (DAPD: ``attention_window``/``attention_skip``, or a share of
        the model's ``num_layers``, which the loops pass when they know it)."""
        return tuple(self.default_attention_layers)

    def key_attention_setting(self, params: Any) -> str | None:
        """The parameter that makes this request read ``DenoiseState.key_attention`` (errors name it:
        it needs every query's attention row, so cache mode ``none``), or None (the default)."""
        return None

    def step_limit(self, params: Any, steps: int, block_size: int) -> int:
        """The most forwards a block may take (the loops end it sooner once it has no mask): its step
        budget ``steps``, unless the policy keeps stepping past it like a reference loop (threshold's
        ``overrun``); ``DenoiseState.step`` may then reach ``steps`` and beyond."""
        return steps

    def make_params(self, overrides: Mapping[str, Any] | None = None) -> Any:
        """Build validated Params from defaults plus ``overrides`` (unknown keys are an error)."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{unknown[0]}: not a parameter of policy {self.name!r} (known: {', '.join(sorted(known)) or 'none'})"
            )
        try:
            params = self.Params(**overrides)
        except TypeError as e:  # a __post_init__ comparing an ill-typed value
            name = next((k for k in overrides if k in str(e)), next(iter(overrides), "params"))
            raise ValueError(f"{name}: invalid value for policy {self.name!r} ({e})") from None
        check_field_types(params)
        return params

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        raise NotImplementedError


# ---- validation helpers for Params.__post_init__ (errors name the field) ----

INT_LIMIT = 2**31 - 1  # every int field of every Params: int64 tensors hold it with room for arithmetic
FLOAT_LIMIT = float(torch.finfo(torch.float32).max)  # float fields become float32 tensors


def check_field_types(params: Any) -> None:
    """Make every field of a frozen ``Params`` safe for ``stack_params``, whatever the policy checked:
    a ``bool`` field holds a bool (0/1 accepted), an ``int`` field an int (never a bool) within
    [-INT_LIMIT, INT_LIMIT], a ``float`` field a finite number within float32 range (stored as float,
    so one batch never mixes int and float values of a field). Errors name the field.
    """
    for f in dataclasses.fields(params):
        value, kind = getattr(params, f.name), f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "bool":
            if isinstance(value, float) or value not in (True, False):
                raise ValueError(f"{f.name}: must be true or false, got {value!r}")
            value = bool(value)
        elif kind == "int":
            check_int(f.name, value, -INT_LIMIT, INT_LIMIT)
        elif kind == "float":
            check_range(f.name, value, -FLOAT_LIMIT, FLOAT_LIMIT)
            value = float(value)
        elif not isinstance(value, (bool, int, float)) or isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}: must be a finite number, got {value!r}")
        object.__setattr__(params, f.name, value)

def check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    check_finite(name, value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name}: must be {'<' if high_open else '<='} {high}, got {value}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = INT_LIMIT, *,
              lenient: bool = False) -> int:
    """``value`` as an int in [low, high] (high defaults to ``INT_LIMIT``); errors name ``name``. A
    bool is never an integer. ``lenient``: also take what JSON over HTTP may deliver for one, an
    integral float (32.0) or a decimal string of at most 19 digits ("32")."""
    if lenient and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,19}", value.strip(" ")):
            value = int(value.strip(" "))  # spaces only: str.strip and int() disagree on what else is blank
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


def check_logits(logits: torch.Tensor) -> None:
    """Policies refuse NaN/inf logits loudly instead of committing garbage.

    One reduction in the common case: NaN and inf are absorbing in a sum, so a finite sum means
    every logit is finite; only a non-finite sum (possibly an overflow of finite values) pays for
    the element-wise test, which decides."""
    if bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        return
    if not torch.isfinite(logits).all():
        raise ValueError("logits: contain NaN or inf (model overflow or a bad checkpoint?)")
