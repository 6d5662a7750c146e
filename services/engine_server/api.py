"""OpenAI-compatible HTTP API of the emulated model server (spec engine.md §6)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from services.engine_server.prometheus import CONTENT_TYPE, EngineCollector, LoraInfo, registry_for, render
from services.engine_server.runner import CollectSink, EngineRunner
from services.engine_server.sse import SseResponse, SseSink, disconnected, usage
from services.engine_server.textgen import TextModel
from services.engine_server.writer import SocketWriter
from shared.core.engine import Request
from shared.core.roles import NodeRole

OFFLOOP_TOKENIZE_CHARS = 1024  # about 1-3 ms of tokenizing on this machine
OFFLOOP_PARSE_BYTES = 256 << 10  # about 20 ms of parsing and validating on this machine
MAX_BODY_BYTES = 32 << 20
"""The largest generation request body read (413 beyond), whatever the context length."""
BODY_BYTES_PER_TOKEN = 128
"""A server reads bodies up to this many bytes per token of its context (at least 1 MiB): a whole context as
JSON token ids is under 8 bytes a token, as text a few (up to 6 per character when escaped); parsing a body
holds the event loop (C code keeps the GIL), about 70 ms a MB here."""
SHOWN_NAME_CHARS = 200  # a client's model name is echoed in errors up to this long
LINGER_BYTES = 64 << 20
"""Past the body limit, up to this many more bytes are read and dropped before the 413 (a lingering close)."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Static facts the info endpoints report."""

    served_model_name: str
    model_path: str
    catalog_model: str
    gpu: str
    tp: int
    speedup: float
    max_model_len: int
    url: str = ""
    created: int = 0  # unix seconds the server started
    lora_modules: tuple[str, ...] = ()  # adapter names served beside the base model
    instance_id: str = "engine-0"
    vocab_size: int = 0  # the emulated model's (prompt token ids must lie below it); 0: the shipped tokenizer's


class StreamOptions(BaseModel):
    """``stream_options`` of the OpenAI API."""

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    priority: int = 0
    n: int = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    # the emulated model does not sample, but the values a real server refuses are refused here too (vLLM)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    logprobs: Any = None  # completions: int; chat: bool
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    kv_transfer_params: dict[str, Any] | None = None  # vLLM P/D: set by the proxy

    def unsupported(self) -> str | None:
        """Why the emulated model cannot serve this request as asked (a 400), or None."""
        if self.n > 1 or (self.best_of or 1) > 1:
            return "n > 1 and best_of > 1 are not supported by this server: send one request per sample"
        # (``is``: ``0 in (None, False)`` holds, and completions' ``logprobs: 0`` asks for the sampled token's)
        if (self.logprobs is not None and self.logprobs is not False) or self.top_logprobs or (
                self.prompt_logprobs is not None):
            return "logprobs are not supported by this server (the emulated model has no probabilities)"
        if self.echo:
            return "echo is not supported by this server"
        return None


class CompletionRequest(_Common):
    """POST /v1/completions body (one prompt: text or token ids)."""

    prompt: str | list[int] | list[str] | list[list[int]]


class ContentPart(BaseModel):
    """One part of a chat message's content; only text parts are read (others, e.g. images, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    """One chat message; content may be text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class ChatRequest(_Common):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)


Endpoint = Callable[[Any], Awaitable[Any]]


