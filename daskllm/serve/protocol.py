"""The OpenAI HTTP protocol as typed models: what a client may send, and what it gets back.

Requests are validated here, before the engine sees them: an unknown field, a value out of
range or a feature daskllm does not have is a 400 naming the parameter. Two vLLM extensions
are accepted (`top_k`, `ignore_eos`), so clients written for vLLM work unchanged.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 64                 # choices per request; more is almost surely a client bug


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = True        # daskllm reports usage in the last chunk unless told not to


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)        # OpenAI's default: sampling
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)                         # vLLM extension; 0 = no limit
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False                            # vLLM extension
    user: Optional[str] = None                          # accepted and ignored, as OpenAI's own
    # OpenAI fields daskllm does not implement: accepted at their neutral value only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None
    logprobs: Union[bool, int, None] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(s == "" for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("logit_bias", None),
                              ("logprobs", None)):
            value = getattr(self, name)
            if value not in (neutral, False, {}):
                raise ValueError(f"{name} is not supported by daskllm (got {value!r}); leave it out")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: a text, a list of texts, token ids, or lists of token ids."""
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)         # OpenAI's default for completions
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _unsupported_completion(self):
        if self.echo:
            raise ValueError("echo is not supported by daskllm; leave it out")
        if self.best_of not in (None, 1, self.n):
            raise ValueError(f"best_of is not supported by daskllm (got {self.best_of}); use n")
        if self.suffix:
            raise ValueError("suffix is not supported by daskllm; leave it out")
        return self

    def prompts(self) -> list:
        """The prompts as a list, each a str or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ValueError("prompt is empty: give a text or a list of token ids")
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")           # tool_calls, name, ...: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # OpenAI's newer name for max_tokens

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


# -- responses ----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str] = None
    logprobs: None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "daskllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
