"""Canvas streaming (``vllm_xargs={"stream_canvas": 1}``) and the live view page (``GET /dapd/``).

One real ``vllm serve --plugin dapd`` (the demo model, fp32) for the module. Streams are read as raw
SSE lines, so what is checked is what a client receives: one chunk per forward per choice, forwards
1..NFE in order, replaying the commits gives the answer, ``delta.content`` only carries committed
text, ordinary streams are unchanged. The page is loaded in headless Chromium (Debian's
``chromium`` + ``chromium-driver``, driven by selenium): it must run in CI (``CI=true``); elsewhere
it skips, naming what is missing. ``DAPD_LIVE_SCREENSHOT=path.png`` saves the finished page.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

from vllm_dapd.demo.tasks import TASKS, held_out, is_correct

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
MODEL = "dapd-demo"
SORT = "sort 5 9 9 2 9 3 9 7"


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    log_path = tmp_path_factory.mktemp("canvas") / "server.log"
    with start_server(["--plugin", "dapd", "--dtype", "float32"], log_path) as (base, _):
        yield base


def post(base: str, path: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stream(base: str, path: str, body: dict) -> list[dict]:
    """The SSE chunks of a streamed request, parsed."""
    status, raw = post(base, path, {**body, "stream": True})
    assert status == 200, raw
    lines = [line for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def chat_ids(base: str, content: str) -> list[int]:
    """The chat-templated prompt (vLLM's ``/tokenize``), for ``/v1/completions``: the demo model answers it."""
    status, raw = post(base, "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": content}],
                                           "add_generation_prompt": True})
    assert status == 200, raw
    return json.loads(raw)["tokens"]


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


def check_choice(choices: list[dict], chat: bool) -> tuple[str, dict, dict[int, int], list[int]]:
    """The stream of one choice: one canvas per forward, in order; text only once committed.

    Returns the streamed text, the final ``dapd`` field, the replayed canvas {position: token} and the
    streamed token ids (when asked with ``return_token_ids``)."""
    forwards, committed, text, tokens = [], {}, "", []
    for choice in choices:
        canvas = (choice.get("dapd") or {}).get("canvas")
        if canvas is not None:
            forwards.append(canvas["forward"])
            for position, token, piece in canvas["committed"]:
                assert position not in committed, f"position {position} committed twice"
                assert isinstance(piece, str)
                committed[position] = token
        delta = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        text += delta or ""
        tokens += choice.get("token_ids") or []
        # Append-only, committed text: every token streamed so far is a committed canvas position.
        assert all(committed.get(p) == t for p, t in enumerate(tokens)), (tokens, committed)
    final = choices[-1]["dapd"]
    assert forwards == list(range(1, final["nfe"] + 1))  # one chunk per forward, each forward once
    assert sum(1 for c in choices if (c.get("dapd") or {}).get("canvas")) == final["nfe"]
    assert sorted(committed) == list(range(final["committed_tokens"]))  # replay = the whole canvas
    return text, final, committed, tokens


def test_completion_one_chunk_per_forward_replays_to_the_answer(server):
    """One block over the answer (where canvas streaming matters most): every forward sends a chunk
    with its commits, and the text as soon as it is a committed prefix, before the block is done."""
    body = {"model": MODEL, "prompt": chat_ids(server, SORT), "max_tokens": 10, "temperature": 0,
            "return_token_ids": True,
            "vllm_xargs": {"stream_canvas": 1, "block_length": 10, "steps": 10, "policy": "low_confidence"}}
    chunks = stream(server, "/v1/completions", body)
    choices = by_choice(chunks)[0]
    text, final, committed, tokens = check_choice(choices, chat=False)
    assert final["nfe"] == 10 and len(choices) == 10  # nothing but the forwards' chunks
    assert sum(1 for c in choices[:-1] if c["text"]) > 1 and text != ""  # text before the block's end
    assert [committed[p] for p in range(len(tokens))] == tokens
    # The same answer as without streaming, and as an ordinary stream.
    status, raw = post(server, "/v1/completions", {k: v for k, v in body.items() if k != "vllm_xargs"} | {
        "vllm_xargs": {"block_length": 10, "steps": 10, "policy": "low_confidence"}})
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == text


