"""Generation: the n choices of one HTTP request, submitted together, awaited or streamed, aborted.

Completions and chat differ only in how the prompt is made and how a choice is written
out; both run a Generation. Every way out of one (finished, failed, client gone) ends in
`abort`, which stops the requests still running and frees their KV cache.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..engine.validate import RequestError

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}    # engine's -> OpenAI's


def openai_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, reason)


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


@dataclass
class Choice:
    index: int
    text: str
    tokens: int
    finish_reason: str


@dataclass
class Generation:
    engine: object                      # adapter.Engine
    requests: list                      # engine Requests, in choice order
    prompt_tokens: int                  # each prompt counted once, whatever n is (as OpenAI counts)
    arrived: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, engine, prompts: list, body, max_tokens) -> "Generation":
        """Submit n choices for each prompt (token ids); `max_tokens` None = as many as fit.

        Choice i of a seeded request samples with seed + i: the choices differ, and choice 0
        repeats a single request with the same seed."""
        arrived = time.monotonic()
        requests = []
        try:
            for ids in prompts:
                limit = max_tokens if max_tokens is not None else engine.room(ids)
                if limit < 1:
                    raise RequestError(
                        f"the prompt has {len(ids)} tokens, which leaves no room to generate: the model "
                        f"holds {min(engine.context, engine.llm.budget_tokens)} tokens per request")
                for j in range(body.n):
                    requests.append(engine.submit(
                        ids, limit, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        seed=None if body.seed is None else body.seed + j, stop=body.stop,
                        ignore_eos=body.ignore_eos))
        except BaseException:
            for r in requests:
                engine.abort(r)
            raise
        return cls(engine, requests, sum(len(ids) for ids in prompts), arrived)

    # -- ways out ----------------------------------------------------------------------

    async def results(self, http_request) -> list:
        """Every choice once all are done; ClientGone (and all aborted) if the client leaves first."""
        waits = asyncio.ensure_future(asyncio.gather(*(self.engine.wait(r) for r in self.requests)))
        gone = asyncio.ensure_future(_disconnected(http_request))
        try:
            await asyncio.wait({waits, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not waits.done():
                raise ClientGone()
            outputs = waits.result()
        finally:
            gone.cancel()
            waits.cancel()
            self.abort()
        return [Choice(i, out.text, len(out.token_ids), openai_reason(out.finish_reason))
                for i, out in enumerate(outputs)]

    async def stream(self):
        """Yield (choice index, text piece, None) as tokens come, then (index, None, finish reason)
        once per choice. Closing the iterator early aborts what still runs."""
        queue = asyncio.Queue()

        async def pump(index, request):
            try:
                async for piece in self.engine.pieces(request):
                    queue.put_nowait((index, piece, None))
                queue.put_nowait((index, None, openai_reason(request.finish_reason)))
            except Exception as error:   # noqa: BLE001 - handed to the reader, which raises it
                queue.put_nowait((index, None, error))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(self.requests)]
        try:
            left = len(tasks)
            while left:
                index, piece, end = await queue.get()
                if isinstance(end, Exception):
                    raise end
                left -= end is not None
                yield index, piece, end
        finally:
            for t in tasks:
                t.cancel()
            self.abort()

    def abort(self):
        for r in self.requests:
            self.engine.abort(r)

    # -- figures -----------------------------------------------------------------------

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.generated) for r in self.requests)

    def time_to_first_token(self):
        """Seconds from arrival to the first token of any choice, or None if none came."""
        firsts = [r.first_token_at for r in self.requests if r.first_token_at is not None]
        return min(firsts) - self.arrived if firsts else None


async def _disconnected(http_request):
    """Return when the client closes its connection (the body is already read)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
