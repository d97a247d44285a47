"""The server's pieces without a cluster: the protocol models' refusals, and chat templates."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from conftest import golden_dir
from pydantic import ValidationError

from daskllm.serve.protocol import ChatCompletionRequest, CompletionRequest


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


def test_chat_template_from_the_model_or_a_file(tmp_path):
    from daskllm.io.tokenizer import Tokenizer
    from daskllm.serve.adapter import Engine, NoChatTemplate
    shutil.copytree(golden_dir("llama"), tmp_path / "m")
    engine = Engine(SimpleNamespace(tokenizer=Tokenizer.from_dir(tmp_path / "m"), path=str(tmp_path / "m"),
                                    config=SimpleNamespace(max_position=256, vocab_size=384)))
    try:
        assert engine.chat_template() is None
        with pytest.raises(NoChatTemplate, match="has no chat template .* serve with --chat-template FILE"):
            engine.chat_prompt_ids(None, [{"role": "user", "content": "a"}])
        (tmp_path / "t.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                                          "{% endfor %}")
        template = engine.chat_template(tmp_path / "t.jinja")
        assert template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == \
            "<s>a</s>b</s>"
        ids = engine.chat_prompt_ids(template, [{"role": "user", "content": "hi"}])
        assert ids[0] == 0 and ids.count(0) == 1                 # the template's bos, and no second one
    finally:
        engine.close()
