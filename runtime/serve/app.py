"""The HTTP side of `ggfuse serve`: a Starlette app on uvicorn, speaking the OpenAI API.

Routes: GET /health (no key needed), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions, GET /v1/stats (queue and prefix-cache counters). Every error is OpenAI's
error object with a fitting status: 400 bad JSON / field / prompt too long, 401 key, 404 route
or model, 405 method, 413 body too large, 503 queue full (with Retry-After).

A request is parsed and tokenized on the event loop's side (the tokenizer in a thread), checked
against the context, then queued for the model (runtime/serve/worker.py). Streamed answers are
server-sent events; a client that disconnects, streamed or not, cancels its job.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from ggfuse.runtime.serve.protocol import APIError, chunk, parse_chat, parse_completion, response, usage
from ggfuse.runtime.serve.worker import Job, QueueFull

log = logging.getLogger("ggfuse.serve")

KEEPALIVE_S = 15.0     # an SSE comment while a streamed request waits, so that proxies keep it open


@dataclass(frozen=True)
class ServeSettings:
    """How the server listens and what it accepts (the model's own options are ggfuse.options)."""
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    model_name: str = "model"
    max_queue: int = 16            # requests waiting for the model (the running one not counted), >= 1
    max_body_bytes: int = 4 << 20
    max_context: int | None = None


class TextEndpoint:
    """Tokenizing for the two generation routes, and the context check."""

    def __init__(self, model, template, context: int):
        self.model, self.template, self.context = model, template, context
        self._answer_prompts: dict = {}    # template kwargs -> (text, ids) of the answer's prompt, or None

    def prompt_ids(self, req, want_marks: bool = True) -> tuple[list[int], tuple]:
        """(the prompt's token ids, the positions to keep a prefix-cache snapshot at: for a chat,
        where its messages end and the prompt for the answer begins; the next turn renders the
        messages the same but the answer's prompt not)."""
        from ggfuse.errors import GGFuseError
        from ggfuse.runtime.generate import encode_rendered, prompt_ids
        marks = ()
        try:
            if req.kind == "chat":
                if self.template is None:
                    raise APIError(400, "this model has no chat template (tokenizer.chat_template); use "
                                        "/v1/completions, or start the server with --chat-template FILE",
                                   param="messages", code="no_chat_template")
                full = self.template.render(req.messages, add_generation_prompt=True, **req.template_kwargs)
                ids = encode_rendered(self.model.tokenizer, full)
                if want_marks:
                    marks = self._messages_end(req, full, ids)
            else:
                ids = prompt_ids(self.model, req.prompt)
                if ids and (min(ids) < 0 or max(ids) >= self.model.n_vocab):
                    bad = next(t for t in ids if not 0 <= t < self.model.n_vocab)
                    raise APIError(400, f"token id {bad} is outside the vocabulary 0..{self.model.n_vocab - 1}",
                                   param="prompt", code="invalid_value")
        except GGFuseError as e:
            raise APIError(400, e.message, param="messages" if req.kind == "chat" else "prompt",
                           code="invalid_value") from None
        return ids, marks

    def _messages_end(self, req, full: str, ids) -> tuple:
        """Where the messages end in ids (the tokens of `full`): before the tokens of what the
        template adds for the answer (the rendering with it less the one without). Only a place
        to keep a snapshot: the next turn resumes there if its tokens start the same, so a guess
        costs nothing.

        The answer's prompt of a template is nearly always the same text whatever the messages
        (`<|im_start|>assistant\n`): it is found once per set of template arguments on a probe
        conversation, and a rendering that ends with it is cut there without rendering the
        messages a second time (half of a long chat's tokenizing time); any other rendering is
        cut by rendering it without the answer's prompt."""
        kwargs = req.template_kwargs
        known = self._answer_prompt(kwargs)
        if known is None or not full.endswith(known[0]):
            known = self._answer_tail(req.messages, kwargs, full)
            if known is None:
                return ()
        tail = known[1]
        n = len(ids) - len(tail)
        return (n,) if 0 < n < len(ids) and ids[n:] == tail else ()

    def _answer_tail(self, messages, kwargs: dict, full: str | None = None):
        """(text, token ids) of what the template appends for the answer to `messages` (their
        rendering with the answer's prompt, `full` where given, less the one without), or None."""
        from ggfuse.errors import GGFuseError
        from ggfuse.runtime.generate import encode_rendered
        try:
            if full is None:
                full = self.template.render(messages, add_generation_prompt=True, **kwargs)
            head = self.template.render(messages, add_generation_prompt=False, **kwargs)
        except GGFuseError:
            return None
        if not full.startswith(head) or len(full) == len(head):
            return None
        text = full[len(head):]
        return text, encode_rendered(self.model.tokenizer, text)

    def _answer_prompt(self, kwargs: dict):
        """(text, token ids) the template appends for the answer under these template arguments,
        from a probe conversation; None where the probe does not show one."""
        key = json.dumps(kwargs, sort_keys=True, default=repr)
        if key in self._answer_prompts:
            return self._answer_prompts[key]
        got = self._answer_tail([{"role": "user", "content": "Hello."}], kwargs)
        if len(self._answer_prompts) < 64:      # kwargs come from requests: keep a few
            self._answer_prompts[key] = got
        return got

    def max_new(self, req, n_prompt: int) -> int:
        """The new-token budget, or APIError where the prompt and max_tokens overflow the context."""
        param = "messages" if req.kind == "chat" else "prompt"
        if n_prompt >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                f"{param} resulted in {n_prompt} tokens (with room for at least one new token). "
                                f"Please reduce the length of the {param}.", param=param,
                           code="context_length_exceeded")
        room = self.context - n_prompt + 1
        if req.max_tokens is None:
            return room
        if req.max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + req.max_tokens - 1} tokens ({n_prompt} in the {param}, "
                                f"{req.max_tokens} in the completion). Please reduce the length of the {param} or "
                                f"completion (max_tokens at most {room}).", param="max_tokens",
                           code="context_length_exceeded")
        return req.max_tokens


