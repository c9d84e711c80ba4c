"""Client input at admission: bounds (fuzzed), the canvas bound, default layering, the CLI's manners.

No engine. The fuzz property: a request's settings either fail with an error naming one of its keys,
or resolve to a plan whose every number fits the tensors the worker builds from it; the test builds
those tensors (``stack_params``, the stepper's ``steps``/``seed``/length tensors) and runs one policy
step on them.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding.policy import stack_params
from vllm_dapd.decoding.registry import available_policies, get_policy
from vllm_dapd.engine.core.settings import INT_LIMIT, DecodeSettings, Defaults, plan, resolve, server_defaults


def server_settings(additional_config, generation_config=None):
    return server_defaults(additional_config, generation_config).settings

ENGINE_KEYS = ["block_length", "steps", "diffusion_canvas_length", "diffusion_max_steps", "trace", "cache_mode",
               "cache_refresh"]
EXTREME = st.one_of(
    st.sampled_from([0, 1, -1, 2, 10, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 1e30, -1e30,
                     float("nan"), float("inf"), -float("inf"), 1e39, 0.5, 2.0, True, False, "1" * 30, "8",
                     " 7 ", "-3", "1e3", "true", "²", "٣", "", None, [1], [True], {"a": 1}]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=25), st.booleans(),
)
HUGE = st.sampled_from([2**31 - 1, 2**31, 2**62, 2**63 - 1, 2**63, 10**30, 1e30, 1e19, "1" * 30, "9" * 19])
# Half the values could pass, so later keys get checked too; the rest extreme or ill-typed.
VALUE = st.one_of(st.integers(1, 64), st.floats(0, 1), st.booleans(), HUGE, HUGE, EXTREME)


def request(policy: str):
    """A request's vllm_xargs: engine keys and the policy's own parameter names, any values."""
    fields = [f.name for f in dataclasses.fields(get_policy(policy).Params)]
    params = st.dictionaries(st.sampled_from(fields), VALUE, max_size=3) if fields else st.just({})
    return st.tuples(st.dictionaries(st.sampled_from(ENGINE_KEYS[:4]), VALUE, max_size=2),
                     params).map(lambda t: {**t[0], **t[1]})


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tensors_the_worker_builds(p, helpers) -> None:
    """The tensors ``stepper`` builds from a plan, built for real, then one step of its policy."""
    s = p.settings
    lengths = torch.tensor([p.gen_length, s.block_length, s.steps_per_block], dtype=torch.long)
    assert int(lengths.max()) <= INT_LIMIT
    params = stack_params([p.params, p.params])
    for name, t in params.items():
        assert t.dtype in (torch.bool, torch.long, torch.float32), name
        assert bool(torch.isfinite(t.float()).all()), name
    state = helpers.make_state(B=2, L=min(p.gen_length, 12), V=8, steps=s.steps_per_block,
                               attention=get_policy(s.policy).needs_attention)
    state.seed = torch.tensor([2**63 - 1, -(2**63)], dtype=torch.long)  # the seed range admission allows
    result = get_policy(s.policy).step(state, params)
    assert bool((result.commit & ~state.masked).sum() == 0)


@pytest.mark.parametrize("policy", available_policies())
@FUZZ
@given(data=st.data(), max_tokens=st.integers(1, 5000), room=st.integers(1, 5000))
def test_fuzzed_settings_are_an_error_naming_a_key_or_fit_the_tensors(helpers, policy, data, max_tokens, room):
    extra = {"policy": policy, **data.draw(request(policy))}
    try:
        p = plan(Defaults(), extra, max_tokens, room)
    except ValueError as e:
        key = str(e).split(":", 1)[0]
        aliases = {"block_length": "diffusion_canvas_length", "steps": "diffusion_max_steps"}
        assert key in extra or aliases.get(key) in extra, (str(e), extra)
        return
    # Never a canvas beyond the answer rounded to whole blocks, nor beyond the room left.
    assert 1 <= p.gen_length <= min(room, 2 * max_tokens - 1 if max_tokens > 1 else 1)
    assert p.settings.block_length <= p.gen_length
    tensors_the_worker_builds(p, helpers)


@pytest.mark.parametrize("policy", [p for p in available_policies() if dataclasses.fields(get_policy(p).Params)])
@FUZZ
@given(data=st.data(), value=VALUE)
def test_fuzzed_policy_parameter_is_an_error_naming_it_or_fits_the_tensors(helpers, policy, data, value):
    name = data.draw(st.sampled_from([f.name for f in dataclasses.fields(get_policy(policy).Params)]))
    try:
        p = plan(Defaults(), {"policy": policy, name: value}, 10, 100)
    except ValueError as e:
        assert str(e).startswith(name + ":"), (str(e), name, value)
        return
    tensors_the_worker_builds(p, helpers)


@pytest.mark.parametrize("extra,key", [
    ({"steps": 1e30}, "steps"), ({"steps": 2**63}, "steps"), ({"steps": "1" * 30}, "steps"),
    ({"diffusion_max_steps": 1e30}, "steps"), ({"block_length": 1e30}, "block_length"),
    ({"block_length": 2**63}, "block_length"), ({"block_length": True}, "block_length"),
    ({"block_length": float("nan")}, "block_length"), ({"steps": False}, "steps"),
    ({"policy": "dapd", "max_per_step": 2**63}, "max_per_step"), ({"policy": "dapd", "max_per_step": True}, "max_per_step"),
    ({"policy": "eb", "proxy": 2**40}, "proxy"), ({"policy": "threshold", "threshold": float("nan")}, "threshold"),
    ({"policy": "factor", "factor": 1e39}, "factor"), ({"policy": "dawn", "tau_edge": "0.1"}, "tau_edge"),
    ({"policy": "dapd", "staged": 0.0}, "staged"), ({"trace": 1.0}, "trace"),
    ({"policy": "dapd", "variant": "paper"}, "variant"),
    ({"policy": "dapd", "variant": "staged", "edge_threshold": 1.0}, "edge_threshold"),
])
def test_the_issue_s_crashers_are_errors_naming_the_key(extra, key):
    with pytest.raises(ValueError) as e:
        plan(Defaults(), extra, 10, 100)
    assert str(e.value).startswith(key + ":")


def test_huge_block_length_is_clamped_to_the_answer():
    # The issue's stall: 10 tokens asked, block 4096 -> a 4077-position canvas. Now: one 10-token block.
    p = plan(Defaults(), {"block_length": 4096, "steps": 10}, 10, 4077)
    assert (p.gen_length, p.settings.block_length) == (10, 10)
    p = plan(Defaults(DecodeSettings(block_length=8)), None, 13, 1000)  # smaller blocks: rounded up to whole blocks
    assert (p.gen_length, p.settings.block_length) == (16, 8)


def test_int_param_fields_get_int_tensors_and_float_fields_float_ones():
    a = get_policy("threshold").make_params({"threshold": 1})  # an int for a float field
    b = get_policy("threshold").make_params({"threshold": 0.5})
    t = stack_params([a, b])["threshold"]
    assert t.dtype == torch.float32 and t.tolist() == [1.0, 0.5]


# ---------------------------------------------------------------- admission (the validator and admit)

def sampling(extra=None, **kw):
    base = dict(seed=None, temperature=0.0, max_tokens=10, extra_args=extra, top_p=1.0, top_k=0, min_p=0.0,
                presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def validator():
    from vllm_dapd.engine.vllm import validation

    return validation


def admitted(validator, sp, vocab_size=None):
    """What admission does to a request: vLLM's validate_params, then admit (the one plan)."""
    validator.DecodeSettingsValidator.validate_params(sp)
    return validator.admit(sp, 3, Defaults(), 100, vocab_size)


