"""The OpenAI API's request and response shapes, for /v1/completions and /v1/chat/completions.

Requests are checked field by field: a key the API does not have, or a value of the wrong kind
or range, is an APIError (400, OpenAI's error object naming the field). Fields the API has but
this server cannot honour (n > 1, logprobs, tools, penalties) are refused the same way rather
than ignored, so that a client never gets an answer to a question it did not ask. Extensions
that llama-server and vLLM also take: top_k, min_p, repeat_penalty, chat_template_kwargs,
cache_prompt (false: the request neither resumes from the prefix cache nor adds to it).

Sampling defaults are the API's (temperature 1, top_p 1, no top-k or min-p cut); temperature 0
is greedy.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 16


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, want: str, got) -> APIError:
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 60 else type(got).__name__
    return APIError(400, f"Invalid value for '{param}': expected {want}, got {shown}.", param=param,
                    code="invalid_value")


def _number(name, v, lo=None, hi=None, lo_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, "a number", v)
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and v > hi:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _bad(name, f"a number in {rng}", v)
    return float(v)


def _integer(name, v, lo=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, "an integer", v)
    if lo is not None and v < lo:
        raise _bad(name, f"an integer >= {lo}", v)
    return v


def _boolean(name, v):
    if not isinstance(v, bool):
        raise _bad(name, "true or false", v)
    return v


def _only(name, v, allowed, why):
    """A field the server takes only at its neutral value(s)."""
    if v not in allowed:
        raise APIError(400, f"'{name}' = {v!r} is not supported by this server ({why}).", param=name,
                       code="unsupported_value")
    return v


@dataclass
class GenerationRequest:
    """What the worker needs, whichever endpoint it came from."""
    kind: str                                  # "completion" or "chat"
    model: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None              # None: until the model ends its answer or the context is full
    sampling: dict = field(default_factory=dict)   # Generation keywords (temperature, top_p, top_k, ...)
    stop: list = field(default_factory=list)
    prompt: object = None                      # completion: str or list of ids
    messages: list = field(default_factory=list)   # chat: [{"role", "content", ...}]
    template_kwargs: dict = field(default_factory=dict)
    cache_prompt: bool = True
    id: str = ""
    created: int = 0


_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "user",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_k", "min_p", "repeat_penalty",
           "cache_prompt"}
_COMPLETION = _COMMON | {"prompt", "echo", "suffix", "best_of"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                   "parallel_tool_calls", "chat_template_kwargs", "metadata", "store"}


def _common(body: dict, kind: str, served_model: str) -> GenerationRequest:
    keys = _COMPLETION if kind == "completion" else _CHAT
    for k in body:
        if k not in keys:
            raise APIError(400, f"Unrecognized request argument supplied: {k}", param=k, code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter (GET /v1/models lists it)", param="model",
                       code="missing_parameter" if model is None else "invalid_value")
    if model != served_model:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served_model}'.",
                       param="model", code="model_not_found")
    req = GenerationRequest(kind=kind, model=model)
    req.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
    req.created = int(time.time())
    g = body.get
    if g("stream") is not None:
        req.stream = _boolean("stream", g("stream"))
    so = g("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise _bad("stream_options", "an object like {\"include_usage\": true}", so)
        req.include_usage = _boolean("stream_options.include_usage", so.get("include_usage", False))
    mt = g("max_tokens")
    if kind == "chat" and g("max_completion_tokens") is not None:
        mt = g("max_completion_tokens")
    if mt is not None:
        req.max_tokens = _integer("max_tokens", mt, 0)
    elif kind == "completion":
        req.max_tokens = 16            # the API's default for completions
    s = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": None}
    if g("temperature") is not None:
        s["temperature"] = _number("temperature", g("temperature"), 0, 2)
    if g("top_p") is not None:
        s["top_p"] = _number("top_p", g("top_p"), 0, 1, lo_open=True)
    if g("top_k") is not None:
        s["top_k"] = _integer("top_k", g("top_k"), 0)
    if g("min_p") is not None:
        s["min_p"] = _number("min_p", g("min_p"), 0, 1)
        if s["min_p"] >= 1:
            raise _bad("min_p", "a number in [0, 1)", g("min_p"))
    if g("repeat_penalty") is not None:
        s["repeat_penalty"] = _number("repeat_penalty", g("repeat_penalty"), 0, None, lo_open=True)
    if g("seed") is not None:
        s["seed"] = _integer("seed", g("seed"), 0)
    req.sampling = s
    stop = g("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > MAX_STOP:
            raise _bad("stop", f"a string or a list of at most {MAX_STOP} strings", g("stop"))
        req.stop = [x for x in stop if x]
    if g("n") is not None:
        _only("n", g("n"), (1,), "one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if g(name) is not None:
            _only(name, g(name), (0, 0.0), "use repeat_penalty")
    if g("logit_bias") is not None:
        _only("logit_bias", g("logit_bias"), ({},), "no logit bias")
    if g("logprobs") is not None:
        _only("logprobs", g("logprobs"), (False,), "no log-probabilities")
    if g("cache_prompt") is not None:
        req.cache_prompt = _boolean("cache_prompt", g("cache_prompt"))
    if g("user") is not None and not isinstance(g("user"), str):
        raise _bad("user", "a string", g("user"))
    return req


def parse_completion(body: dict, served_model: str) -> GenerationRequest:
    req = _common(body, "completion", served_model)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                  # a batch of one
    if isinstance(p, str):
        if not p:
            raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        pass
    elif p is None:
        raise APIError(400, "you must provide a prompt", param="prompt", code="missing_parameter")
    else:
        raise _bad("prompt", "a string, or a list of token ids (one prompt per request)", p)
    req.prompt = p
    for name, neutral in (("echo", (False,)), ("suffix", (None, "")), ("best_of", (1,))):
        if body.get(name) is not None:
            _only(name, body[name], neutral, "not implemented")
    return req


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_KEYS = {"role", "content", "name", "reasoning_content"}


def _content(i: int, m: dict):
    c = m.get("content")
    if c is None or isinstance(c, str):
        if c is None and m["role"] != "assistant":
            raise _bad(f"messages[{i}].content", "a string", c)
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                                    f"...}}) are supported", param=f"messages[{i}].content", code="invalid_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content", "a string or a list of text parts", c)


def parse_chat(body: dict, served_model: str) -> GenerationRequest:
    req = _common(body, "chat", served_model)
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "you must provide messages", param="messages", code="missing_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty list of messages", msgs)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object with role and content", m)
        extra = set(m) - _MESSAGE_KEYS
        if extra:
            k = sorted(extra)[0]
            if k in ("tool_calls", "tool_call_id", "function_call"):
                raise APIError(400, f"messages[{i}].{k}: tool calls are not supported", param=f"messages[{i}].{k}",
                               code="unsupported_value")
            raise APIError(400, f"Unrecognized argument in messages[{i}]: {k}", param=f"messages[{i}].{k}",
                           code="unknown_parameter")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role", f"one of {', '.join(_ROLES)}", role)
        msg = {"role": _ROLES[role], "content": _content(i, m)}
        for k in ("name", "reasoning_content"):
            if m.get(k) is not None:
                if not isinstance(m[k], str):
                    raise _bad(f"messages[{i}].{k}", "a string", m[k])
                msg[k] = m[k]
        out.append(msg)
    req.messages = out
    g = body.get
    if g("tools") is not None:
        _only("tools", g("tools"), ([],), "no tool calls")
    if g("tool_choice") is not None:
        _only("tool_choice", g("tool_choice"), ("none",), "no tool calls")
    if g("top_logprobs") is not None:
        _only("top_logprobs", g("top_logprobs"), (0,), "no log-probabilities")
    rf = g("response_format")
    if rf is not None:
        _only("response_format", rf, ({"type": "text"},), "free text only")
    if g("store") is not None:
        _only("store", g("store"), (False,), "nothing is stored")
    if g("metadata") is not None and not isinstance(g("metadata"), dict):
        raise _bad("metadata", "an object", g("metadata"))
    kw = g("chat_template_kwargs")
    if kw is not None:
        if not isinstance(kw, dict) or not all(isinstance(k, str) and not k.startswith("_") for k in kw):
            raise _bad("chat_template_kwargs", "an object of template variables", kw)
        req.template_kwargs = dict(kw)
    return req


# ---- responses -----------------------------------------------------------------------------------

FINISH = {"eog": "stop", "stop": "stop", "length": "length", "context": "length"}


def usage(n_prompt: int, n_new: int, n_cached: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def response(req: GenerationRequest, text: str, finish: str, use: dict, timings: dict) -> dict:
    """The non-streamed answer."""
    if req.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice],
            "usage": use, "timings": timings}


def chunk(req: GenerationRequest, *, text: str | None = None, role: bool = False, finish: str | None = None,
          use: dict | None = None, timings: dict | None = None, choices: bool = True) -> dict:
    """One streamed event: a piece of text, the role (chat's first chunk), the finish reason, or
    (choices=False) the usage chunk that stream_options.include_usage asks for."""
    if req.kind == "completion":
        obj = "text_completion"
        c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    else:
        obj = "chat.completion.chunk"
        delta = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    out = {"id": req.id, "object": obj, "created": req.created, "model": req.model,
           "choices": [c] if choices else []}
    if use is not None:
        out["usage"] = use
    if timings is not None:
        out["timings"] = timings
    return out