def test_plain_stream_sends_text_as_its_committed_prefix_grows(server):
    """One block over a 10-token answer, no canvas: the text comes in several chunks before the last one,
    as each prefix is committed, and adds up to the non-streamed answer, tokens and cost."""
    for path, chat in (("/v1/completions", False), ("/v1/chat/completions", True)):
        body = {"model": MODEL, "max_tokens": 10, "temperature": 0, "return_token_ids": True,
                "vllm_xargs": {"block_length": 10, "steps": 10, "policy": "low_confidence"},
                **({"messages": [{"role": "user", "content": SORT}]} if chat else {"prompt": chat_ids(server, SORT)})}
        choices = by_choice(stream(server, path, body))[0]
        texts = [((c.get("delta") or {}).get("content") if chat else c.get("text")) or "" for c in choices]
        assert sum(1 for piece in texts[:-1] if piece) > 1, texts  # text before the final chunk, in pieces
        assert not any("canvas" in (c.get("dapd") or {}) for c in choices)
        status, raw = post(server, path, body)
        assert status == 200, raw
        whole = json.loads(raw)["choices"][0]
        assert "".join(texts) == (whole["message"]["content"] if chat else whole["text"]) != ""
        assert sum((c.get("token_ids") or [] for c in choices), []) == whole["token_ids"]
        assert choices[-1]["finish_reason"] == whole["finish_reason"]
        assert choices[-1]["dapd"] == whole["dapd"]  # the same forwards: the block ran to its end


def test_ordinary_stream_is_unchanged(server):
    body = {"model": MODEL, "prompt": SORT, "max_tokens": 10, "temperature": 0,
            "vllm_xargs": {"block_length": 5, "steps": 5}}
    plain = by_choice(stream(server, "/v1/completions", body))[0]
    assert not any("canvas" in (c.get("dapd") or {}) for c in plain)
    canvas = by_choice(stream(server, "/v1/completions", {**body, "vllm_xargs": {
        "block_length": 5, "steps": 5, "stream_canvas": True}}))[0]
    text, final, _, _ = check_choice(canvas, chat=False)
    assert len(canvas) == final["nfe"] > 2 and text == "".join(c["text"] for c in plain)
    assert {k: v for k, v in final.items() if k != "canvas"} == plain[-1]["dapd"]  # same cost


def test_chat_n2_each_choice_its_forwards(server):
    item = held_out(TASKS[0], 1)[0]
    body = {"model": MODEL, "messages": [{"role": "user", "content": item.prompt}], "max_tokens": 10, "n": 2,
            "temperature": 0.7, "seed": 5, "stream_options": {"include_usage": True},
            "vllm_xargs": {"stream_canvas": 1, "block_length": 5, "policy": "threshold", "threshold": 0.5}}
    chunks = stream(server, "/v1/chat/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    per_choice = by_choice(chunks)
    assert sorted(per_choice) == [0, 1]
    for index, choices in per_choice.items():
        assert choices[0]["delta"].get("role") == "assistant"  # vLLM's role chunk still comes first
        text, final, committed, _ = check_choice(choices[1:], chat=True)
        assert final["nfe"] >= 2  # two blocks
        assert text  # the answer, once its blocks were committed


def test_openai_client_reads_the_canvas(server):
    """docs/SERVING.md example: the ``openai`` client keeps the field in ``model_extra``."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    forwards = []
    answer = ""
    for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": SORT}], temperature=0, stream=True,
            extra_body={"vllm_xargs": {"stream_canvas": 1, "policy": "dapd"}}):
        for choice in chunk.choices:
            canvas = (choice.model_extra.get("dapd") or {}).get("canvas")
            if canvas:
                forwards.append(canvas["forward"])
            answer += choice.delta.content or ""
    assert forwards == list(range(1, len(forwards) + 1)) and forwards
    assert answer.strip() == "2 3 5 7 9 9 9 9"


def test_readme_snippet_runs_as_pasted(server, capsys):
    """docs/SERVING.md canvas streaming example, against this server: a line per forward, then the answer."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "docs" / "SERVING.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "stream_canvas" in c)
    exec(compile(code.replace("http://127.0.0.1:8000", server), "docs/SERVING.md", "exec"), {})
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split()[:2] for line in lines[:-1]] == [["forward", str(k)] for k in range(1, 6)]  # 5 steps
    assert lines[-1].strip() == "2 3 5 7 9 9 9 9"


