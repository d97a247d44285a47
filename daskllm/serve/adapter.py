"""The one place where the server touches the engine: submit, wait, stream, abort, chat prompts.

Two pieces of the engine are being finished elsewhere (issues 18 and 12); this module
stands in for them, and takes theirs where it finds them, so the switch is made here alone:
- aborting a request: `request.cancel()` (issue 18) where Request has it; otherwise the
  request is failed and its replica's engine drops it (`ReplicaEngine.abort`), which frees
  its KV cache;
- chat templates: the tokenizer's `chat_template` (issue 12: from GGUF metadata or
  tokenizer_config.json) where the tokenizer has one, else tokenizer_config.json's; rendered
  by `ChatTemplate` here with jinja2 in a sandbox, as transformers' `apply_chat_template`
  does (io.chat.ChatTemplate of issue 12 can replace it).

Waiting is done in a thread pool of the server's own, never on the event loop: each active
choice holds one thread blocked on its request's pieces until they end or it is aborted.
"""
from __future__ import annotations

import asyncio
import json
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..engine.validate import RequestError, check_prompt

MAX_WAITERS = 512          # threads blocked on requests at once; more wait their turn


class RequestAborted(RuntimeError):
    """The request was aborted (its client went away) before it finished."""


class NoChatTemplate(RequestError):
    """The model has no chat template, so chat messages cannot be turned into a prompt."""


class Engine:
    """The server's view of an `LLM`: requests in, text out, never blocking the event loop."""

    def __init__(self, llm):
        if llm.tokenizer is None:
            raise ValueError(f"serving needs a tokenizer: {llm.path} has no tokenizer.json")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.context = llm.config.max_position
        self._pool = ThreadPoolExecutor(MAX_WAITERS, thread_name_prefix="daskllm-serve-wait")
        self._submitted = weakref.WeakValueDictionary()     # id -> this server's requests, to abort on close

    def close(self):
        """Abort what is still running (so no waiting thread is left blocked), stop the threads."""
        for request in list(self._submitted.values()):
            self.abort(request)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ----------------------------------------------------------------------

    def prompt_ids(self, prompt, max_tokens=None) -> list:
        """A text or token-id prompt as checked token ids (RequestError if it is bad), leaving room
        for `max_tokens` (or at least one token) in the context."""
        return check_prompt(prompt, self.tokenizer, self.llm.config, max_tokens or 1)

    def room(self, prompt_ids: list) -> int:
        """Tokens a request with this prompt may generate at most: context and KV budget allowing."""
        return min(self.context, self.llm.budget_tokens) - len(prompt_ids)

    def submit(self, prompt_ids: list, max_tokens: int, *, temperature: float, top_p: float, top_k: int,
               seed, stop: list, ignore_eos: bool):
        """Queue one generation on the engine's continuous batching; the Request.

        `llm.submit` checks the prompt against the context and the KV budget (RequestError)."""
        (request,) = self.llm.submit([prompt_ids], max_new_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos)
        self._submitted[request.id] = request
        return request

    async def wait(self, request):
        """The request's RequestOutput, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, request.wait)

    async def pieces(self, request):
        """The request's text pieces as they are generated (an async iterator)."""
        loop = asyncio.get_running_loop()
        iterator = request.pieces()
        end = object()
        while True:
            piece = await loop.run_in_executor(self._pool, next, iterator, end)
            if piece is end:
                return
            yield piece

    def abort(self, request):
        """Stop `request` if it is still running and free its KV cache on the ranks."""
        if request.finished:
            return
        if hasattr(request, "cancel"):      # issue 18's API: the engine drops it and frees its cache
            request.cancel()
            return
        request.fail(RequestAborted(f"request {request.id} was aborted"))   # ends any waiter at once
        for engine in self.llm.router.alive():
            if engine.index == request.replica:
                engine.abort(request)

    @staticmethod
    def was_aborted(request) -> bool:
        return request.finish_reason == "cancelled" or isinstance(request.error, RequestAborted)

    # -- state, for /health and /metrics -----------------------------------------------

    def queue_lengths(self) -> tuple:
        """(requests waiting for a slot, requests running) over all live replicas."""
        waiting = running = 0
        for engine in self.llm.router.alive():
            with engine._cond:          # noqa: SLF001 - read-only peek until the engine reports it
                waiting += len(engine._waiting)
                running += len(engine._running)
        return waiting, running

    def healthy(self) -> bool:
        return bool(self.llm.router.alive())

    def rank_stats(self) -> list:
        """(global rank, its stats dict) for every rank of the live replicas: steps, step
        seconds, live sequences, cache bytes. An actor call per rank: blocking."""
        out = []
        for engine in self.llm.router.alive():
            replica = engine.replica
            out += [(replica.first_rank + s["local_rank"], s) for s in replica.stats()]
        return out

    # -- chat --------------------------------------------------------------------------

    def model_chat_template(self) -> "ChatTemplate | None":
        """The model's own chat template, or None."""
        source = getattr(self.tokenizer, "chat_template", None)       # issue 12's tokenizer carries it
        if source:
            tokens = getattr(self.tokenizer, "special_tokens", {}) or {}
            return ChatTemplate(source, tokens.get("bos_token") or "", tokens.get("eos_token") or "")
        return ChatTemplate.from_model(self.llm.path)

    def chat_prompt_ids(self, template: "ChatTemplate | None", messages: list, max_tokens=None) -> list:
        """The token ids of `messages` rendered by `template` (NoChatTemplate if None)."""
        if template is None:
            raise NoChatTemplate(
                f"the model {Path(self.llm.path).name!r} has no chat template (no chat_template in its "
                "tokenizer_config.json), so /v1/chat/completions cannot build a prompt; "
                "use /v1/completions, or serve with --chat-template FILE")
        text = template.render(messages)
        return check_prompt(self.encode_plain(text), None, self.llm.config, max_tokens or 1)

    def encode_plain(self, text: str) -> list:
        """Token ids of `text` without added special tokens: a chat template writes its own."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=False)          # issue 12's Tokenizer
        except TypeError:
            return self.tokenizer._tok.encode(text, add_special_tokens=False).ids  # noqa: SLF001


class ChatTemplate:
    """A Hugging Face chat template (jinja2), rendered as transformers renders it."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model(cls, path) -> "ChatTemplate | None":
        """The template in tokenizer_config.json of a checkpoint directory, or None."""
        try:
            config = json.loads((Path(path) / "tokenizer_config.json").read_text())
        except FileNotFoundError:
            return None
        source = config.get("chat_template")
        if isinstance(source, list):     # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default")
        if not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @classmethod
    def from_file(cls, path, model_path=None) -> "ChatTemplate":
        base = cls.from_model(model_path) if model_path else None
        return cls(Path(path).read_text(), base.bos_token if base else "", base.eos_token if base else "")

    def render(self, messages: list) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), ending where the assistant speaks."""
        from jinja2.exceptions import TemplateError
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise RequestError(f"the chat template refused these messages: {e}") from e


def _token_text(entry) -> str:
    return (entry.get("content") if isinstance(entry, dict) else entry) or ""
