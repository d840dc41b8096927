"""The FastAPI application: OpenAI's `POST /v1/completions` (prompt string or list, `suffix` for
fill-in-the-middle, `n`, `stop`, `seed`, streaming as server-sent events), `GET /v1/models`, a
llama.cpp-style `POST /infill`, and `GET /health` (slots in use, queue, compiles).

Every error is OpenAI's error JSON: 400 for a bad request (schema, values, a prompt longer than the
context by how much), 401 for a missing or wrong API key, 404 for another model's name, 429 when the
slots and the queue are full, 503 while shutting down. A client that goes away frees its rows at the
engine's next round.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from codegen_jax.errors import UserError
from codegen_jax.sample import Generator, check_options
from codegen_jax.sample.scheduler import Request, Result
from codegen_jax.serve import protocol
from codegen_jax.serve.protocol import ApiError, CompletionRequest, InfillRequest
from codegen_jax.serve.worker import Busy, Worker


class _Call:
    """One HTTP request's rows: their results and streamed text arrive on an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events = loop, asyncio.Queue()

    def post(self, event: tuple) -> None:  # from the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def create_app(gen: Generator, worker: Worker, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="codegen-jax", docs_url=None, redoc_url=None)
    tok, ctx = gen.tokenizer, gen.model_cfg.max_seq_len

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid JSON")
        return JSONResponse(ApiError(400, message, param=where).body(), status_code=400)

    if api_key:
        app.add_middleware(_ApiKey, key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = "error" if worker.error is not None else "ok"
        return {"status": status, "model": model_name, **worker.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "codegen-jax"}]}

    def rows(req: CompletionRequest, prompts: list[str], call: _Call, tag: object) -> tuple[list[Request], int]:
        """The request's rows (prompt i, sample j) and its prompt token count, validated."""
        protocol.unsupported(req)
        if req.model not in (None, "", model_name):
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        try:
            check_options(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, num_samples=req.n)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        if max_tokens >= ctx:
            raise ApiError(400, f"max_tokens ({max_tokens}) must be below the context ({ctx})", param="max_tokens")
        if len(prompts) * req.n > worker.slots + worker.max_queue:  # 429 would ask for a retry that never fits
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is more rows than this server holds at once "
                           f"({worker.slots} slots + {worker.max_queue} queued); send fewer", param="n")
        stops = protocol.stops(req)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        out, n_prompt = [], 0
        for i, text in enumerate(prompts):
            if req.suffix is not None:
                if tok.fim is None:
                    raise ApiError(400, "this model has no fill-in-the-middle tokens: suffix is not supported",
                                   param="suffix")
                pre, mid, suf = tok.fim.names[0], tok.fim.names[1], tok.fim.names[2]
                text = f"{pre}{text}{suf}{req.suffix}{mid}"
            ids = gen.encode_prompt(text)
            if len(ids) + max_tokens > ctx:
                raise ApiError(400, f"prompt {i} has {len(ids)} tokens and max_tokens is {max_tokens}: "
                               f"{len(ids) + max_tokens - ctx} more than the context of {ctx}", param="prompt")
            n_prompt += len(ids)
            for j in range(req.n):
                index = i * req.n + j
                out.append(Request(ids, max_tokens, req.temperature, 0, req.top_p, 0.0, stop=stops, seed=seed,
                                   key=(i, j), tag=tag,
                                   on_text=(lambda d, index=index: call.post(("text", index, d))) if req.stream
                                   else None))
        return out, n_prompt

    def start(requests: list[Request], call: _Call) -> None:
        try:
            worker.submit(requests, lambda res: call.post(("done", res.request.key, res)))
        except Busy as e:
            status = 503 if worker.error is not None or "shutting down" in str(e) else 429
            raise ApiError(status, f"the server is busy: {e}; retry later",
                           type_="server_error" if status == 503 else "rate_limit_error") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        call, tag = _Call(asyncio.get_running_loop()), object()
        requests, n_prompt = rows(body, prompts, call, tag)
        start(requests, call)
        cid = protocol.completion_id()
        if body.stream:
            return StreamingResponse(_stream(call, tag, cid, len(requests), body.n), media_type="text/event-stream")
        results = await _gather(call, tag, len(requests), http)
        choices = [protocol.choice(i * body.n + j, res.text, protocol.finish_reason(res.finish_reason))
                   for (i, j), res in sorted(results.items())]
        completion = sum(len(r.tokens) for r in results.values())
        return protocol.response(cid, model_name, choices, n_prompt, completion)

    async def _gather(call: _Call, tag: object, n: int, http: HttpRequest) -> dict[tuple, Result]:
        results: dict[tuple, Result] = {}
        try:
            while len(results) < n:
                try:
                    kind, key, res = await asyncio.wait_for(call.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if kind == "done":
                    results[key] = res
        except BaseException:
            worker.cancel(tag)  # the client went away: free its slots
            raise
        _raise_if_failed(results.values())
        return results

    async def _stream(call: _Call, tag: object, cid: str, n: int, per_prompt: int) -> AsyncIterator[str]:
        done = 0
        try:
            while done < n:
                kind, key, payload = await call.events.get()
                if kind == "text":
                    yield _sse(protocol.chunk(cid, model_name, key, payload, None))
                else:
                    done += 1
                    _raise_if_failed([payload])
                    index = key[0] * per_prompt + key[1]
                    yield _sse(protocol.chunk(cid, model_name, index, "", protocol.finish_reason(payload.finish_reason)))
            yield "data: [DONE]\n\n"
        finally:
            if done < n:
                worker.cancel(tag)  # disconnected mid-stream

    @app.post("/infill")
    async def infill(body: InfillRequest, http: HttpRequest) -> dict[str, Any]:
        req = CompletionRequest(prompt=body.input_prefix, suffix=body.input_suffix, max_tokens=body.n_predict,
                                temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed)
        call, tag = _Call(asyncio.get_running_loop()), object()
        requests, n_prompt = rows(req, [req.prompt], call, tag)
        start(requests, call)
        (res,) = (await _gather(call, tag, 1, http)).values()
        return {"content": res.text, "tokens_predicted": len(res.tokens), "tokens_evaluated": n_prompt,
                "stop": res.finish_reason != "length"}

    return app


class _ApiKey:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY`, else 401. A plain
    ASGI class rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware passes a streamed
    response through a memory stream and a task of its own, chunk by chunk, which cost the event loop
    (and so the engine thread, which waits for the GIL) on every server-sent event."""

    def __init__(self, app: Any, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                err = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                               type_="authentication_error", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _raise_if_failed(results) -> None:
    if any(r.finish_reason == "error" for r in results):
        raise ApiError(503, "the engine failed; see the server log", type_="server_error")
