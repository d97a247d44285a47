"""The FastAPI application: one handler per endpoint of the OpenAI API, on top of the engine.

Handlers check the request (model, parameters, prompt), start a Generation and write it out
as one JSON response or as server-sent events. Every refusal is OpenAI's error JSON
(`{"error": {"message", "type", "param", "code"}}`) and the server keeps serving.
"""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.router import NoReplicaError
from ..engine.validate import RequestError
from ..runtime.replica import ReplicaError
from .adapter import Engine, NoChatTemplate
from .generation import ClientGone, Generation
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, Delta,
                       ErrorInfo, ErrorResponse, ModelCard, ModelList, Usage, new_id)


class APIError(Exception):
    """A refusal, sent as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def build_app(llm, *, model_name: str | None = None, api_key: str | None = None,
              chat_template: str | None = None) -> FastAPI:
    """The OpenAI-compatible app serving `llm` (an `LLM`).

    model_name: the name clients pass as `model` (default: the checkpoint directory's name).
    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
    chat_template: a jinja2 template file to use instead of the model's own.
    """
    engine = Engine(llm)
    name = model_name or Path(llm.path).name
    template = engine.chat_template(chat_template)
    metrics = Metrics(engine)
    app = FastAPI(title="daskllm", summary="OpenAI-compatible API on a Dask cluster", docs_url=None,
                  redoc_url=None)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, name
    _install_error_handlers(app, metrics)

    async def authorize(request: Request):      # async: no thread hop per request
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid API key: send the server's key as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(requested: str):
        if requested != name:
            raise APIError(400, f"model {requested!r} is not served here; this server serves {name!r}",
                           param="model", code="model_not_found")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health():
        if not engine.healthy():
            raise APIError(503, "no live replica", type="server_error")
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus():
        return Response(await run_in_threadpool(metrics.exposition), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, max_model_len=engine.context)])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        check_model(body.model)
        prompts = [_checked(engine.prompt_ids, p, body.max_tokens, param="prompt")
                   for p in _checked(body.prompts, param="prompt")]
        gen = _checked(Generation.start, engine, prompts, body, body.max_tokens, param="max_tokens")
        rid = new_id("cmpl")
        if body.stream:
            return _event_stream(_completion_events(gen, rid, name, body.include_usage), gen, metrics,
                                 "completions")
        choices = await _finished(gen, http_request, metrics, "completions")
        return CompletionResponse(id=rid, model=name, usage=Usage.of(gen.prompt_tokens, gen.completion_tokens),
                                  choices=[CompletionChoice(index=c.index, text=c.text,
                                                            finish_reason=c.finish_reason) for c in choices])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        check_model(body.model)
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
        prompt = _checked(engine.chat_prompt_ids, template, messages, body.token_limit(), param="messages")
        gen = _checked(Generation.start, engine, [prompt], body, body.token_limit(), param="max_tokens")
        rid = new_id("chatcmpl")
        if body.stream:
            return _event_stream(_chat_events(gen, rid, name, body.include_usage), gen, metrics,
                                 "chat/completions")
        choices = await _finished(gen, http_request, metrics, "chat/completions")
        return ChatCompletionResponse(
            id=rid, model=name, usage=Usage.of(gen.prompt_tokens, gen.completion_tokens),
            choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                                finish_reason=c.finish_reason) for c in choices])

    app.include_router(v1)
    return app


def _checked(fn, *args, param):
    """fn(*args), with the engine's refusals turned into a 400 naming `param`."""
    try:
        return fn(*args)
    except NoChatTemplate as e:
        raise APIError(400, str(e), param="messages", code="no_chat_template") from e
    except (RequestError, ValueError) as e:
        code = "context_length_exceeded" if "context" in str(e) or "KV cache" in str(e) else None
        raise APIError(400, str(e), param=param, code=code) from e


async def _finished(gen: Generation, http_request, metrics, endpoint) -> list:
    """Await every choice; a client that leaves first aborts them (and gets nothing)."""
    try:
        choices = await gen.results(http_request)
    except ClientGone:
        metrics.requests.labels(endpoint, "499").inc()        # nginx's "client closed request"
        raise
    _record(gen, metrics, endpoint)
    return choices


def _record(gen: Generation, metrics, endpoint):
    metrics.prompt_tokens.inc(gen.prompt_tokens)
    metrics.generation_tokens.inc(gen.completion_tokens)
    ttft = gen.time_to_first_token()
    if ttft is not None:
        metrics.ttft.observe(ttft)
    metrics.latency.labels(endpoint).observe(time.monotonic() - gen.arrived)
    metrics.requests.labels(endpoint, "200").inc()


# -- server-sent events ---------------------------------------------------------------------

class _EventStream(StreamingResponse):
    """An SSE response whose generator is always closed, so a client that leaves aborts its
    requests even when the server notices only at the next write."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _event_stream(events, gen: Generation, metrics, endpoint) -> StreamingResponse:
    async def body():
        status = None                       # stays None if the client goes away mid-stream
        try:
            async for event in events:
                yield f"data: {event}\n\n"
            status = 200
        except Exception as error:   # noqa: BLE001 - headers are sent: report in the stream, as OpenAI does
            failure = _server_error(error)
            status = failure.status
            yield f"data: {json.dumps(failure.body())}\n\n"
        finally:
            gen.abort()
            if status != 200:
                metrics.requests.labels(endpoint, str(status or 499)).inc()
        if status == 200:
            _record(gen, metrics, endpoint)
        yield "data: [DONE]\n\n"
    return _EventStream(body(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _completion_events(gen: Generation, rid, name, include_usage):
    async for index, piece, finish in gen.stream():
        choice = CompletionChoice(index=index, text=piece or "", finish_reason=finish)
        yield CompletionResponse(id=rid, model=name, choices=[choice]).model_dump_json()
    if include_usage:
        yield CompletionResponse(id=rid, model=name, choices=[],
                                 usage=Usage.of(gen.prompt_tokens, gen.completion_tokens)).model_dump_json()


async def _chat_events(gen: Generation, rid, name, include_usage):
    for index in range(len(gen.requests)):       # the role first, as OpenAI sends it
        yield ChatCompletionChunk(id=rid, model=name, choices=[
            ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))]).model_dump_json()
    async for index, piece, finish in gen.stream():
        delta = Delta(content=piece) if piece is not None else Delta()
        yield ChatCompletionChunk(id=rid, model=name, choices=[
            ChatChunkChoice(index=index, delta=delta, finish_reason=finish)]).model_dump_json()
    if include_usage:
        yield ChatCompletionChunk(id=rid, model=name, choices=[],
                                  usage=Usage.of(gen.prompt_tokens, gen.completion_tokens)).model_dump_json()


# -- errors ---------------------------------------------------------------------------------

def _server_error(error: Exception) -> APIError:
    if isinstance(error, (NoReplicaError, ReplicaError)):
        return APIError(503, str(error), type="server_error", code="replica_unavailable")
    return APIError(500, f"{type(error).__name__}: {error}", type="server_error")


def _install_error_handlers(app: FastAPI, metrics):
    def respond(request: Request, error: APIError) -> JSONResponse:
        endpoint = request.url.path.removeprefix("/v1/")
        metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return respond(request, error)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = f"unknown parameter {where[-1]!r}" if where else "unknown parameter"
        elif first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
        param = ".".join(where) or None
        return respond(request, APIError(400, f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return respond(request, APIError(error.status_code, str(error.detail),
                                         type="not_found_error" if error.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        return Response(status_code=499)        # nobody reads it: the client is gone

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return respond(request, _server_error(error))