@pytest.mark.parametrize("kw,key", [
    (dict(seed=2**63), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(extra={"steps": 1e30}), "steps"),
    (dict(extra={"score_samples": 1025}), "score_samples"), (dict(extra={"score_samples": "²"}), "score_samples"),
    (dict(extra={"score_window": 2**31}), "score_window"), (dict(extra={"score_samples": True}), "score_samples"),
    (dict(extra={"score_start": 2**31}), "score_start"), (dict(extra={"stream_canvas": 2}), "stream_canvas"),
    (dict(extra={"stream_canvas": 1}), "stream_canvas"),  # not a streamed request
    (dict(extra={"dapd_plan": {}}), "dapd_plan"),  # only admission writes it
])
def test_admission_refuses_naming_the_parameter(validator, kw, key):
    from vllm.exceptions import VLLMValidationError

    extra = kw.pop("extra", None)
    with pytest.raises(VLLMValidationError) as e:
        admitted(validator, sampling(extra, **kw))
    assert str(e.value).startswith(key + ":") and e.value.parameter == key


def test_admission_refuses_choices_outside_the_vocabulary(validator):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="^score_choices:.*< 50"):
        admitted(validator, sampling({"score_choices": [[1, 50]]}), vocab_size=50)
    assert admitted(validator, sampling({"score_choices": [[1, 49]]}), vocab_size=50).score.choices == ((1, 49),)


