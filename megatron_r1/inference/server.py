"""OpenAI-compatible HTTP server over an `Engine` (FastAPI + uvicorn).

The engine's scheduler runs in its own thread; handlers only submit requests and await wake-ups that the engine
thread posts onto the event loop (`call_soon_threadsafe`), so HTTP handling never waits on a model step.
Errors follow OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for malformed or invalid
requests, 404 for an unknown model, 503 when the waiting queue is full. A client that disconnects mid-stream has
its requests aborted (their cache slots are freed at the next step).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_r1.errors import UserError
from megatron_r1.inference.engine import Engine, QueueFullError
from megatron_r1.inference.sampling import SamplingParams


# ----------------------------------------------------------------------------------------------- schemas
class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, presence_penalty...) are accepted

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (vLLM-style)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: StrictBool = False
    ignore_eos: StrictBool = False  # extension

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, str):
            return [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class CompletionRequest(_Base):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: StrictBool = False


class ChatMessage(BaseModel):
    role: str
    content: Union[str, list[dict[str, Any]]]


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# ----------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus text exposition, by hand (a handful of counters, two gauges, one histogram)."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_counts = [0] * len(self.BUCKETS)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.aborted = 0

    def observe(self, endpoint: str, status: int, seconds: Optional[float] = None):
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        if seconds is not None:
            self.latency_sum += seconds
            self.latency_n += 1
            for i, b in enumerate(self.BUCKETS):
                if seconds <= b:
                    self.latency_counts[i] += 1

    def render(self, engine: Engine) -> str:
        out = ["# HELP megatron_r1_requests_total HTTP requests by endpoint and status.",
               "# TYPE megatron_r1_requests_total counter"]
        for (ep, st), v in sorted(self.requests.items()):
            out.append(f'megatron_r1_requests_total{{endpoint="{ep}",status="{st}"}} {v}')
        out += ["# HELP megatron_r1_prompt_tokens_total Prompt tokens of served requests.",
                "# TYPE megatron_r1_prompt_tokens_total counter",
                f"megatron_r1_prompt_tokens_total {self.prompt_tokens}",
                "# HELP megatron_r1_generation_tokens_total Tokens generated for served requests.",
                "# TYPE megatron_r1_generation_tokens_total counter",
                f"megatron_r1_generation_tokens_total {self.completion_tokens}",
                "# HELP megatron_r1_prefill_tokens_shared_total Prompt tokens not prefilled: an identical prompt "
                "(n > 1 choices) was prefilled in the same step and its cache copied.",
                "# TYPE megatron_r1_prefill_tokens_shared_total counter",
                f"megatron_r1_prefill_tokens_shared_total {engine.stats['prefill_tokens_shared']}",
                "# HELP megatron_r1_aborted_requests_total Requests aborted by client disconnects.",
                "# TYPE megatron_r1_aborted_requests_total counter",
                f"megatron_r1_aborted_requests_total {self.aborted}",
                "# HELP megatron_r1_queue_depth Requests waiting for a cache slot.",
                "# TYPE megatron_r1_queue_depth gauge",
                f"megatron_r1_queue_depth {engine.num_waiting}",
                "# HELP megatron_r1_running_requests Requests holding a cache slot.",
                "# TYPE megatron_r1_running_requests gauge",
                f"megatron_r1_running_requests {engine.num_running}",
                "# HELP megatron_r1_weight_version Engine weight version (bumped by each refit).",
                "# TYPE megatron_r1_weight_version gauge",
                f"megatron_r1_weight_version {engine.weight_version}",
                "# HELP megatron_r1_request_latency_seconds End-to-end latency of successful generation requests.",
                "# TYPE megatron_r1_request_latency_seconds histogram"]
        for b, c in zip(self.BUCKETS, self.latency_counts):
            out.append(f'megatron_r1_request_latency_seconds_bucket{{le="{b}"}} {c}')
        out += [f'megatron_r1_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_n}',
                f"megatron_r1_request_latency_seconds_sum {self.latency_sum:.6f}",
                f"megatron_r1_request_latency_seconds_count {self.latency_n}"]
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- app
def _held_back(text: str, stops: list[str]) -> str:
    """The part of `text` safe to stream: a suffix that could begin a stop string is held back."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]


