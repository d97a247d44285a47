"""Chat templates: a checkpoint's jinja template rendered as transformers' apply_chat_template does.

The template comes from the GGUF metadata (tokenizer.chat_template) or tokenizer_config.json
(or chat_template.jinja). Templates are untrusted code, so they run in jinja2's
ImmutableSandboxedEnvironment with transformers' settings: trim_blocks, lstrip_blocks, the
loopcontrols extension, a `{% generation %}` block, and the globals and filters templates
rely on (raise_exception, strftime_now, tojson without HTML escaping, dict, namespace).
The special tokens (bos_token, eos_token, unk_token, pad_token) are passed as variables.
The rendered text is tokenized without adding special tokens: the template writes them.
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatError(ValueError):
    """A chat request that cannot be rendered: no template, malformed messages, or the template refused it."""


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict,
                       namespace=jinja2.utils.Namespace)
    return env


class ChatTemplate:
    """A compiled chat template and the special tokens it may use.

    Example
    -------
    >>> t = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    ...                  "{% if add_generation_prompt %}<assistant>{% endif %}")
    >>> t.render([{"role": "user", "content": "Hi"}])
    '<user>Hi<assistant>'
    """

    def __init__(self, source: str, special_tokens: dict | None = None):
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"the checkpoint's chat template does not parse: {e} (line {e.lineno})") from None
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(self, messages, add_generation_prompt: bool = True, tools=None, documents=None, **kwargs) -> str:
        """The prompt text for a conversation (a list of {"role", "content"} dicts)."""
        check_messages(messages)
        try:
            return self.template.render(messages=[dict(m) for m in messages], tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template refused this conversation: {e}") from None


def check_messages(messages):
    """A conversation is a non-empty list of dicts, each with a str role and content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError('messages must be a non-empty list of {"role": ..., "content": ...} dicts, e.g. '
                        '[{"role": "user", "content": "Hello"}]; got ' + type(messages).__name__)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatError(f'message {i} must be a dict with a "role" (str) and a "content"; got {m!r}')


def chat_template_for(tokenizer) -> ChatTemplate:
    """The chat template of a checkpoint's tokenizer, or a clear error when it has none."""
    if tokenizer is None or not tokenizer.chat_template:
        raise ChatError("this checkpoint has no chat template (tokenizer.chat_template in a GGUF file, "
                        "chat_template in tokenizer_config.json); use generate() with plain text instead")
    return ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens)
