"""Request: one prompt's generation, from acceptance to its last token, and its output.

A request is owned by the driver: its prompt and the tokens generated so far are the
truth, so when a replica is lost the request is re-run elsewhere from exactly there.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from ..model.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class RequestOutput:
    """What `LLM.generate` returns for one prompt."""
    text: str                         # generated text (stop string excluded)
    token_ids: list                   # generated token ids
    prompt_token_ids: list
    finish_reason: str                # "eos" | "stop" (a stop string) | "length" (max_new_tokens)


@dataclass
class Request:
    prompt: list
    params: SamplingParams
    max_new_tokens: int
    eos_ids: tuple = ()
    stop: tuple = ()
    decoder: object = None            # io.tokenizer.StreamDecoder, or None for token-only use
    id: int = field(default_factory=lambda: next(_ids))
    generated: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    replica: int | None = None        # which replica serves it now
    retries: int = 0                  # times it was moved after a replica was lost
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None   # for time-to-first-token
    _emitted: int = 0                 # characters of text already streamed
    _pieces: queue.Queue = field(default_factory=queue.Queue)
    _done: threading.Event = field(default_factory=threading.Event)

    # -- read by the scheduler ---------------------------------------------------------

    @property
    def context(self) -> list:
        """Everything the model must have seen before the next token: prompt + generated."""
        return self.prompt + self.generated

    @property
    def remaining_work(self) -> int:
        """Tokens still to feed (prefill) plus tokens still to generate; the router's load measure."""
        return len(self.prompt) + self.max_new_tokens

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # -- written by the scheduler ------------------------------------------------------

    def add_token(self, token: int):
        """Append a generated token, update text, and finish on eos, stop string or length."""
        self.generated.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in self.eos_ids:
            return self._finish("eos")
        if self.decoder is not None:
            self.text += self.decoder.step(token)
            for s in self.stop:
                cut = self.text.find(s)
                if cut >= 0:
                    self.text = self.text[:cut]
                    return self._finish("stop")
            self._flush(hold=max((len(s) for s in self.stop), default=1) - 1)
        else:
            self._pieces.put(token)
        if len(self.generated) >= self.max_new_tokens:
            self._finish("length")

    def fail(self, error: BaseException):
        if not self.finished:
            self.error = error
            self._pieces.put(error)
            self._done.set()

    def _finish(self, reason: str):
        self.finish_reason = reason
        if self.decoder is not None:
            self._flush(hold=0)
        self._pieces.put(None)
        self._done.set()

    def _flush(self, hold: int):
        """Stream new text, holding back `hold` chars that could start a stop string."""
        upto = len(self.text) - hold
        if upto > self._emitted:
            self._pieces.put(self.text[self._emitted:upto])
            self._emitted = upto

    # -- read by the caller ------------------------------------------------------------

    def wait(self, timeout=None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return RequestOutput(self.text, list(self.generated), list(self.prompt), self.finish_reason)

    def pieces(self):
        """Yield streamed text pieces (or token ids without a tokenizer) until the end."""
        while True:
            piece = self._pieces.get()
            if piece is None:
                return
            if isinstance(piece, BaseException):
                raise piece
            yield piece
