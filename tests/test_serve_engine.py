"""The server's pieces without a cluster: aborting a request in the replica scheduler, the
protocol models' refusals, and chat templates read from tokenizer_config.json."""
from __future__ import annotations

import json
import threading
import time

import pytest
from pydantic import ValidationError

from daskllm.engine.request import Request
from daskllm.engine.scheduler import ReplicaEngine
from daskllm.model.sampling import SamplingParams
from daskllm.serve.adapter import ChatTemplate
from daskllm.serve.protocol import ChatCompletionRequest, CompletionRequest


class SlowReplica:
    """Answers token 7 to every sampling sequence, one step per 5 ms, and records what it frees."""
    index = 0

    def __init__(self):
        self.released, self.calls = [], 0
        self.lock = threading.Lock()

    def step(self, work, release=()):
        time.sleep(0.005)
        with self.lock:
            self.calls += 1
            self.released += list(release)
        return {w.seq: 7 for w in work if w.sample}


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_abort_drops_a_running_request_and_frees_its_cache_while_idle():
    replica = SlowReplica()
    engine = ReplicaEngine(replica, budget_tokens=100_000, max_batch_tokens=64, on_lost=None)
    try:
        request = Request([1, 2, 3], SamplingParams(), max_new_tokens=10_000)
        engine.submit(request)
        _wait_until(lambda: len(request.generated) >= 3)
        assert engine.abort(request) is True
        _wait_until(lambda: request.id in replica.released)      # freed though nothing else runs
        calls = replica.calls
        time.sleep(0.05)
        assert replica.calls == calls, "the engine kept stepping after the abort"
        assert len(request.generated) < 10_000 and engine.abort(request) is False
    finally:
        engine.close()


def test_abort_of_a_queued_request_never_runs_it():
    replica = SlowReplica()
    engine = ReplicaEngine(replica, budget_tokens=20, max_batch_tokens=64, on_lost=None)
    try:
        first = Request([1, 2, 3], SamplingParams(), max_new_tokens=15)     # takes the whole budget
        queued = Request([4, 5, 6], SamplingParams(), max_new_tokens=15)
        engine.submit(first)
        engine.submit(queued)
        assert engine.abort(queued) is True
        first.wait(timeout=10)
        time.sleep(0.05)
        assert queued.generated == [] and queued.id not in replica.released
    finally:
        engine.close()


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "temperature": 3}, "less than or equal to 2"),
    ({"prompt": "x", "top_p": 1.5}, "less than or equal to 1"),
    ({"prompt": "x", "n": 65}, "less than or equal to 64"),
    ({"prompt": "x", "stop": ["ok", ""]}, "a stop string must not be empty"),
    ({"prompt": "x", "echo": True}, "echo is not supported by daskllm"),
    ({"prompt": "x", "best_of": 3}, "best_of is not supported by daskllm"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty is not supported by daskllm"),
    ({"prompt": "x", "mystery": 1}, "Extra inputs are not permitted"),
    ({"prompt": {"text": "x"}}, "prompt"),
])
def test_completion_requests_are_checked_field_by_field(body, message):
    with pytest.raises(ValidationError, match=message):
        CompletionRequest(model="m", **body)


def test_prompt_forms_and_chat_limits():
    assert CompletionRequest(model="m", prompt="hi").prompts() == ["hi"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    with pytest.raises(ValueError, match="prompt is empty"):
        CompletionRequest(model="m", prompt=[]).prompts()
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}],
                                 max_completion_tokens=5)
    assert chat.messages[0].text() == "ab" and chat.token_limit() == 5
    with pytest.raises(ValidationError, match="image_url"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url", "text": ""}]}])


def test_chat_template_from_tokenizer_config(tmp_path):
    assert ChatTemplate.from_model(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                                                          "{{ eos_token }}{% endfor %}"}]}))
    template = ChatTemplate.from_model(tmp_path)
    assert template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "<s>a</s>b</s>"
    refusing = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="the chat template refused these messages: only user turns"):
        refusing.render([{"role": "user", "content": "a"}])