def test_admission_accepts_bounds_and_attaches_the_plan_leaving_the_callers_dict(validator):
    from vllm_dapd.engine.core.settings import PLAN_KEY, SAMPLES_LIMIT, Plan

    validator.DecodeSettingsValidator.validate_params(sampling(seed=2**63 - 1))
    validator.DecodeSettingsValidator.validate_params(sampling(seed=-(2**63)))
    for extra in ({"score_samples": SAMPLES_LIMIT}, {"score_samples": "1"}, {"score_window": 2**31 - 1}):
        callers = dict(extra)
        sp = sampling(callers)
        p = admitted(validator, sp)
        assert Plan.from_dict(sp.extra_args[PLAN_KEY]) == p and callers == extra  # a new dict, not the caller's
    assert admitted(validator, sampling({"score_samples": f"{SAMPLES_LIMIT}"})).score.samples == SAMPLES_LIMIT
    # The canvas is sized where the prompt length is known: 100 - 3 positions of room.
    assert admitted(validator, sampling(max_tokens=500)).gen_length == 97


def test_ignored_sampling_options_are_logged_once(validator, caplog):
    validator._warned.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.dapd.validation"):
        validator.DecodeSettingsValidator.validate_params(sampling(top_p=0.9, top_k=5))
        validator.DecodeSettingsValidator.validate_params(sampling(top_p=0.5))
        validator.DecodeSettingsValidator.validate_params(sampling())
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "top_p" in warnings[0] and "top_k" in warnings[0]
    assert validator.warn_ignored(sampling(min_p=0.1, presence_penalty=1.0)) == ["min_p", "presence_penalty"]