@pytest.mark.parametrize("path, body, key", [
    ("/v1/completions", {"prompt": SORT, "vllm_xargs": {"stream_canvas": 1}}, "stream_canvas"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SORT}], "vllm_xargs": {"stream_canvas": 1}},
     "stream_canvas"),
    ("/v1/completions", {"prompt": SORT, "stream": True, "vllm_xargs": {"stream_canvas": 2}}, "stream_canvas"),
    ("/v1/completions", {"prompt": SORT, "stream": True, "vllm_xargs": {"stream_canvas": "yes"}}, "stream_canvas"),
])
def test_bad_stream_canvas_is_a_400_naming_it(server, path, body, key):
    """A streamed request's error comes as vLLM sends every streamed 400: an SSE error event."""
    status, raw = post(server, path, {"model": MODEL, "max_tokens": 10, **body})
    if body.get("stream"):
        assert status == 200 and raw.decode().startswith("data: {"), raw
        error = json.loads(raw.decode().split("\n\n")[0][len("data: "):])["error"]
        assert error["code"] == 400 and error["param"] == key, raw
    else:
        assert status == 400, raw
        error = json.loads(raw)["error"]
    assert error["message"].startswith(key), raw


# ---------------------------------------------------------------------------- the live view


def test_page_is_served(server):
    with urllib.request.urlopen(server + "/dapd/", timeout=30) as r:
        page = r.read().decode()
        assert r.headers["content-type"].startswith("text/html")
    assert '<option value="dapd"' in page and '<option value="dawn"' in page
    assert "stream_canvas" in page
    assert "http://" not in page and "https://" not in page  # no external assets
    with urllib.request.urlopen(server + "/dapd", timeout=30) as r:  # redirected
        assert r.geturl().endswith("/dapd/")


def _browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing (a failure in CI)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = f"live view browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,720"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_page_decodes_in_headless_chromium(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    item = held_out(TASKS[0], 1)[0]
    status, raw = post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": item.prompt}], "max_tokens": 10, "temperature": 0,
        "vllm_xargs": {"policy": "dapd"}})
    expected = json.loads(raw)["choices"][0]
    driver = _browser()
    try:
        driver.get(server + "/dapd/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(item.prompt)
        Select(driver.find_element(By.ID, "policy")).select_by_value("dapd")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done",) or
                   "error" in (d.find_element(By.ID, "status").get_attribute("class") or ""))
        assert driver.find_element(By.ID, "status").text == "done"
        answer = driver.find_element(By.ID, "answer").text
        assert answer == expected["message"]["content"] and is_correct(item, answer)
        assert driver.find_element(By.ID, "nfe").text == str(expected["dapd"]["nfe"])
        assert float(driver.find_element(By.ID, "tpf").text) == pytest.approx(
            expected["dapd"]["tokens_per_forward"], abs=0.01)
        cells = driver.find_elements(By.CSS_SELECTOR, "#canvas .cell")
        forwards = [int(c.get_attribute("data-forward") or 0) for c in cells]
        assert len(cells) == expected["dapd"]["committed_tokens"]
        assert set(forwards) == set(range(1, expected["dapd"]["nfe"] + 1))  # coloured by forward
        shot = os.environ.get("DAPD_LIVE_SCREENSHOT")
        if shot:
            time.sleep(0.5)
            driver.save_screenshot(shot)
    finally:
        driver.quit()