class ServerApp(FastAPI):
    """The FastAPI app with a short way in for the two generation endpoints.

    A completion request that parses and validates goes straight from the HTTP server to its endpoint
    function: FastAPI's routing, dependency solving and its eight layers of ASGI middleware cost about as
    much CPU per request as streaming a hundred tokens. The body is parsed and validated exactly as FastAPI
    would (stdlib ``json`` then the same pydantic model), so anything else (not JSON, malformed, invalid)
    is replayed into FastAPI, which answers it as before (a clear 4xx).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_routes: dict[str, tuple[type[BaseModel], Endpoint]] = {}
        self.body_limit = MAX_BODY_BYTES  # bytes of a generation request body (413 beyond)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Generation requests by the short way, everything else through FastAPI."""
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.fast_routes.get(scope["path"])
            if route is not None:
                await self._fast(route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _fast(self, route: tuple[type[BaseModel], Endpoint], scope: Scope, receive: Receive,
                    send: Send) -> None:
        msg = await receive()
        if msg["type"] != "http.request":
            return  # the client went away before its body arrived
        body: bytes = msg.get("body", b"")
        if msg.get("more_body", False):  # a body in several pieces: joined once (``+=`` copied it per piece)
            got = await _rest_of_body(body, receive, self.body_limit)
            if got is None:
                return
            if isinstance(got, Response):
                await got(scope, receive, send)
                return
            body = got
        model, endpoint = route
        if len(body) > OFFLOOP_PARSE_BYTES:
            # parsed and judged on a worker thread (the event loop gets the GIL back every switch interval): an
            # 11 MB body of token ids held the loop, every stream and the engine's steps, for 1.9 s
            judged = await asyncio.to_thread(_judge_large_body, model, scope, body)
            if isinstance(judged, Response):
                await judged(scope, receive, send)
                return
            parsed = judged
        else:
            try:
                parsed = _parse_json_body(model, scope, body)
            except RecursionError:  # nested deeper than the JSON decoder goes: FastAPI's own parse would 500
                await _error(400, _TOO_DEEP)(scope, receive, send)
                return
        if parsed is None:
            await super().__call__(scope, _replay(body, receive), send)
            return
        result = await endpoint(parsed)
        response = result if isinstance(result, Response) else JSONResponse(result)
        await response(scope, receive, send)


_TOO_DEEP = "body is not JSON this server can read: nested too deep"


def _judge_large_body(model: type[BaseModel], scope: Scope, body: bytes) -> BaseModel | Response | None:
    """A large body as ``model``, or its 400 judged here as FastAPI would word it (FastAPI would parse it
    again, on the event loop); None when not typed as JSON (FastAPI refuses that without parsing)."""
    try:
        parsed = _parse_json_body(model, scope, body, strict=True)
    except RecursionError:
        return _error(400, _TOO_DEEP)
    except ValidationError as err:
        return validation_error(err.errors())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        return _error(400, f"body is not valid JSON ({err})")
    return parsed


def validation_error(errors: Sequence[Any]) -> JSONResponse:
    """The 400 naming a body's first validation error (as pydantic's ``errors()`` lists them)."""
    first = errors[0] if errors else {"msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        ctx = first.get("ctx")
        why = ctx.get("error", "decode error") if isinstance(ctx, dict) else "decode error"
        return _error(400, f"body is not valid JSON ({why})")
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return _error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))


def _parse_json_body(model: type[BaseModel], scope: Scope, body: bytes, strict: bool = False) -> BaseModel | None:
    """``body`` as ``model`` when it is a valid JSON request; None when FastAPI must judge it."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            mime = value.split(b";", 1)[0].strip().lower()
            if mime != b"application/json" and not (mime.startswith(b"application/") and mime.endswith(b"+json")):
                return None
            break
    else:
        return None
    if strict:  # errors raise
        return model.model_validate(json.loads(body))
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


async def _rest_of_body(first: bytes, receive: Receive, limit: int) -> bytes | Response | None:
    """The whole body after its ``first`` piece; a 413 past ``limit`` bytes (once the rest is read and dropped, up
    to ``LINGER_BYTES``; beyond that the connection is closed with it unread); None when the client went away."""
    pieces, size = [first], len(first)
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        piece = msg.get("body", b"")
        size += len(piece)
        if size > limit:
            pieces.clear()
            if msg.get("more_body", False):
                await _drop_rest(receive, LINGER_BYTES)
            return _error(413, f"request body larger than {limit} bytes", close=True)
        pieces.append(piece)
        if not msg.get("more_body", False):
            return b"".join(pieces)


async def _drop_rest(receive: Receive, most: int) -> None:
    """Read and drop the rest of a refused body, up to ``most`` bytes: closing with input unread makes the kernel
    reset the connection, and a reset can reach the client before the refusal it was sent after, which is then
    lost (a proxy reports a reset instead). A client trickling its rest is cut off by the server's read timeout."""
    dropped = 0
    while dropped <= most:
        msg = await receive()
        if msg["type"] != "http.request" or not msg.get("more_body", False):
            return
        dropped += len(msg.get("body", b""))


