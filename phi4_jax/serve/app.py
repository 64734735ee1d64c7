"""The OpenAI-compatible HTTP app: `create_app(engine, tokenizer, model_name)`.

Routes: GET /v1/models, GET /health, GET /metrics (Prometheus), POST /v1/completions, POST /v1/chat/completions,
and vLLM's tokenizer routes (GET /tokenizer_info, POST /tokenize, POST /detokenize), which lm-evaluation-harness's
`local-completions` uses (`tokenizer_backend=remote`) to count context tokens without downloading a tokenizer.

Each choice is one engine request (`n` choices per prompt); streamed responses are server-sent events ending in
`data: [DONE]`. Log-probs: /v1/completions `logprobs: k` (OpenAI's tokens / token_logprobs / top_logprobs /
text_offset; with `echo`, each choice's engine request also scores its prompt (`GenerationRequest.prompt_logprobs`:
its own prefill chunks compute them, queued and batched like any request; `max_tokens` 0 scores the prompt only),
and a streamed echo sends the prompt's text and log-probs as each choice's first chunk, once its prompt is scored)
and /v1/chat/completions `logprobs: true, top_logprobs: k` (content[j] = {token, logprob, bytes, top_logprobs}, in
each streamed chunk for its tokens). A client that goes away mid-stream cancels its engine requests at once (the
response's `finally`), as does a stop string matched on the decoded text. Bad requests get OpenAI-style JSON errors
(4xx; 429 when the engine queue is full); anything unexpected is logged and answered with a plain 500 JSON error,
never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi4_jax.inference.batching import GenerationRequest
from phi4_jax.inference.errors import ContextLengthError, EngineError, GenerationError, QueueFullError
from phi4_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from phi4_jax.serve.protocol import (
    MAX_TOP_LOGPROBS,
    APIError,
    Sampling,
    _boolean,
    _integer,
    check_token_ids,
    invalid,
    parse_chat_logprobs,
    parse_messages,
    parse_prompts,
    parse_sampling,
)
from phi4_jax.serve.text import CompletionText, chat_logprobs_content, token_entries

log = logging.getLogger("phi4_jax.serve")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def internal_error(where: str, exc: BaseException) -> JSONResponse:
    log.error("unexpected error in %s", where, exc_info=exc)
    return error_response(APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error"))


def engine_refusal(e: BaseException) -> APIError | None:
    """The API error for an engine exception that is the request's or the load's fault (None for a bug)."""
    if isinstance(e, QueueFullError):
        return APIError(429, f"the server is busy: {e}", code="queue_full")
    if isinstance(e, ContextLengthError):
        return invalid(str(e), "prompt", "context_length_exceeded")
    if isinstance(e, GenerationError):
        return invalid(str(e))
    if isinstance(e, EngineError):
        return APIError(503, str(e), code="engine_unavailable")
    return None


def _json_route(handler):
    """Runs a route handler; APIError or an engine refusal -> its JSON error, anything else -> a logged, clean 500."""
    @functools.wraps(handler)
    async def wrapper(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - the catch-all the server promises
            refusal = engine_refusal(e)
            return error_response(refusal) if refusal is not None else internal_error(request.url.path, e)
    return wrapper


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


class _StreamResponse(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (finished, client gone, cancelled)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Choice:
    """One engine request and the text built from its tokens."""
    index: int
    stream: object
    text: CompletionText
    events: list = field(default_factory=list)   # (token_id, logprob, top) of the generated tokens
    finish_reason: str | None = None

    def add(self, event) -> str:
        self.events.append((event.token_id, event.logprob, event.top_logprobs))
        piece = self.text.add(event.token_id)
        if self.text.stopped:
            self.stream.cancel()
        return piece

    def finish(self) -> str:
        piece = self.text.finish()
        reason = getattr(self.stream, "finish_reason", None) if self.stream is not None else "length"
        self.finish_reason = "stop" if self.text.stopped or reason in ("stop", "cancelled") else "length"
        return piece


class Server:
    """The state behind the routes: the engine, tokenizer, model name, limits and metrics."""

    def __init__(self, engine, tokenizer, model_name: str, max_context: int | None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        config = getattr(engine, "config", None)
        self.vocab_size = getattr(config, "vocab_size", tokenizer.n_vocab)
        self.max_context = max_context or getattr(engine, "max_context", None) or getattr(
            config, "max_position_embeddings", None)
        self.stop_ids = tuple(t for t in tokenizer.stop_ids if t < self.vocab_size)
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    # ------------------------------------------------------------------ request pieces
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def budget(self, prompt: list[int], sampling: Sampling, default: int | None) -> int:
        """max_tokens for this prompt, after checking the prompt and it fit the context."""
        if not prompt:
            raise invalid("the prompt is empty; it needs at least one token", "prompt")
        check_token_ids(prompt, self.vocab_size, "prompt")
        wanted = sampling.max_tokens if sampling.max_tokens is not None else default
        if self.max_context is None:
            if wanted is None:
                raise invalid("'max_tokens' is required", "max_tokens")
            return wanted
        room = self.max_context - len(prompt)
        if room < 1 or (wanted is not None and wanted > room):
            asked = "" if wanted is None else f" and max_tokens is {wanted}"
            raise invalid(f"this model's maximum context length is {self.max_context} tokens, but the prompt has "
                          f"{len(prompt)} tokens{asked}; shorten the prompt or lower max_tokens",
                          "messages" if default is None else "prompt", "context_length_exceeded")
        return room if wanted is None else wanted

    def submit(self, prompts: list[list[int]], budgets: list[int], sampling: Sampling,
               prompt_logprobs: int | None = None) -> list[Choice]:
        """One engine request per prompt and choice (scoring its prompt with top-`prompt_logprobs` alternatives when
        that is given; a budget of 0 then still scores it), submitted together: all join the engine's queue at once,
        or none does (the engine's refusal propagates)."""
        stop_ids = tuple(sorted(set(self.stop_ids) | set(sampling.stop_token_ids)))
        texts, requests = [], {}
        for p, (prompt, budget) in enumerate(zip(prompts, budgets)):
            for j in range(sampling.n):
                index = p * sampling.n + j
                texts.append(CompletionText(self.tokenizer, stop_strings=sampling.stop_strings,
                                            stop_token_ids=stop_ids))
                if budget == 0 and prompt_logprobs is None:
                    continue                              # echo only: nothing to generate or score
                requests[index] = GenerationRequest(
                    prompt_ids=list(prompt), max_new_tokens=budget, temperature=sampling.temperature,
                    top_p=sampling.top_p, seed=None if sampling.seed is None else sampling.seed + index,
                    stop_token_ids=stop_ids, logprobs=sampling.logprobs, prompt_logprobs=prompt_logprobs)
        streams = dict(zip(requests, self.engine.submit_many(list(requests.values())))) if requests else {}
        return [Choice(index, streams.get(index), text) for index, text in enumerate(texts)]

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.events) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ------------------------------------------------------------------ running choices
    async def run_choice(self, choice: Choice, on_piece=None) -> None:
        """Consumes one choice's token events; `on_piece(choice, text, event)` for each (streaming)."""
        if choice.stream is not None:
            async for event in choice.stream:
                piece = choice.add(event)
                self.metrics.tokens()
                if on_piece is not None:
                    await on_piece(choice, piece, event)
                if choice.text.stopped:
                    break
        piece = choice.finish()
        self.metrics.finished.labels(choice.finish_reason).inc()
        if on_piece is not None and piece:
            await on_piece(choice, piece, None)

    async def collect(self, request: Request, choices: list[Choice]) -> None:
        """Runs all choices to the end; cancels them if the client disconnects first."""
        task = asyncio.ensure_future(asyncio.gather(*(self.run_choice(c) for c in choices)))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    break
            await task
        finally:
            cancel(choices)

    def stream(self, choices: list[Choice], chunk, usage_chunk, first_chunk=None) -> _StreamResponse:
        """SSE of `chunk(choice, piece, event, finish_reason)` dicts as the choices advance (each choice's
        `first_chunk(choice)` before its tokens, when given: at once, or, for a request that scores its prompt, when
        the prompt is scored), then the usage chunk (when asked for) and [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = []
        failures = []
        done = object()  # a choice's end marker (chunk() returns None for pieces with nothing to send)

        async def on_piece(choice, piece, event):
            await queue.put(chunk(choice, piece, event, None))

        async def run(choice):
            # A choice that scores its prompt sends its first chunk with its first token (or at its end): the
            # engine has scored the whole prompt by then.
            first = first_chunk

            async def first_then_piece(choice, piece, event):
                nonlocal first
                if first is not None:
                    await queue.put(first(choice))
                    first = None
                await on_piece(choice, piece, event)

            try:
                if first is not None and getattr(choice.stream, "prompt_logprobs", None) is None:
                    await queue.put(first(choice))
                    first = None
                await self.run_choice(choice, first_then_piece)
                if first is not None:
                    await queue.put(first(choice))
                await queue.put(chunk(choice, "", None, choice.finish_reason))
            except Exception as e:  # noqa: BLE001 - reported in the stream below
                failures.append(e)
            finally:
                await queue.put(done)

        async def events():
            tasks.extend(asyncio.ensure_future(run(c)) for c in choices)
            remaining = len(choices)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif item is not None:
                    yield sse(item)
            if failures:  # the headers are sent: report it in the stream, then end it
                error = engine_refusal(failures[0])
                if error is None:
                    log.error("unexpected error while streaming", exc_info=failures[0])
                    error = APIError(500, f"internal server error ({type(failures[0]).__name__})",
                                     code="internal_error")
                yield sse(error.body())
            if usage_chunk is not None:
                yield sse(usage_chunk())
            yield "data: [DONE]\n\n"

        def on_close():
            for task in tasks:
                task.cancel()
            cancel(choices)

        return _StreamResponse(events(), on_close)

    # ------------------------------------------------------------------ endpoints
    async def completions(self, request: Request):
        body = await read_json(request)
        self.check_model(body)
        echo = _boolean(body, "echo")
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        sampling = parse_sampling(body, allow_zero_tokens=echo, logprobs=logprobs)
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in parse_prompts(body)]
        budgets = [self.budget(p, sampling, COMPLETIONS_DEFAULT_MAX_TOKENS) for p in prompts]
        choices = self.submit(prompts, budgets, sampling, logprobs if echo else None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def base(choices_json):
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices_json}

        if sampling.stream:
            # With echo, each choice's first chunk is its prompt's text (and the prompt's logprobs); the generated
            # tokens' text_offset then counts from the end of that text.
            echoed = [self.tokenizer.decode(p) if echo else "" for p in prompts]

            def chunk(choice, piece, event, finish_reason):
                if not piece and finish_reason is None and logprobs is None:
                    return None
                lp = None
                if logprobs is not None and event is not None:
                    offset = len(echoed[choice.index // sampling.n]) + len(choice.text.text) - len(piece)
                    lp = token_entries(self.tokenizer, [(event.token_id, event.logprob, event.top_logprobs)], offset)
                return base([{"index": choice.index, "text": piece, "logprobs": lp, "finish_reason": finish_reason}])

            def prompt_chunk(choice):
                p = choice.index // sampling.n
                lp = None if logprobs is None else token_entries(self.tokenizer, prompt_events(prompts[p], choice))
                return base([{"index": choice.index, "text": echoed[p], "logprobs": lp, "finish_reason": None}])

            usage = (lambda: {**base([]), "usage": self.usage(prompts, choices)}) if sampling.include_usage else None
            return self.stream(choices, chunk, usage, prompt_chunk if echo else None)

        await self.collect(request, choices)
        out = []
        for choice in choices:
            prompt = prompts[choice.index // sampling.n]
            prefix = self.tokenizer.decode(prompt) if echo else ""
            entry = {"index": choice.index, "text": prefix + choice.text.text, "logprobs": None,
                     "finish_reason": choice.finish_reason}
            if logprobs is not None:
                events = prompt_events(prompt, choice) if echo else []
                entry["logprobs"] = token_entries(self.tokenizer, events + choice.events)
            out.append(entry)
        return JSONResponse({**base(out), "usage": self.usage(prompts, choices)})

    async def chat_completions(self, request: Request):
        body = await read_json(request)
        self.check_model(body)
        messages = parse_messages(body)
        sampling = parse_sampling(body, max_tokens_field="max_completion_tokens", logprobs=parse_chat_logprobs(body))
        logprobs = sampling.logprobs
        prompt = self.tokenizer.encode_chat_ordinary(messages, add_generation_prompt=True)
        budget = self.budget(prompt, sampling, None)
        choices = self.submit([prompt], [budget], sampling)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def base(object_name, choices_json):
            return {"id": rid, "object": object_name, "created": created, "model": self.model_name,
                    "choices": choices_json}

        if sampling.stream:
            started = set()

            def chunk(choice, piece, event, finish_reason):
                delta = {}
                if choice.index not in started:
                    started.add(choice.index)
                    delta["role"] = "assistant"
                if piece:
                    delta["content"] = piece
                lp = None
                if logprobs is not None and event is not None:
                    content = chat_logprobs_content(self.tokenizer, [(event.token_id, event.logprob,
                                                                      event.top_logprobs)], choice.text.stop_token_ids)
                    lp = {"content": content} if content else None
                if not delta and lp is None and finish_reason is None:
                    return None
                return base("chat.completion.chunk", [{"index": choice.index, "delta": delta, "logprobs": lp,
                                                        "finish_reason": finish_reason}])

            usage = ((lambda: {**base("chat.completion.chunk", []), "usage": self.usage([prompt], choices)})
                     if sampling.include_usage else None)
            return self.stream(choices, chunk, usage)

        await self.collect(request, choices)
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                "logprobs": None if logprobs is None else {
                    "content": chat_logprobs_content(self.tokenizer, c.events, c.text.stop_token_ids)},
                "finish_reason": c.finish_reason} for c in choices]
        return JSONResponse({**base("chat.completion", out), "usage": self.usage([prompt], choices)})

    async def tokenize(self, request: Request):
        body = await read_json(request)
        if "messages" in body:
            ids = self.tokenizer.encode_chat_ordinary(parse_messages(body), add_generation_prompt=bool(
                body.get("add_generation_prompt", True)))
        elif isinstance(body.get("prompt"), str):
            ids = self.tokenizer.encode(body["prompt"])
        else:
            raise invalid("'prompt' must be a string (or give 'messages')", "prompt")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_context})

    async def detokenize(self, request: Request):
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise invalid("'tokens' must be a list of token ids", "tokens")
        check_token_ids(ids, self.tokenizer.n_vocab, "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    async def tokenizer_info(self, request: Request):
        from phi4_jax.tokenizer import CHAT_TEMPLATE

        t = self.tokenizer
        return JSONResponse({"tokenizer_class": "phi4_jax.Tokenizer", "eos_token": t.decode([t.endoftext_id]),
                             "bos_token": t.decode([t.bos_id]), "pad_token": t.decode([t.pad_id]),
                             "chat_template": CHAT_TEMPLATE, "model_max_length": self.max_context})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "phi4_jax",
             "max_model_len": self.max_context}]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


def prompt_events(prompt: list[int], choice: Choice) -> list[tuple]:
    """(token_id, logprob, top) for each token of the prompt of a choice whose request scored it (logprob None for
    the first: nothing predicts it; and for any the engine did not score, as when it was cancelled first)."""
    return [(t, None, None) if e is None else (t, e.logprob, e.top_logprobs)
            for t, e in zip(prompt, choice.stream.prompt_logprobs)]


def cancel(choices: list[Choice]) -> None:
    for choice in choices:
        if choice.stream is not None:
            choice.stream.cancel()


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI, so streaming is untouched)."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine, tokenizer, model_name: str, *, max_context: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (a started `ContinuousBatchingEngine`) as `model_name`.

    `max_context` (tokens, prompt plus answer) defaults to the engine's `max_context`, else the model's
    max_position_embeddings.
    """
    server = Server(engine, tokenizer, model_name, max_context)
    app = FastAPI(title="phi4_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    routes = [("GET", "/v1/models", server.models), ("GET", "/health", server.health),
              ("GET", "/metrics", server.metrics_text), ("POST", "/v1/completions", server.completions),
              ("POST", "/v1/chat/completions", server.chat_completions), ("POST", "/tokenize", server.tokenize),
              ("POST", "/detokenize", server.detokenize), ("GET", "/tokenizer_info", server.tokenizer_info)]
    for method, path, handler in routes:
        app.add_api_route(path, _json_route(handler), methods=[method])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return internal_error(request.url.path, exc)

    app.add_middleware(_CountRequests, metrics=server.metrics, endpoints={path for _, path, _ in routes})
    return app


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0,
                    log_level: str = "warning"):
    """Runs `app` on uvicorn in a background thread (port 0: a free port); yields its base URL
    (``http://host:port``) once it accepts connections, and stops it on exit. For tests and benchmarks."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port} within {start_timeout_s:.0f} s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