def test_json_true_reaches_the_check_as_a_bool():
    """vLLM's protocol types vllm_xargs values str|int|float, which turns true into 1."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from vllm_dapd.engine.vllm.hooks import keep_json_booleans

    keep_json_booleans()
    req = CompletionRequest(model="m", prompt="x", vllm_xargs={"block_length": True, "steps": 4, "x": [False, 1]})
    assert req.vllm_xargs == {"block_length": True, "steps": 4, "x": [False, 1]}
    assert type(req.vllm_xargs["block_length"]) is bool and type(req.vllm_xargs["steps"]) is int
    with pytest.raises(ValueError, match="^block_length:"):
        resolve(DecodeSettings(), {"block_length": req.vllm_xargs["block_length"]})


# ---------------------------------------------------------------- layered defaults

def test_layers_checkpoint_then_flags_then_request():
    checkpoint = {"dapd": {"policy": "threshold", "threshold": 0.8, "block_length": 10, "steps": 5}}
    server = server_settings({"dapd": {"steps": 7}}, checkpoint)
    assert (server.policy, server.block_length, server.steps, server.policy_params) == ("threshold", 10, 7,
                                                                                         {"threshold": 0.8})
    settings, params = resolve(server, {"block_length": 4})
    assert (settings.block_length, settings.steps, params.threshold) == (4, 7, 0.8)
    # A flag choosing another policy drops the checkpoint's parameters of the old one.
    other = server_settings({"dapd": {"policy": "dapd"}}, checkpoint)
    assert (other.policy, other.policy_params, other.block_length) == ("dapd", {}, 10)
    # The folded form reads back to the same settings (what every engine process receives).
    assert server_settings({"dapd": server.as_overrides()}) == server


def test_checkpoint_section_errors_name_it():
    with pytest.raises(ValueError, match="^generation_config.dapd"):
        server_settings(None, {"dapd": [1]})
    with pytest.raises(ValueError, match="^block_length"):
        server_settings(None, {"dapd": {"block_length": 0}})


def model_config(path, **kw):
    import vllm_dapd.plugin
    from vllm.config import ModelConfig

    vllm_dapd.plugin.register()
    return ModelConfig(model=path, tokenizer=path, **kw)


def test_demo_checkpoint_defaults_are_folded_and_bound_the_answer():
    from vllm_dapd.demo import CHECKPOINT
    from vllm_dapd.engine.vllm.hooks import fold_server_defaults

    config = SimpleNamespace(model_config=model_config(CHECKPOINT), additional_config={"dapd": {"steps": 5}})
    server = fold_server_defaults(config)
    assert (server.settings.policy, server.settings.block_length, server.settings.steps) == ("dapd", 10, 5)
    assert config.additional_config["dapd"] == server.as_config()
    assert config.model_config.get_diff_sampling_param()["max_tokens"] == 10  # its max_new_tokens


def test_checkpoint_without_max_new_tokens_gets_the_server_default(tmp_path):
    from vllm_dapd.engine.vllm.hooks import DEFAULT_MAX_NEW_TOKENS, fold_server_defaults
    from vllm_dapd.models.tiny import make_tiny_llada

    path = make_tiny_llada(str(tmp_path / "llada"))
    config = SimpleNamespace(model_config=model_config(path, max_model_len=4096), additional_config=None)
    assert "max_tokens" not in config.model_config.get_diff_sampling_param()
    server = fold_server_defaults(config)
    assert server == Defaults()
    assert config.model_config.get_diff_sampling_param()["max_tokens"] == DEFAULT_MAX_NEW_TOKENS < 4096


# ---------------------------------------------------------------- the CLI leaves stock vLLM alone

def parse(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_dapd.engine.vllm.cli import install_cli_option

    install_cli_option()  # what register() does once vLLM's arg_utils is loaded
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(argv)
    return parser, args, EngineArgs.from_cli_args(args)


def test_without_plugin_vllm_keeps_its_default_model_and_help():
    from vllm.config import ModelConfig

    from vllm_dapd.demo import CHECKPOINT

    parser, args, engine_args = parse([])
    assert engine_args.model == ModelConfig.model and engine_args.served_model_name is None
    assert CHECKPOINT not in parser.format_help()


def test_plugin_without_model_serves_the_demo_under_a_short_name():
    from vllm_dapd.demo import CHECKPOINT
    from vllm_dapd.engine.vllm.cli import DEMO_NAME

    _, args, engine_args = parse(["--plugin", "dapd"])
    assert engine_args.model == args.model == CHECKPOINT
    assert args.served_model_name == [DEMO_NAME]  # the API server reads the names from here
    _, args, engine_args = parse(["--plugin", "dapd", "--served-model-name", "mine"])
    assert args.served_model_name == ["mine"]
    _, _, engine_args = parse(["--plugin", "dapd", "--model", "/some/llada"])
    assert engine_args.model == "/some/llada"


def test_float_fields_are_bounded_by_float32():
    """A float field up to float32's max is kept and stays finite in its tensor; a finite Python
    float past it (which float32 would turn into inf) is refused naming the field."""
    from vllm_dapd.decoding.policy import check_field_types

    @dataclasses.dataclass(frozen=True)
    class Params:
        knob: float = 0.0

    top = float(torch.finfo(torch.float32).max)
    kept = Params(knob=-top)
    check_field_types(kept)
    assert torch.isfinite(stack_params([kept], torch.device("cpu"))["knob"]).all()
    with pytest.raises(ValueError, match="^knob: "):
        check_field_types(Params(knob=top * 1.0001))
