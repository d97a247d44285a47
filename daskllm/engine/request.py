"""Request: one prompt's generation, from acceptance to its last token, and its output.

A request is owned by the driver: its prompt and the tokens generated so far are the
truth, so when a replica is lost the request is re-run elsewhere from exactly there.
The scheduler thread writes it (add_token, fail); callers read it from any thread
(wait, pieces) and may cancel it; one lock orders the two.
"""
from __future__ import annotations

import itertools
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
    finish_reason: str                # "eos" | "stop" (a stop string) | "length" (max_new_tokens) | "cancelled"


class TextDecoder:
    """The text of a request's tokens: pieces as they come, and the whole text at the end.

    Pieces hold back the bytes of an unfinished character; the whole text is
    `tokenizer.decode(ids)`, which renders a trailing incomplete character as U+FFFD. So the
    final text equals what the tokenizer decodes, and its last piece carries that remainder.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._stream = tokenizer.stream_decoder()

    def step(self, token: int) -> str:
        return self._stream.step(token)

    def final(self, ids: list) -> str:
        return self._tokenizer.decode(ids)


@dataclass(eq=False)
class Request:
    prompt: list
    params: SamplingParams
    max_new_tokens: int
    eos_ids: tuple = ()
    stop: tuple = ()
    decoder: object = None            # TextDecoder (or anything with .step), None for token-only use
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
    _out: list = field(default_factory=list)          # every piece streamed so far (pieces() replays it)
    _cond: threading.Condition = field(default_factory=threading.Condition)
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
        """Append a generated token, update text, and finish on eos, stop string or length.

        A token that arrives after the request ended (it was cancelled meanwhile) is dropped."""
        with self._cond:
            if self.finished:
                return
            self.generated.append(token)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if token in self.eos_ids:
                return self._finish("eos")
            if self.decoder is not None:
                self.text += self.decoder.step(token)
                if self._cut_at_stop():
                    return self._finish("stop")
                self._flush(hold=max((len(s) for s in self.stop), default=1) - 1)
            else:
                self._put(token)
            if len(self.generated) >= self.max_new_tokens:
                self._finish("length")

    def fail(self, error: BaseException):
        with self._cond:
            if not self.finished:
                self.error = error
                self._done.set()
                self._cond.notify_all()

    def cancel(self) -> bool:
        """End the request now (finish_reason "cancelled"); its replica drops it and frees its KV
        cache at its next turn. False if it had already ended."""
        with self._cond:
            if self.finished:
                return False
            self._finish("cancelled")
            return True

    def _cut_at_stop(self) -> bool:
        for s in self.stop:
            cut = self.text.find(s)
            if cut >= 0:
                self.text = self.text[:cut]
                return True
        return False

    def _finish(self, reason: str):
        if self.decoder is not None and reason != "stop" and hasattr(self.decoder, "final"):
            # The whole text, as the tokenizer decodes the ids (a final eos is not text).
            ids = self.generated[:-1] if reason == "eos" else self.generated
            whole = self.decoder.final(ids)
            if whole.startswith(self.text):       # never take back text already streamed
                self.text = whole
                if self._cut_at_stop():
                    reason = "stop"
        self.finish_reason = reason
        if self.decoder is not None:
            self._flush(hold=0)
        self._done.set()
        self._cond.notify_all()

    def _flush(self, hold: int):
        """Stream new text, holding back `hold` chars that could start a stop string."""
        upto = len(self.text) - hold
        if upto > self._emitted:
            self._put(self.text[self._emitted:upto])
            self._emitted = upto

    def _put(self, piece):
        self._out.append(piece)
        self._cond.notify_all()

    # -- read by the caller ------------------------------------------------------------

    def wait(self, timeout=None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return RequestOutput(self.text, list(self.generated), list(self.prompt), self.finish_reason)

    def pieces(self):
        """Yield streamed text pieces (or token ids without a tokenizer) until the end.

        Replayable: each call starts from the first piece, so a second reader (or a second
        pass) sees the same pieces. Raises the request's error, if it failed, after its pieces."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._out) and not self.finished:
                    self._cond.wait()
                new, ended = self._out[i:], self.finished      # nothing is added after the end
            for piece in new:
                yield piece
            i += len(new)
            if ended:
                if self.error is not None:
                    raise self.error
                return