class CollectedResponse(Response):
    """A non-streamed answer: the JSON of a request once it ends, or nothing (the request aborted) when the
    client goes away first. A vanished client's request used to run to its end (up to the whole context of
    tokens) holding its KV blocks and batch slot; vLLM aborts it too."""

    def __init__(self, sink: CollectSink, answer: Callable[[str, int | None], dict[str, Any]],
                 on_close: Callable[[], None]) -> None:
        super().__init__()
        self.sink = sink
        self.answer = answer
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Wait for the end or the client's disconnect, whichever comes first."""
        done = self.sink.done
        try:
            if not done.done():
                gone = asyncio.ensure_future(disconnected(receive))
                try:
                    await asyncio.wait((done, gone), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
                if not done.done():
                    return  # the client went away: nobody to answer (``on_close`` aborts the request)
            reason, stop_reason = done.result()
        finally:
            self.on_close()  # no-op once finished; frees the request if the client vanished or we were cancelled
        await JSONResponse(self.answer(reason, stop_reason))(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out ``body`` (already read) first, then defers to the connection's."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


_KINDS = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-shaped error's JSON (vLLM's ``type`` names), for every refusal the server makes."""
    kind = _KINDS.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    """An OpenAI-shaped error; ``close``: end the connection after it (unread input)."""
    return JSONResponse(error_body(status, message), status_code=status,
                        headers={"connection": "close"} if close else None)


def _shown(name: str) -> str:
    """A client's name as echoed in an error: cut short (a megabyte name must not come back whole)."""
    return name if len(name) <= SHOWN_NAME_CHARS else name[:SHOWN_NAME_CHARS] + "..."


def create_app(runner: EngineRunner, text: TextModel, info: ServerInfo,
               more_metrics: Iterable[Collector] = (), *, fail_generations: bool = False) -> ServerApp:
    """The FastAPI app around a running :class:`EngineRunner`; ``more_metrics``: figures ``/metrics`` shows beside
    the engine's (the NATS publisher's); ``fail_generations``: every completion is answered 500 (chaos tests)."""
    app = ServerApp(title="Gantry emulated model server")
    app.body_limit = min(MAX_BODY_BYTES, max(1 << 20, BODY_BYTES_PER_TOKEN * info.max_model_len))
    writer = SocketWriter()
    app.state.writer = writer
    runner.on_flush.append(writer.flush)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors())

    @app.exception_handler(HTTPException)
    async def _http_error(_: HttpRequest, exc: HTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot decode, an unknown path or method) in the OpenAI shape too
        return _error(exc.status_code, str(exc.detail))

    _info_routes(app, runner, info, more_metrics)
    gen = Generation(runner, text, info, writer, fail_generations)
    app.post("/v1/completions", response_model=None)(gen.completions)
    app.post("/v1/chat/completions", response_model=None)(gen.chat)
    app.fast_routes["/v1/completions"] = (CompletionRequest, gen.completions)
    app.fast_routes["/v1/chat/completions"] = (ChatRequest, gen.chat)
    return app


