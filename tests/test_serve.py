"""`daskllm serve` as an OpenAI client sees it: the official `openai` client against a running
server on a multi-process LocalCluster, checked against the Python API's own outputs."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import golden_dir

from daskllm import LLM
from daskllm.serve import ServerThread
from daskllm.io.chat import ChatTemplate
from daskllm.serve.adapter import Engine

pytestmark = pytest.mark.cluster

KEY = "test-key"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The golden Llama with a chat template in its tokenizer_config.json."""
    d = tmp_path_factory.mktemp("serve") / "llama"
    shutil.copytree(golden_dir("llama"), d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def llm(client, model_dir):
    with LLM(model_dir, client=client) as model:
        yield model


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(llm, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _get(url) -> str:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (any labels) in a Prometheus exposition."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _running(llm) -> int:
    return sum(len(e._running) + len(e._waiting) for e in llm.router.engines)


def _live_sequences(llm) -> int:
    return sum(s["memory"]["live_sequences"] for s in llm.stats())


def _wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- what a client gets -----------------------------------------------------------------------

def test_models_and_health(api, server):
    assert [m.id for m in api.models.list().data] == ["llama"]
    assert json.loads(_get(server.url.removesuffix("/v1") + "/health"))["status"] == "ok"


def test_completion_equals_the_python_api(api, llm):
    expected = llm.generate("The cat sat on", max_new_tokens=12, ignore_eos=True)[0]
    got = api.completions.create(model="llama", prompt="The cat sat on", max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert got.choices[0].text == expected.text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == 12 and got.usage.total_tokens == got.usage.prompt_tokens + 12


def test_token_prompts_n_choices_and_seeds(api, llm):
    ids = [5, 6, 7, 8]
    kwargs = dict(model="llama", prompt=ids, max_tokens=8, temperature=0.9, top_p=0.95, seed=3, n=3,
                  extra_body={"ignore_eos": True})
    first, again = api.completions.create(**kwargs), api.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]          # same seed, same text
    assert len({c.text for c in first.choices}) > 1                                      # choices differ
    one = llm.generate([ids], max_new_tokens=8, temperature=0.9, top_p=0.95, seed=3, ignore_eos=True)[0]
    assert first.choices[0].text == one.text                                             # choice 0 = seed
    assert first.usage.prompt_tokens == 4 and first.usage.completion_tokens == 24


def test_stop_string_and_a_list_of_prompts(api, llm):
    full = llm.generate("Hello there", max_new_tokens=24, ignore_eos=True)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    got = api.completions.create(model="llama", prompt=["Hello there", "Hello there"], max_tokens=24,
                                 temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert [(c.index, c.text, c.finish_reason) for c in got.choices] == [
        (0, full[:full.find(stop)], "stop"), (1, full[:full.find(stop)], "stop")]


def _chat_prompt_ids(llm, messages):
    text = ChatTemplate(TEMPLATE, {"bos_token": "<s>"}).render(messages)
    assert text == "<s><|user|>Say hi\n<|assistant|>"                 # the template really ran
    assert llm.chat_prompt(messages) == llm.tokenizer.encode(text, add_special_tokens=False)
    return llm.chat_prompt(messages)


def test_chat_uses_the_models_template(api, llm):
    messages = [{"role": "user", "content": "Say hi"}]
    ids = _chat_prompt_ids(llm, messages)
    expected = llm.generate([ids], max_new_tokens=10, ignore_eos=True)[0]
    got = api.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == expected.text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 10


def test_streams_give_the_same_text_and_usage_last(api, llm):
    expected = llm.generate("Once upon", max_new_tokens=16, ignore_eos=True)[0]
    chunks = list(api.completions.create(model="llama", prompt="Once upon", max_tokens=16, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text and len(chunks) > 3
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16

    messages = [{"role": "user", "content": "Say hi"}]
    ids = _chat_prompt_ids(llm, messages)
    expected = llm.generate([ids], max_new_tokens=12, ignore_eos=True)[0]
    chunks = list(api.chat.completions.create(model="llama", messages=messages, max_tokens=12, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 12


def test_32_concurrent_clients_lose_and_duplicate_nothing(server, llm):
    prompts = [f"Story number {i} begins" for i in range(32)]
    expected = {p: out.text for p, out in zip(prompts, llm.generate(prompts, max_new_tokens=12, ignore_eos=True))}

    def ask(i):
        with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
            kwargs = dict(model="llama", prompt=prompts[i], max_tokens=12, temperature=0,
                          extra_body={"ignore_eos": True})
            if i % 2:       # half of the clients stream
                return prompts[i], "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kwargs)
                                           if ch.choices)
            return prompts[i], c.completions.create(**kwargs).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert sorted(p for p, _ in answers) == sorted(prompts)                   # each answered once
    wrong = [p for p, text in answers if text != expected[p]]
    assert not wrong, f"{len(wrong)} answers differ from the Python API's, e.g. {wrong[0]!r}"


# -- cancellation -------------------------------------------------------------------------------

def test_a_closed_stream_frees_its_slot(api, llm, server):
    _wait_until(lambda: _running(llm) == 0 and _live_sequences(llm) == 0)
    stream = api.completions.create(model="llama", prompt="Tell me everything", max_tokens=240, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    (request,) = [r for e in llm.router.engines for r in e._running.values()]
    stream.close()                                              # the client goes away
    _wait_until(lambda: request.finished)
    assert Engine.was_aborted(request) and len(request.generated) < 240
    _wait_until(lambda: _running(llm) == 0 and _live_sequences(llm) == 0)    # slot and KV cache freed
    metrics = _get(server.url.removesuffix("/v1") + "/metrics")
    assert _metric(metrics, "daskllm_rank_live_sequences") == 0
    assert re.search(r'^daskllm_requests_total\{endpoint="completions",status="499"\} [1-9]', metrics, re.M)
    assert api.completions.create(model="llama", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1


def test_a_client_that_hangs_up_on_a_plain_request_cancels_it(server, llm):
    import httpx2
    _wait_until(lambda: _running(llm) == 0)
    # 16 choices of 240 tokens: long enough on any machine to be running when the client leaves
    body = {"model": "llama", "prompt": "Tell me everything", "max_tokens": 240, "ignore_eos": True, "n": 16}
    seen = []

    def queued():
        return [r for e in llm.router.engines for r in [*e._waiting, *e._running.values()]]

    def watch():                      # remember the requests the server submits
        _wait_until(lambda: len(queued()) == 16, timeout=30)
        seen.extend(queued())

    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(watch)
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=httpx2.Timeout(30, read=0.3))
        watcher.result()
    _wait_until(lambda: all(r.finished for r in seen))
    assert all(Engine.was_aborted(r) and len(r.generated) < 240 for r in seen)
    _wait_until(lambda: _running(llm) == 0 and _live_sequences(llm) == 0)


# -- refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param, message", [
    (dict(model="gpt-4"), "model", "model 'gpt-4' is not served here; this server serves 'llama'"),
    (dict(temperature=-1), "temperature", "greater than or equal to 0"),
    (dict(temperature=1, top_p=0), "top_p", "greater than 0"),
    (dict(n=0), "n", "greater than or equal to 1"),
    (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (dict(stop=[""]), "stop", "a stop string must not be empty"),
    (dict(logprobs=2), None, "logprobs is not supported by daskllm"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unknown parameter 'frobnicate'"),
    (dict(prompt=[1, 384]), "prompt", r"token id 384 is outside the vocabulary \(ids must be in 0\.\.383\)"),
    (dict(prompt="word " * 300), "prompt", "exceeds the model's context of 256 tokens"),
    (dict(prompt=[5] * 200, max_tokens=100), "prompt", "200 tokens \\+ max_new_tokens 100 = 300 exceeds"),
])
def test_bad_completion_requests_get_400_and_the_server_keeps_serving(api, kwargs, param, message):
    before = api.completions.create(model="llama", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(**{"model": "llama", "prompt": "Hi", "max_tokens": 4, **kwargs})
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]
    assert error["param"] == param
    assert api.completions.create(model="llama", prompt="Hi", max_tokens=2).usage.prompt_tokens == \
        before.usage.prompt_tokens


def test_bad_chat_requests_get_400(api):
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="llama", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="messages.0.role"):
        api.chat.completions.create(model="llama", messages=[{"role": "robot", "content": "x"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 256 tokens"):
        api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "word " * 300}])


def test_a_wrong_or_missing_api_key_gets_401(server):
    import httpx2
    with openai.OpenAI(base_url=server.url, api_key="wrong-key", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as info:
            c.completions.create(model="llama", prompt="Hi", max_tokens=2)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    no_key = httpx2.post(server.url + "/completions", json={"model": "llama", "prompt": "Hi"}, timeout=60)
    assert no_key.status_code == 401 and "invalid API key" in no_key.json()["error"]["message"]
    assert json.loads(_get(server.url.removesuffix("/v1") + "/health"))["status"] == "ok"   # no key needed


def test_metrics_count_requests_tokens_and_rank_steps(api, server):
    base = server.url.removesuffix("/v1")
    before = _get(base + "/metrics")
    api.completions.create(model="llama", prompt="Count me", max_tokens=5, extra_body={"ignore_eos": True})
    after = _get(base + "/metrics")
    grown = {name: _metric(after, name) - _metric(before, name) for name in (
        "daskllm_requests_total", "daskllm_generation_tokens_total", "daskllm_time_to_first_token_seconds_count",
        "daskllm_request_latency_seconds_count", "daskllm_rank_step_seconds_count")}
    assert grown == {**grown, "daskllm_requests_total": 1, "daskllm_generation_tokens_total": 5,
                     "daskllm_time_to_first_token_seconds_count": 1, "daskllm_request_latency_seconds_count": 1}
    assert grown["daskllm_rank_step_seconds_count"] >= 5
    assert "daskllm_requests_waiting 0.0" in after and "daskllm_requests_running 0.0" in after


# -- the command --------------------------------------------------------------------------------

def test_the_serve_command_without_a_chat_template(client):
    """`daskllm serve` on a model with no chat template: completions work, chat is a clear 400."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "daskllm.cli", "serve", "--model", str(golden_dir("llama")),
                             "--address", client.scheduler.address, "--port", "0", "--api-key", KEY,
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 240       # a loaded 2-core machine takes its time to import
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            lines.append(proc.stderr.readline())
            found = re.search(r"at (http://\S+/v1)", lines[-1])
            url = found and found.group(1)
        assert url, "".join(lines)
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60) as c:
            assert c.completions.create(model="llama", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
            with pytest.raises(openai.BadRequestError, match="has no chat template") as info:
                c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}])
            assert info.value.body["code"] == "no_chat_template"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill() if proc.poll() is None else None
            proc.stderr.close()
    assert proc.returncode == 0


def test_serve_help_and_a_busy_port_is_refused_before_loading(capsys):
    from daskllm.cli import main
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--model", "--tp", "--dp", "--sp", "--ep", "--address", "--host", "--port", "--api-key"):
        assert option in help_text
    import socket
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use;" in err
    assert "starting workers" not in err
