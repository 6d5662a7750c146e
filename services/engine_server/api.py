"""OpenAI-compatible HTTP API of the emulated model server (spec engine.md §6)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.engine_server.prometheus import render_metrics
from services.engine_server.runner import EngineRunner, Stream
from services.engine_server.textgen import TextModel
from shared.core.engine import Request


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
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Common):
    """POST /v1/completions body (one prompt: text or token ids)."""

    prompt: str | list[int] | list[str] | list[list[int]]


class ChatMessage(BaseModel):
    """One chat message; content may be text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


class ChatRequest(_Common):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}},
        status_code=status,
    )


def create_app(runner: EngineRunner, text: TextModel, info: ServerInfo) -> FastAPI:
    """The FastAPI app around a running :class:`EngineRunner`."""
    app = FastAPI(title="Gantry emulated model server")
    sched = runner.engine.scheduler

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.get("/health")
    async def health() -> PlainTextResponse:
        """Liveness: 200 while the server runs."""
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one served model."""
        return {"object": "list", "data": [{
            "id": info.served_model_name, "object": "model", "created": info.created, "owned_by": "gantry",
            "root": info.model_path, "parent": None, "max_model_len": info.max_model_len,
        }]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text under vLLM's metric names."""
        c = sched.counters
        body = render_metrics(
            model_name=info.served_model_name,
            running=len(sched.running),
            waiting=sched.num_waiting,
            kv_usage=sched.kv_usage,
            block_size=sched.config.block_size,
            num_gpu_blocks=sched.config.num_gpu_blocks,
            counters={"prefix_queries": c.prefix_queries, "prefix_hits": c.prefix_hits,
                      "preemptions": c.preemptions, "prompt_tokens": c.prompt_tokens,
                      "generation_tokens": c.generation_tokens},
            finished_by_reason=c.finished_by_reason,
            hists=runner.hists,
        )
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        """SGLang-style server facts (routers probe ``model_path`` and capacities)."""
        cfg = sched.config
        return {
            "model_path": info.model_path, "tokenizer_path": info.model_path,
            "served_model_name": info.served_model_name, "emulated_model": info.catalog_model,
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

    def _submit(body: _Common, prompt_ids: list[int], prefix: str) -> Stream | JSONResponse:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        prompt_len = len(prompt_ids)
        limit = body.max_completion_tokens or body.max_tokens
        room = info.max_model_len - prompt_len
        if room < 1:
            return _error(400, f"prompt has {prompt_len} tokens; this model's maximum context is "
                               f"{info.max_model_len} tokens")
        max_tokens = min(limit, room) if limit else (room if prefix == "chatcmpl" else min(16, room))
        req = Request(
            rid, prompt_ids, max_tokens=max_tokens, min_tokens=body.min_tokens,
            stop_token_ids=body.stop_token_ids, eos_token_id=text.eos_token_id, ignore_eos=body.ignore_eos,
            priority=body.priority, sampled_token_ids=text.sample(rid, max_tokens, body.ignore_eos),
            filler_token=text.filler,
        )
        try:
            return runner.submit(req)
        except ValueError as err:
            return _error(400, str(err))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HttpRequest) -> Any:
        """OpenAI completions, streaming or not."""
        p = body.prompt
        one: str | list[int]
        if isinstance(p, str):
            one = p
        elif p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                return _error(400, "one prompt per request is supported")
            first = p[0]
            one = first if isinstance(first, str) else [int(x) for x in first]
        else:  # token ids (validated as list[int])
            one = [int(x) for x in p if isinstance(x, int)]
        ids = text.encode(one) if isinstance(one, str) else one
        if not ids:
            return _error(400, "prompt is empty")
        st = _submit(body, ids, "cmpl")
        if isinstance(st, JSONResponse):
            return st
        return await _respond(st, body, http, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, http: HttpRequest) -> Any:
        """OpenAI chat completions, streaming or not."""
        ids = text.chat_prompt([(m.role, m.text()) for m in body.messages])
        st = _submit(body, ids, "chatcmpl")
        if isinstance(st, JSONResponse):
            return st
        return await _respond(st, body, http, chat=True)

    async def _respond(st: Stream, body: _Common, http: HttpRequest, chat: bool) -> Any:
        model = body.model or info.served_model_name
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(st, model, created, chat, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces: list[int] = []
        try:
            while True:
                item = await st.queue.get()
                pieces.extend(item.token_ids)
                if item.finish_reason is not None:
                    break
        finally:
            runner.abort(st.req)  # no-op once finished; frees the request if the client vanished
        visible = [t for t in pieces if t != text.eos_token_id]
        content = text.detokenize(visible)
        choice: dict[str, Any] = {"index": 0, "finish_reason": item.finish_reason, "logprobs": None}
        if item.stop_reason is not None:
            choice["stop_reason"] = item.stop_reason
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return {
            "id": st.req.req_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": _usage(st, len(visible)),
        }

    def _usage(st: Stream, completion: int) -> dict[str, Any]:
        return {"prompt_tokens": st.req.prompt_len, "completion_tokens": completion,
                "total_tokens": st.req.prompt_len + completion,
                "prompt_tokens_details": {"cached_tokens": max(st.req.num_cached_tokens, 0)}}

    async def _sse(st: Stream, model: str, created: int, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        rid = st.req.req_id

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        produced = 0
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            # token chunks are the hot path: a fixed JSON frame around the escaped text
            head = json.dumps({"id": rid, "object": kind, "created": created, "model": model},
                              separators=(",", ":"))[:-1].encode()
            if chat:
                pre, post = head + b',"choices":[{"index":0,"delta":{"content":', b'},"logprobs":null,'
            else:
                pre, post = head + b',"choices":[{"index":0,"text":', b',"logprobs":null,'
            post += b'"finish_reason":null}]' + (b',"usage":null}' if include_usage else b"}")
            eos = text.eos_token_id
            while True:
                item = await st.queue.get()
                visible = [t for t in item.token_ids if t != eos]
                # a client slower than the engine gets what accumulated in one chunk (as vLLM does)
                while item.finish_reason is None and not st.queue.empty():
                    item = st.queue.get_nowait()
                    visible += [t for t in item.token_ids if t != eos]
                produced += len(visible)
                if visible:
                    piece = json.dumps(text.detokenize(visible)).encode()
                    yield b"data: " + pre + piece + post + b"\n\n"
                if item.finish_reason is not None:
                    final: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": item.finish_reason}
                    if item.stop_reason is not None:
                        final["stop_reason"] = item.stop_reason
                    if chat:
                        final["delta"] = {}
                    else:
                        final["text"] = ""
                    yield chunk([final])
                    break
            if include_usage:
                yield chunk([], _usage(st, produced))
            yield b"data: [DONE]\n\n"
        finally:
            runner.abort(st.req)

    return app