def _info_routes(app: FastAPI, runner: EngineRunner, info: ServerInfo, more_metrics: Iterable[Collector]) -> None:
    """The read-only endpoints: health, the model list, Prometheus metrics and SGLang's info and load probes."""
    sched = runner.engine.scheduler

    @app.get("/health")
    async def health() -> PlainTextResponse:
        """Liveness: 200 while the server runs."""
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one served model."""
        base = {"id": info.served_model_name, "object": "model", "created": info.created, "owned_by": "gantry",
                "root": info.model_path, "parent": None, "max_model_len": info.max_model_len}
        adapters = [{**base, "id": name, "root": name, "parent": info.served_model_name}
                    for name in info.lora_modules]
        return {"object": "list", "data": [base, *adapters]}

    def lora_info() -> LoraInfo:
        st = sched.lora_stats()
        return LoraInfo(st.max_loras, tuple(st.running), tuple(st.waiting))

    registry = registry_for(EngineCollector(runner, info.served_model_name, lora_info), *more_metrics)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text under vLLM's metric names."""
        return Response(render(registry), media_type=CONTENT_TYPE)

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        """SGLang-style server facts (routers probe ``model_path`` and capacities)."""
        cfg = sched.config
        return {
            "model_path": info.model_path, "tokenizer_path": info.model_path,
            "served_model_name": info.served_model_name, "emulated_model": info.catalog_model,
            "instance_id": info.instance_id,
            "gpu": info.gpu, "tp_size": info.tp, "dp_size": 1, "speedup": info.speedup,
            "context_length": info.max_model_len, "page_size": cfg.block_size,
            "max_total_num_tokens": (cfg.num_gpu_blocks - 1) * cfg.block_size,
            "max_running_requests": cfg.max_num_seqs, "chunked_prefill_size": cfg.max_num_batched_tokens,
            "enable_prefix_caching": cfg.enable_prefix_caching, "schedule_policy": cfg.policy,
        }

    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        """SGLang-style model facts."""
        return {"model_path": info.model_path, "tokenizer_path": info.model_path, "is_generation": True,
                "served_model_name": info.served_model_name}

    @app.get("/get_load")
    async def get_load() -> list[dict[str, int]]:
        """SGLang-style load report, one entry per data-parallel rank (one here)."""
        return [{"dp_rank": 0, "num_reqs": len(sched.running) + sched.num_waiting,
                 "num_waiting_reqs": sched.num_waiting, "num_tokens": sched.kv.num_used * sched.config.block_size}]


