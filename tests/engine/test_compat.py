"""The vLLM-internals check (``vllm_dapd/engine/vllm/compat.py``): passes on the installed vLLM, and names
the symbol when one is removed or changed (each kind of check, by monkeypatching vLLM itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vllm_dapd.engine.vllm import compat

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_env(monkeypatch):
    """No cached pass and no skip switch, whatever the surrounding process set; what a test's
    check_at_startup writes is undone (setenv first records the original state, even when unset)."""
    for name in (compat.OK_ENV, compat.SKIP_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def only(problems: list[str], target: str) -> str:
    hits = [p for p in problems if p.startswith(target + ":")]
    assert len(hits) == 1 and len(problems) == 1, problems
    return hits[0]


def test_installed_vllm_passes():
    assert compat.check() == []
    assert compat.in_supported_range(compat.vllm_version())


def test_every_vllm_import_of_the_plugin_is_in_the_table():
    """A new ``from vllm... import X`` anywhere in vllm_dapd must be added to REQUIREMENTS."""
    covered = {f"{n.target.split(':')[0]}:{n.target.split(':')[1].split('.')[0]}" for n in compat.REQUIREMENTS}
    imported = set()
    for path in (ROOT / "vllm_dapd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                imported |= {f"{node.module}:{a.name}" for a in node.names}
    assert imported and imported <= covered, sorted(imported - covered)


def test_removed_private_method_is_named(monkeypatch):
    from vllm.v1.worker.gpu_worker import Worker

    monkeypatch.delattr(Worker, "_make_model_runner")
    problem = only(compat.check(), "vllm.v1.worker.gpu_worker:Worker._make_model_runner")
    assert "missing" in problem and "GPU runner factory" in problem


def test_changed_signature_is_named(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "schedule", lambda self, budget=None: None)
    problem = only(compat.check(), "vllm.v1.core.sched.scheduler:Scheduler.schedule")
    assert "signature changed" in problem and "['budget']" in problem


def test_removed_dataclass_field_is_named(monkeypatch):
    from vllm.v1.outputs import ModelRunnerOutput

    fields = {k: v for k, v in ModelRunnerOutput.__dataclass_fields__.items() if k != "sampled_token_ids"}
    monkeypatch.setattr(ModelRunnerOutput, "__dataclass_fields__", fields)
    assert "['sampled_token_ids']" in only(compat.check(), "vllm.v1.outputs:ModelRunnerOutput")


def test_new_abstract_method_is_named(monkeypatch):
    from vllm.v1.sample.logits_processor import LogitsProcessor

    monkeypatch.setattr(LogitsProcessor, "__abstractmethods__",
                        LogitsProcessor.__abstractmethods__ | {"new_hook"})
    assert "['new_hook']" in only(compat.check(), "vllm.v1.sample.logits_processor:LogitsProcessor")


class RenamedRegistry:  # prometheus_client's registry with its private map renamed
    def __init__(self) -> None:
        self._names_by_collector: dict = {}


def test_renamed_private_attribute_is_named(monkeypatch):
    import prometheus_client.registry

    monkeypatch.setattr(prometheus_client.registry, "CollectorRegistry", RenamedRegistry)
    assert "['_collector_to_names']" in only(compat.check(), "prometheus_client.registry:CollectorRegistry")


def test_call_site_that_no_longer_calls_us_is_named(monkeypatch):
    import vllm.v1.sample.logits_processor as lp

    def validate_logits_processors_parameters(logits_processors, sampling_params):  # no longer validates
        return None

    monkeypatch.setattr(lp, "validate_logits_processors_parameters", validate_logits_processors_parameters)
    problem = only(compat.check(), "vllm.v1.sample.logits_processor:validate_logits_processors_parameters")
    assert "no longer contains 'validate_params('" in problem


def test_extra_args_key_vllm_uses_but_we_do_not_pass_over(monkeypatch):
    import vllm_dapd.engine.core.settings as settings

    monkeypatch.setattr(settings, "_VLLM_KEYS", settings._VLLM_KEYS - {"kv_cache_report_mode"})
    problems = compat.check()
    assert len(problems) == 1 and problems[0].startswith("extra_args key 'kv_cache_report_mode'")
    assert "v1/request.py" in problems[0]


def test_extra_args_scan_reads_keys_across_lines(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "entrypoints").mkdir()
    (tmp_path / "v1" / "request.py").write_text('x = params.extra_args.get(\n    "new_key", 1)\n')
    (tmp_path / "entrypoints" / "p.py").write_text('extra_args["other"] = 1\nvllm_xargs.get("session_id")\n')
    assert compat.vllm_extra_args_keys(tmp_path) == {"new_key": ["v1/request.py"], "other": ["entrypoints/p.py"],
                                                    "session_id": ["entrypoints/p.py"]}


def test_startup_fails_naming_version_and_symbol(monkeypatch, fresh_env):
    import vllm_dapd.plugin as plugin
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    monkeypatch.delattr(GPUModelRunner, "_dummy_run")
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(RuntimeError) as err:
        plugin.register()
    message = str(err.value)
    assert f"installed vLLM {compat.vllm_version()}" in message
    assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_run: missing" in message
    assert f">={compat.VLLM_MIN},<{compat.VLLM_BELOW}" in message and compat.SKIP_ENV in message
    assert plugin._registered is False  # a later register() checks again


def test_skip_switch_and_cached_pass(monkeypatch, fresh_env):
    calls = []
    monkeypatch.setattr(compat, "check", lambda: calls.append(1) or [])
    compat.check_at_startup()
    compat.check_at_startup()  # the stamp of the first pass is reused (children inherit it)
    assert calls == [1]
    monkeypatch.delenv(compat.OK_ENV)
    monkeypatch.setattr(compat, "check", lambda: ["x: missing"])
    with pytest.raises(RuntimeError, match="x: missing"):
        compat.check_at_startup()
    monkeypatch.setenv(compat.SKIP_ENV, "1")
    compat.check_at_startup()


@pytest.mark.parametrize("version, ok", [("0.32.0", True), ("0.32.4.dev3+gabc", True), ("0.32.0rc1", True),
                                         ("0.33.0", False), ("0.31.9", False), ("garbage", False)])
def test_supported_range(version, ok):
    assert compat.in_supported_range(version) is ok


def test_setup_reads_the_range_from_compat():
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert "0.32" not in text and "vllm_dapd/engine/vllm/compat.py" in text


def test_need_is_validated():
    with pytest.raises(ValueError, match="kind"):
        compat.Need("vllm:X", "exist")
    with pytest.raises(ValueError, match="target"):
        compat.Need("vllm.X", "exists")
    assert compat.Need("vllm:X", "exists").kind == "exists"  # a well-formed one is accepted


def test_design_doc_lists_every_requirement():
    doc = (ROOT / "docs" / "ENGINE_DESIGN.md").read_text(encoding="utf-8")
    missing = [n.target for n in compat.REQUIREMENTS if f"`{n.target}`" not in doc]
    assert not missing, missing