def _text(m: ChatMessage) -> str:
    return m.content if isinstance(m.content, str) else "".join(
        p.get("text", "") for p in m.content if isinstance(p, dict))


def format_chat(messages: list[ChatMessage]) -> str:
    """Messages -> prompt text for a tokenizer without a chat template: role-tagged turns ending with an open
    assistant turn."""
    parts = []
    for m in messages:
        role = {"system": "System", "user": "User", "assistant": "Assistant"}.get(m.role, m.role.capitalize())
        parts.append(f"{role}: {_text(m)}\n")
    return "".join(parts) + "Assistant:"


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The prompt's token ids: the model's own chat template when its tokenizer has one (HF's rendering, with
    the system prompt and the opened assistant turn), else `format_chat`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": m.role, "content": _text(m)} for m in messages],
                                             add_generation_prompt=True)
    return tokenizer.encode(format_chat(messages))


def create_app(engine: Engine, model_name: str, max_n: int = 16, start_engine: bool = True) -> FastAPI:
    """The FastAPI app; the engine's background thread is started and stopped with the app's lifespan."""
    metrics = Metrics()
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="megatron-r1", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.observe(request.url.path, exc.status)
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "megatron-r1", "max_model_len": engine.max_seq_len}]}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    async def _parse(request: Request, schema):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if req.n > max_n:
            raise APIError(400, f"n must be <= {max_n}, got {req.n}", param="n")
        if req.stop and tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer; this server has none", param="stop")
        return req

    def _encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send prompts as token ids", param="prompt")
        return tokenizer.encode(text)

    def _sampling(req, prompt_len: int, max_tokens: Optional[int], i: int) -> SamplingParams:
        room = engine.max_seq_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {engine.max_seq_len}",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} + {prompt_len} prompt tokens exceeds the context of "
                           f"{engine.max_seq_len} tokens", param="max_tokens", code="context_length_exceeded")
        seed = None if req.seed is None else req.seed + i  # n choices with one seed must still differ
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
                              seed=seed, stop=list(req.stop or []), ignore_eos=req.ignore_eos)

    def _submit(prompts: list[list[int]], req, max_tokens) -> tuple[list, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        wake: asyncio.Queue = asyncio.Queue()
        params = [(p, _sampling(req, len(p), max_tokens, i)) for p in prompts for i in range(req.n)]
        handles = []

        def on_update(r, _loop=loop, _q=wake):
            _loop.call_soon_threadsafe(_q.put_nowait, r)

        try:
            for p, sp in params:
                handles.append(engine.add_request(p, sp, on_update=on_update))
        except QueueFullError as e:
            for h in handles:
                engine.abort(h)
            raise APIError(503, str(e), "server_overloaded", code="queue_full") from None
        except UserError as e:
            for h in handles:
                engine.abort(h)
            raise APIError(400, str(e)) from None
        return handles, wake

    async def _wait_all(handles, wake):
        while any(h.result is None for h in handles):
            await wake.get()
        return [h.result for h in handles]

    def _token_strs(ids):
        return [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in ids]

    def _abort(handles):
        n = 0
        for h in handles:
            if h.result is None:
                engine.abort(h)
                n += 1
        metrics.aborted += 1 if n else 0

    async def _run(request: Request, req, prompts: list[list[int]], max_tokens, kind: str):
        t0 = time.monotonic()
        handles, wake = _submit(prompts, req, max_tokens)
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        path = request.url.path
        if req.stream:
            return StreamingResponse(_stream(handles, wake, req, rid, created, kind, t0, path),
                                     media_type="text/event-stream")
        try:
            results = await _wait_all(handles, wake)
        finally:
            _abort(handles)  # the handler was cancelled: free the slots
        if any(r.finish_reason == "error" for r in results):
            raise APIError(500, "generation failed inside the engine (see the server log)", "server_error")
        choices = []
        for i, r in enumerate(results):
            text = r.text if r.text is not None else ""
            if kind == "completion":
                lp = None
                if req.logprobs is not None:
                    lp = {"tokens": _token_strs(r.token_ids), "token_logprobs": r.logprobs,
                          "top_logprobs": None, "text_offset": None}
                if req.echo and tokenizer is not None:
                    text = tokenizer.decode(r.prompt_token_ids) + text
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
            else:
                lp = None
                if req.logprobs:
                    lp = {"content": [{"token": s, "logprob": v, "bytes": list(s.encode()), "top_logprobs": []}
                                      for s, v in zip(_token_strs(r.token_ids), r.logprobs)]}
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": r.finish_reason})
        n_prompt = sum(len(p) for p in prompts)
        n_gen = sum(len(r.token_ids) for r in results)
        metrics.prompt_tokens += n_prompt
        metrics.completion_tokens += n_gen
        metrics.observe(path, 200, time.monotonic() - t0)
        return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": created, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    async def _stream(handles, wake, req, rid, created, kind, t0, path):
        sent_text = [""] * len(handles)
        sent_tok = [0] * len(handles)
        finished = [False] * len(handles)
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        stops = list(req.stop or [])
        try:
            if kind == "chat":
                for i in range(len(handles)):
                    yield _sse({"id": rid, "object": obj, "created": created, "model": model_name,
                                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            while not all(finished):
                await wake.get()
                for i, h in enumerate(handles):
                    if finished[i]:
                        continue
                    res = h.result
                    text = res.text if res is not None else h.text
                    text = text or ""
                    if res is None:
                        text = _held_back(text, stops)
                    delta = text[len(sent_text[i]):] if text.startswith(sent_text[i]) else ""
                    new_ids = (res.token_ids if res is not None else h.tokens)[sent_tok[i]:]
                    new_lp = (res.logprobs if res is not None else h.logprobs)[sent_tok[i]:sent_tok[i] + len(new_ids)]
                    if not delta and not new_ids and res is None:
                        continue
                    sent_text[i] += delta
                    sent_tok[i] += len(new_ids)
                    reason = res.finish_reason if res is not None else None
                    if kind == "completion":
                        lp = None
                        if req.logprobs is not None:
                            lp = {"tokens": _token_strs(new_ids), "token_logprobs": list(new_lp),
                                  "top_logprobs": None, "text_offset": None}
                        choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": reason}
                    else:
                        lp = None
                        if req.logprobs:
                            lp = {"content": [{"token": s, "logprob": v, "bytes": list(s.encode()),
                                               "top_logprobs": []} for s, v in zip(_token_strs(new_ids), new_lp)]}
                        choice = {"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                                  "finish_reason": reason}
                    yield _sse({"id": rid, "object": obj, "created": created, "model": model_name,
                                "choices": [choice]})
                    if res is not None:
                        finished[i] = True
                        metrics.completion_tokens += len(res.token_ids)
            metrics.prompt_tokens += sum(len(h.prompt) for h in handles)
            metrics.observe(path, 200, time.monotonic() - t0)
            yield "data: [DONE]\n\n"
        finally:
            _abort(handles)  # client went away mid-stream (or finished): unfinished requests free their slots

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, str):
            prompts = [_encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [_encode(x) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings, or token ids", param="prompt")
        if any(len(x) == 0 for x in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompts) * req.n > max_n:
            raise APIError(400, f"prompts x n must be <= {max_n}", param="n")
        return await _run(request, req, prompts, req.max_tokens, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatRequest)
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: chat needs one", param="messages")
        from jinja2 import TemplateError

        try:
            prompt = chat_prompt_ids(tokenizer, req.messages)
        except TemplateError as e:  # e.g. a template's raise_exception on roles it does not know
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        if not prompt:
            raise APIError(400, "the prompt is empty", param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await _run(request, req, [prompt], max_tokens, "chat")

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