class Generation:
    """The two generation endpoints (completions, chat completions): a request checked as vLLM checks it, handed
    to the engine, and answered as a stream or as one JSON once it ends."""

    def __init__(self, runner: EngineRunner, text: TextModel, info: ServerInfo, writer: SocketWriter,
                 fail_generations: bool = False) -> None:
        self.runner = runner
        self.sched = runner.engine.scheduler
        self.text = text
        self.info = info
        self.writer = writer
        self.fail_generations = fail_generations
        # the emulated model's vocabulary (a trace of its real token ids replays as sent), at least the shipped
        # tokenizer's (whose ids a text prompt becomes)
        self.vocab_size = max(text.vocab_size, info.vocab_size)

    async def completions(self, body: CompletionRequest) -> Any:
        """OpenAI completions, streaming or not."""
        p = body.prompt
        one: str | list[int]
        if not isinstance(p, str) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                return _error(400, "one prompt per request is supported")
            p = p[0]
        if isinstance(p, str):
            one = p
        elif len(p) > self.info.max_model_len:  # judged before the ids are copied and range-checked on the loop
            return _error(400, f"prompt has more tokens than this model's maximum context of "
                               f"{self.info.max_model_len} tokens")
        else:  # token ids (validated as list[int])
            one = list(map(int, p))  # type: ignore[arg-type]
        ids = await self._encode(one) if isinstance(one, str) else one
        if isinstance(ids, JSONResponse):
            return ids
        if not ids:
            return _error(400, "prompt is empty")
        if not isinstance(one, str) and (bad := self._out_of_vocab(ids)) is not None:
            return bad
        return await self._serve(body, ids, "cmpl", chat=False)

    async def chat(self, body: ChatRequest) -> Any:
        """OpenAI chat completions, streaming or not."""
        ids = await self._encode(self.text.render_chat([(m.role, m.text()) for m in body.messages]))
        if isinstance(ids, JSONResponse):
            return ids
        return await self._serve(body, ids, "chatcmpl", chat=True)

    async def _encode(self, prompt: str) -> list[int] | JSONResponse:
        # long prompts are tokenized on a thread so the step loop keeps its deadlines
        try:
            if len(prompt) < OFFLOOP_TOKENIZE_CHARS:
                return self.text.encode(prompt)
            return await asyncio.to_thread(self.text.encode_off_gil, prompt)
        except TypeError:  # a lone UTF-16 surrogate (JSON allows "\ud800") is no text the tokenizer takes
            return _error(400, "prompt is not valid Unicode text (it holds a lone surrogate)")

    def _out_of_vocab(self, ids: list[int]) -> JSONResponse | None:
        """A 400 for token ids the model has no token for (vLLM's check), else None."""
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            return _error(400, f"Token id {low if low < 0 else high} is out of vocabulary")
        return None

    def _adapter(self, body: _Common) -> str | JSONResponse | None:
        """The LoRA adapter a request names (None for the base model), or a 404 for an unknown model."""
        if body.model is None or body.model == self.info.served_model_name:
            return None
        if body.model in self.info.lora_modules:
            return body.model
        return _error(404, f"The model `{_shown(body.model)}` does not exist.")

    def _request(self, body: _Common, prompt_ids: list[int], prefix: str) -> Request | JSONResponse:
        why = body.unsupported()
        if why is not None:
            return _error(400, why)
        lora = self._adapter(body)
        if isinstance(lora, JSONResponse):
            return lora
        # as vLLM without a KV connector, a server that is not a P/D decode engine prefills locally (a prefill
        # engine refuses the request: the engine says why)
        remote = bool(body.kv_transfer_params and body.kv_transfer_params.get("do_remote_prefill")) and (
            self.sched.config.role is not NodeRole.MIXED)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        max_tokens = self._max_tokens(body, len(prompt_ids), prefix)
        if isinstance(max_tokens, JSONResponse):
            return max_tokens
        text = self.text
        return Request(
            rid, prompt_ids, max_tokens=max_tokens, min_tokens=body.min_tokens,
            stop_token_ids=body.stop_token_ids, eos_token_id=text.eos_token_id, ignore_eos=body.ignore_eos,
            priority=body.priority, sampled_token_ids=text.sample(rid, max_tokens, body.ignore_eos),
            filler_token=text.filler, lora=lora, remote_prefill=remote,
        )

    def _max_tokens(self, body: _Common, prompt_len: int, prefix: str) -> int | JSONResponse:
        """How many tokens the request may generate (vLLM's defaults and checks), or its 400."""
        limit = body.max_completion_tokens or body.max_tokens
        if limit and body.min_tokens > limit:
            return _error(400, f"min_tokens must be less than or equal to max_tokens={limit}, got {body.min_tokens}")
        room = self.info.max_model_len - prompt_len
        if room < 1:
            return _error(400, f"prompt has {prompt_len} tokens; this model's maximum context is "
                               f"{self.info.max_model_len} tokens")
        max_tokens = min(limit, room) if limit else (room if prefix == "chatcmpl" else min(16, room))
        if not limit and body.min_tokens > max_tokens:  # the default length: checked against it as vLLM does
            return _error(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got "
                               f"{body.min_tokens}")
        return max_tokens

    async def _serve(self, body: _Common, ids: list[int], prefix: str, chat: bool) -> Any:
        if self.fail_generations:
            return _error(500, "this server fails every generation (--fail-generations)")
        req = self._request(body, ids, prefix)
        if isinstance(req, JSONResponse):
            return req
        model = req.lora or self.info.served_model_name
        created = int(time.time())
        text, runner = self.text, self.runner
        sink: SseSink | CollectSink
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sink = SseSink(req.req_id, model, created, chat, include_usage, text.json_piece, text.eos_token_id,
                           text.json_pieces)
        else:
            sink = CollectSink()
        try:
            runner.submit(req, sink)
        except ValueError as err:
            return _error(400, str(err))
        if isinstance(sink, SseSink):
            return SseResponse(sink, lambda: runner.abort(req), self.writer)
        collected = sink

        def answer(reason: str, stop_reason: int | None) -> dict[str, Any]:
            return self._answer(req, collected.token_ids, reason, stop_reason, model, created, chat)

        return CollectedResponse(collected, answer, lambda: runner.abort(req))

    def _answer(self, req: Request, token_ids: list[int], reason: str, stop_reason: int | None, model: str,
                created: int, chat: bool) -> dict[str, Any]:
        visible = [t for t in token_ids if t != self.text.eos_token_id]
        content = self.text.detokenize(visible)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if stop_reason is not None:
            choice["stop_reason"] = stop_reason
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        out: dict[str, Any] = {
            "id": req.req_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": usage(req, len(visible)),
        }
        handoff = req.kv_handoff
        if handoff is not None:  # a prefill engine: what the decode side needs to pull this request's KV
            info = self.info
            out["kv_transfer_params"] = {
                "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": info.instance_id,
                "remote_request_id": handoff.req_id, "remote_host": info.url, "num_tokens": handoff.num_tokens,
                "num_bytes": handoff.num_bytes,
            }
        return out
