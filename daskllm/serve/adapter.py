"""The one place where the server touches the engine: submit, wait, stream, abort, chat prompts.

It uses the engine's public calls only: `llm.submit`, `request.wait` / `request.pieces`
(awaited in threads), `request.cancel` (the engine drops the request and frees its KV cache),
and the chat template of `daskllm.io.chat` (the tokenizer's, from GGUF metadata or
tokenizer_config.json, or a file given to the server).

Waiting is done in a thread pool of the server's own, never on the event loop: each active
choice holds one thread blocked on its request's pieces until they end or it is aborted.
"""
from __future__ import annotations

import asyncio
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..engine.validate import RequestError, check_prompt
from ..io.chat import ChatTemplate

MAX_WAITERS = 512          # threads blocked on requests at once; more wait their turn


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
        """Stop `request` if it is still running; its replica frees its KV cache."""
        request.cancel()

    @staticmethod
    def was_aborted(request) -> bool:
        return request.finish_reason == "cancelled"

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

    def chat_template(self, path=None) -> "ChatTemplate | None":
        """The template in file `path`, else the model's own, else None."""
        special = getattr(self.tokenizer, "special_tokens", {})
        if path is not None:
            return ChatTemplate(Path(path).read_text(), special)
        return ChatTemplate(self.tokenizer.chat_template, special) if self.tokenizer.chat_template else None

    def chat_prompt_ids(self, template: "ChatTemplate | None", messages: list, max_tokens=None) -> list:
        """The token ids of `messages` rendered by `template` (NoChatTemplate if None)."""
        if template is None:
            raise NoChatTemplate(
                f"the model {Path(self.llm.path).name!r} has no chat template (no chat_template in its "
                "tokenizer_config.json or GGUF metadata), so /v1/chat/completions cannot build a prompt; "
                "use /v1/completions, or serve with --chat-template FILE")
        text = template.render(messages, add_generation_prompt=True)
        # The template writes the special tokens itself (bos and the like): encode without adding more.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return check_prompt(ids, None, self.llm.config, max_tokens or 1)
