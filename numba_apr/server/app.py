"""The HTTP routes: OpenAI's (/v1/completions, /v1/chat/completions, /v1/models), Ollama's
(/api/generate, /api/chat, /api/tags), /health, /metrics (Prometheus text) and a chat page at /.

Every route turns a request into a `scheduler.Request` and relays its events: server-sent events
ending in `data: [DONE]` for OpenAI streams, NDJSON for Ollama's, one JSON body otherwise. A
client that goes away cancels its request, which frees its slot at the next step. Bad input is
an OpenAI-shaped JSON error with its status: 400 (malformed JSON, bad parameter, prompt longer
than the context), 401 (missing or wrong API key), 404 (unknown route or model), 503 (queue full).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import NumbaAprError
from ..sampling import SamplingParams
from .scheduler import QueueFull, Request, Scheduler


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status, message, param=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


# -- request parsing ---------------------------------------------------------------------------
def _num(body, name, default, lo=-math.inf, hi=math.inf, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise BadRequest(400, f"'{name}' must be {kind} from {lo} to {hi}, got {v!r}", name)
    return v


def _flag(body, name):
    v = body.get(name, False)
    if not isinstance(v, bool):
        raise BadRequest(400, f"'{name}' must be a boolean", name)
    return v


def _stops(v, name="stop"):
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= 16:
        return v
    raise BadRequest(400, f"'{name}' must be a string or a list of up to 16 strings", name)


def _sampling(body, options=None):
    """SamplingParams from OpenAI-style fields (or an Ollama `options` object)."""
    o = options if options is not None else body
    seed = _num(o, "seed", None, -1, 2**63 - 1, integer=True)
    return SamplingParams(
        temperature=float(_num(o, "temperature", 0.8, 0.0, 100.0)),
        top_k=int(_num(o, "top_k", 40, -1, 1 << 30, integer=True)),
        top_p=float(_num(o, "top_p", 0.95, 0.0, 1.0)),
        min_p=float(_num(o, "min_p", 0.05, 0.0, 1.0)),
        repeat_penalty=float(_num(o, "repeat_penalty", 1.0, 0.0, 100.0)),
        repeat_last_n=int(_num(o, "repeat_last_n", 64, -1, 1 << 30, integer=True)),
        seed=None if seed is None or seed < 0 else seed)


class Server:
    """The app's state: the model, its scheduler, the options, the counters behind /metrics."""

    def __init__(self, model, scheduler: Scheduler, model_id: str, api_key: str | None = None,
                 metrics: bool = False):
        self.model, self.scheduler, self.model_id = model, scheduler, model_id
        self.api_key, self.metrics = api_key, metrics
        self.t0 = time.time()
        self.counts = {"http_requests": 0, "errors": 0}

    def check_model(self, body):
        name = body.get("model")
        if name is not None and name not in (self.model_id, Path(self.model.path).name, "default"):
            raise BadRequest(404, f"model '{name}' not found (this server runs '{self.model_id}')", "model",
                             "model_not_found")

    def ids_for_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.model.tokenize(prompt, add_bos=True, special=True)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return self.model.tokenize(prompt[0], add_bos=True, special=True)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            n = self.model.config.n_vocab
            if not all(0 <= t < n for t in prompt):
                raise BadRequest(400, f"token ids must be from 0 to {n - 1}", "prompt")
            return list(prompt)
        raise BadRequest(400, "'prompt' must be a string, a list of one string or a list of token ids", "prompt")

    def ids_for_chat(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), (str, list))
                for m in messages):
            raise BadRequest(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        msgs = []
        for m in messages:
            content = m.get("content") or ""
            if isinstance(content, list):  # OpenAI's content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            msgs.append({"role": m["role"], "content": content})
        try:
            text = self.model.chat_prompt(msgs)
        except NumbaAprError as e:
            raise BadRequest(400, str(e), "messages") from None
        bos = self.model._text_of(self.model.tokenizer.bos_id)
        return self.model.tokenize(text, add_bos=not (bos and text.startswith(bos)), special=True)

    def start(self, ids, params, max_tokens, stop, top_logprobs=-1, freq=0.0, pres=0.0, ignore_eos=False):
        """Submit; returns (request, asyncio queue of its events)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if max_tokens < 0 or max_tokens > self.scheduler.n_ctx:
            max_tokens = self.scheduler.n_ctx
        req = Request(ids, params, max_tokens, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), stop,
                      top_logprobs, freq, pres, ignore_eos)
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            raise BadRequest(503, str(e), kind="server_busy") from None
        except NumbaAprError as e:
            raise BadRequest(400, str(e), "prompt") from None
        return req, q


_GONE = {"gone": True}   # put in a request's queue when its client has disconnected


async def _events(http: HTTPRequest, req: Request, q: asyncio.Queue):
    """The request's events; cancels it when the client has gone (a watcher looks every 0.5 s:
    a timeout on each event's wait cost a task and a timer a token)."""
    async def watch():
        while not await http.is_disconnected():
            await asyncio.sleep(0.5)
        q.put_nowait(_GONE)
    watcher = asyncio.create_task(watch())
    try:
        while True:
            ev = await q.get()
            if ev is _GONE:
                return
            yield ev
            if ev.get("done") or "error" in ev:
                return
    finally:
        watcher.cancel()
        req.cancel()  # no-op once done; frees the slot when the stream was dropped


async def _collect(http: HTTPRequest, req: Request, q: asyncio.Queue):
    """A whole completion: (its text, its token events, the done event or None if the client left)."""
    parts, tokens, done = [], [], None
    async for ev in _events(http, req, q):
        if "error" in ev:
            raise BadRequest(500, ev["error"], kind="server_error")
        if ev.get("done"):
            done = ev
        else:
            parts.append(ev.get("text", ""))
            tokens.append(ev)
    return "".join(parts), tokens, done


class _AuthAndCount:
    """ASGI middleware: counts requests, and asks for the API key on the API routes. Plain ASGI:
    Starlette's @app.middleware("http") passes every streamed chunk through a memory stream of
    its own, a cost per token."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = self.server
        server.counts["http_requests"] += 1
        path = scope["path"]
        if server.api_key and (path.startswith("/v1/") or path.startswith("/api/") or path == "/metrics"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {server.api_key}":
                server.counts["errors"] += 1
                return await _error(401, "invalid or missing API key (Authorization: Bearer ...)",
                                    kind="authentication_error")(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="numba_apr", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    page = (Path(__file__).parent / "chat.html").read_text()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        server.counts["errors"] += 1
        msg = "not found" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {msg}", kind="not_found_error"
                      if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        server.counts["errors"] += 1
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(Exception)
    async def internal(request, exc):
        server.counts["errors"] += 1
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    app.add_middleware(_AuthAndCount, server=server)

    async def body_of(http: HTTPRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        server.check_model(body)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": int(server.t0),
                                            "owned_by": "numba_apr"}]}

    @app.get("/metrics")
    async def metrics():
        if not server.metrics:
            raise StarletteHTTPException(404)
        s, sch = server.scheduler.stats, server.scheduler
        tps = s["generated_tokens"] / s["busy_seconds"] if s["busy_seconds"] else 0.0
        lines = [("requests_total", "counter", "completions admitted", s["requests"]),
                 ("prompt_tokens_total", "counter", "prompt tokens admitted", s["prompt_tokens"]),
                 ("prompt_tokens_reused_total", "counter", "prompt tokens found in a slot's cache",
                  s["prompt_tokens_reused"]),
                 ("tokens_predicted_total", "counter", "tokens generated", s["generated_tokens"]),
                 ("predicted_tokens_seconds", "gauge", "generated tokens per busy second", round(tps, 3)),
                 ("steps_total", "counter", "batched forward passes", s["steps"]),
                 ("requests_processing", "gauge", "busy slots", sch.busy()),
                 ("requests_deferred", "gauge", "requests waiting for a slot", sch.queued()),
                 ("http_requests_total", "counter", "HTTP requests", server.counts["http_requests"]),
                 ("http_errors_total", "counter", "HTTP error responses", server.counts["errors"])]
        text = "".join(f"# HELP numba_apr:{n} {h}\n# TYPE numba_apr:{n} {t}\nnumba_apr:{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- OpenAI ---------------------------------------------------------------------------------
    async def openai_route(http: HTTPRequest, chat: bool):
        body = await body_of(http)
        if _num(body, "n", 1, 1, 1, integer=True) != 1:
            raise BadRequest(400, "only n = 1 is supported", "n")
        ids = server.ids_for_chat(body.get("messages")) if chat else server.ids_for_prompt(body.get("prompt"))
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = int(_num(body, key, -1 if chat else 16, -1, 1 << 30, integer=True))
        if chat:
            top = int(_num(body, "top_logprobs", 0, 0, 20, integer=True)) if body.get("logprobs") else -1
        else:
            lp = _num(body, "logprobs", None, 0, 20, integer=True)
            top = -1 if lp is None else int(lp)
        stream = _flag(body, "stream")
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        req, q = server.start(ids, _sampling(body), max_tokens, _stops(body.get("stop")), top,
                              float(_num(body, "frequency_penalty", 0.0, -2.0, 2.0)),
                              float(_num(body, "presence_penalty", 0.0, -2.0, 2.0)), _flag(body, "ignore_eos"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, obj = int(time.time()), "chat.completion" if chat else "text_completion"
        tok = server.model.tokenizer

        def logprob_entry(ev):
            if "logprob" not in ev:
                return None
            piece = tok.token_bytes(ev["token"]).decode("utf-8", "replace")
            tops = [{"token": tok.token_bytes(t).decode("utf-8", "replace"), "logprob": p} for t, p in ev["top"]]
            if chat:
                return {"token": piece, "logprob": ev["logprob"], "bytes": list(tok.token_bytes(ev["token"])),
                        "top_logprobs": tops}
            return piece, ev["logprob"], {t["token"]: t["logprob"] for t in tops}

        first = [True]  # a stream's first chunk carries the role, as OpenAI's do

        def choice(text, finish, lps):
            if chat:
                msg = {"role": "assistant", "content": text} if first[0] or not stream else {"content": text}
                first[0] = False
                c = {"index": 0, "delta" if stream else "message": msg,
                     "finish_reason": finish, "logprobs": {"content": lps} if top >= 0 else None}
            else:
                c = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                if top >= 0:
                    c["logprobs"] = {"tokens": [x[0] for x in lps], "token_logprobs": [x[1] for x in lps],
                                     "top_logprobs": [x[2] for x in lps]}
            return c

        if not stream:
            text, tokens, done = await _collect(http, req, q)
            if done is None:  # the client went away
                return PlainTextResponse("", status_code=499)
            lps = [e for e in map(logprob_entry, tokens) if e is not None]
            return {"id": rid, "object": obj, "created": created, "model": server.model_id,
                    "choices": [choice(text, done["finish_reason"], lps)], "usage": done["usage"]}

        async def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            async for ev in _events(http, req, q):
                if "error" in ev:
                    yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                    return
                if ev.get("done"):
                    c = choice("", ev["finish_reason"], [])
                    if chat:
                        c["delta"] = {}
                    out = {"id": rid, "object": chunk_obj, "created": created, "model": server.model_id,
                           "choices": [c]}
                    yield f"data: {json.dumps(out)}\n\n"
                    if usage_in_stream:
                        out = {"id": rid, "object": chunk_obj, "created": created, "model": server.model_id,
                               "choices": [], "usage": ev["usage"]}
                        yield f"data: {json.dumps(out)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                e = logprob_entry(ev)
                if not ev.get("text") and e is None:
                    continue
                out = {"id": rid, "object": chunk_obj, "created": created, "model": server.model_id,
                       "choices": [choice(ev.get("text", ""), None, [e] if e is not None else [])]}
                yield f"data: {json.dumps(out)}\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await openai_route(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await openai_route(http, chat=True)

    # -- Ollama ---------------------------------------------------------------------------------
    async def ollama_route(http: HTTPRequest, chat: bool):
        body = await body_of(http)
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise BadRequest(400, "'options' must be an object", "options")
        if chat:
            ids = server.ids_for_chat(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequest(400, "'prompt' must be a string", "prompt")
            system = body.get("system")
            if body.get("raw") or not server.model.tokenizer.chat_template:
                ids = server.ids_for_prompt(prompt)
            else:
                msgs = ([{"role": "system", "content": system}] if isinstance(system, str) else []) + \
                       [{"role": "user", "content": prompt}]
                ids = server.ids_for_chat(msgs)
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise BadRequest(400, "'stream' must be a boolean", "stream")  # (Ollama streams by default)
        max_tokens = int(_num(options, "num_predict", -1, -2, 1 << 30, integer=True))
        req, q = server.start(ids, _sampling(body, options), max_tokens, _stops(options.get("stop")),
                              -1, float(_num(options, "frequency_penalty", 0.0, -2.0, 2.0)),
                              float(_num(options, "presence_penalty", 0.0, -2.0, 2.0)))
        t0 = time.perf_counter_ns()

        def piece(text, done=None):
            out = {"model": server.model_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done is not None
            if done is not None:
                tm, u = done["timings"], done["usage"]
                out.update(done_reason=done["finish_reason"], total_duration=time.perf_counter_ns() - t0,
                           load_duration=0, prompt_eval_count=u["prompt_tokens"],
                           prompt_eval_duration=int(tm["prompt"] * 1e9), eval_count=u["completion_tokens"],
                           eval_duration=int(tm["generate"] * 1e9))
            return out

        if not stream:
            text, _, done = await _collect(http, req, q)
            if done is None:
                return PlainTextResponse("", status_code=499)
            return piece(text, done)

        async def ndjson():
            async for ev in _events(http, req, q):
                if "error" in ev:
                    yield json.dumps({"error": ev["error"]}) + "\n"
                    return
                if ev.get("done"):
                    yield json.dumps(piece("", ev)) + "\n"
                    return
                if ev.get("text"):
                    yield json.dumps(piece(ev["text"])) + "\n"
        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    @app.post("/api/generate")
    async def ollama_generate(http: HTTPRequest):
        return await ollama_route(http, chat=False)

    @app.post("/api/chat")
    async def ollama_chat(http: HTTPRequest):
        return await ollama_route(http, chat=True)

    @app.get("/api/tags")
    async def ollama_tags():
        p = Path(server.model.path)
        return {"models": [{"name": server.model_id, "model": server.model_id,
                            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.stat().st_mtime)),
                            "size": p.stat().st_size, "digest": "",
                            "details": {"format": "gguf", "family": server.model.config.arch}}]}

    return app