def _error_response(e: APIError):
    from starlette.responses import JSONResponse
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Guard:
    """ASGI middleware: the API key on every route but /health, and the body size limit (by
    Content-Length here; a body sent without one is counted as it arrives: read_json)."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.max_body = settings.max_body_bytes
        self.key_digest = (hashlib.sha256(settings.api_key.encode()).digest()
                           if settings.api_key else None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        err = None
        if self.key_digest is not None and scope.get("path") != "/health":
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if not auth:
                err = APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
            # digests compared: constant time, and the key's length does not show either
            elif scheme.lower() != b"bearer" or not hmac.compare_digest(hashlib.sha256(given.strip()).digest(),
                                                                        self.key_digest):
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if err is None:
            n = headers.get(b"content-length")
            try:
                too_big = n is not None and int(n) > self.max_body
            except ValueError:
                err = APIError(400, "bad Content-Length header")
            else:
                if too_big:
                    err = _too_large(self.max_body)
        if err is not None:
            await _error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")


async def read_json(request, limit: int) -> dict:
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(limit)
    try:
        data = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            f"object.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The body must be a JSON object, not {type(data).__name__}.", code="invalid_json")
    return data


async def _until_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream:
    """A streamed answer as server-sent events, ending with data: [DONE]. If the client goes away
    (a disconnect message, or a failed send) the job is cancelled."""

    def __init__(self, worker, job: Job, req):
        self.worker, self.job, self.req = worker, job, req

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            async with contextlib.aclosing(self._events(watcher)) as events:
                async for data in events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:       # the connection broke while sending
            return
        finally:
            watcher.cancel()
            self.worker.cancel(self.job)     # nothing when it has ended

    async def _events(self, watcher):
        job = self.job
        waiter = None
        try:
            while True:
                if waiter is None:
                    waiter = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({waiter, watcher}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    return             # the client went away
                if not done:
                    yield b": waiting\n\n"
                    continue
                ev, waiter = waiter.result(), None
                for data in self._render(ev):
                    yield data
                if ev[0] in ("done", "error"):
                    return
        finally:
            if waiter is not None:
                waiter.cancel()

    def _render(self, ev):
        """The SSE messages of one job event."""
        req, kind = self.req, ev[0]
        if kind == "token":
            if req.kind == "chat":
                yield _sse(chunk(req, role=True))
        elif kind == "text":
            yield _sse(chunk(req, text=ev[1]))
        elif kind == "done":
            r = ev[1]
            yield _sse(chunk(req, finish=r["finish"], timings=r["timings"]))
            if req.include_usage:
                yield _sse(chunk(req, use=usage(r["n_prompt"], r["n_new"], r["n_cached"]), choices=False))
            yield b"data: [DONE]\n\n"
        else:
            yield _sse(ev[1].body())


async def _collect(job: Job, receive):
    """The whole answer of a non-streamed job; None if the client went away first."""
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    text = []
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return None
            ev = getter.result()
            if ev[0] == "text":
                text.append(ev[1])
            elif ev[0] == "done":
                return "".join(text), ev[1]
            elif ev[0] == "error":
                raise ev[1]
    finally:
        watcher.cancel()


def make_app(worker, endpoint: TextEndpoint, settings: ServeSettings):
    """The ASGI app: routes, the key and body-size guard, OpenAI-shaped errors."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    started = int(time.time())

    async def health(request):
        return JSONResponse({"status": "ok", **{k: v for k, v in worker.status().items()
                                                if k in ("waiting", "running")}})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                         "created": started, "owned_by": "ggfuse"}]})

    async def stats(request):
        cache = worker.cache.summary() if worker.cache is not None else None
        return JSONResponse({"queue": worker.status(), "cache": cache, "context": endpoint.context,
                             "model": settings.model_name})

    async def generate(request, parse):
        try:
            body = await read_json(request, settings.max_body_bytes)
            req = parse(body, settings.model_name)
            t0 = time.perf_counter()
            ids, marks = await run_in_threadpool(endpoint.prompt_ids, req,
                                                 worker.cache is not None and req.cache_prompt)
            tokenize_s = time.perf_counter() - t0
            max_new = endpoint.max_new(req, len(ids))
            job = Job(ids=ids, max_new=max_new, sampling=req.sampling, stop=req.stop,
                      loop=asyncio.get_running_loop(), tokenize_s=tokenize_s, tag=req.id, marks=marks,
                      use_cache=req.cache_prompt)
            try:
                worker.submit(job)
            except QueueFull as e:
                raise APIError(503, f"the server is busy ({worker.max_queue} requests waiting); retry in "
                                    f"{e.retry_after} s", type="server_error", code="queue_full",
                               headers={"Retry-After": str(e.retry_after)}) from None
            if req.stream:
                return EventStream(worker, job, req)
            try:
                got = await _collect(job, request.receive)
            finally:
                worker.cancel(job)
            if got is None:
                return Response(status_code=499)    # nobody reads it
            text, r = got
            return JSONResponse(response(req, text, r["finish"], usage(r["n_prompt"], r["n_new"], r["n_cached"]),
                                         r["timings"]))
        except APIError as e:
            return _error_response(e)

    async def completions(request):
        return await generate(request, parse_completion)

    async def chat_completions(request):
        return await generate(request, parse_chat)

    async def http_error(request, exc):
        msg = {404: f"Unknown route {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error_response(APIError(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                                        .get(exc.status_code)))

    async def server_error(request, exc):
        log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    app = Starlette(routes=[Route("/health", health, methods=["GET"]),
                            Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/stats", stats, methods=["GET"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    return Guard(app, settings)
