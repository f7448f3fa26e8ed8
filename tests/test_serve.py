"""`ggfuse serve` (runtime/serve/): a real server on a free loopback port, talked to with the official
`openai` client (streamed and not) and raw HTTP (httpx): answers equal to the model's own, the
prefix cache across chat turns, concurrent clients, FIFO order and a full queue (503 +
Retry-After), a client that disconnects (mid-stream or while queued), bad requests (400 with
OpenAI's error object), the API key, the CLI. The tiny models run on the CPU backend."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import ggfuse
from ggfuse.runtime.serve import Server, ServeSettings, make_cache
from util import fixture

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "qwen35moe-tiny-q4_k_m.gguf")
NAME = "tiny"


@pytest.fixture(scope="module")
def model():
    return ggfuse.load(EXAMPLE, device="cpu")


class Gated:
    """A backend wrapper: every chunk waits at `gate` (set: open) and is recorded; with no_end,
    end-of-generation tokens cannot be sampled (answers run to max_tokens)."""

    def __init__(self, inner, eog=(), delay=0.0):
        self.inner, self.eog, self.delay = inner, sorted(eog), delay
        self.gate = threading.Event()
        self.gate.set()
        self.seen = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_chunk(self, tokens, want="all"):
        self.seen.append([int(t) for t in tokens])
        assert self.gate.wait(30), "the test never opened the gate"
        if self.delay:
            time.sleep(self.delay)
        out = self.inner.run_chunk(tokens, want)
        if out is not None and self.eog:
            out = out.copy()
            out[..., self.eog] = -1e30
        return out


class served:
    """Context manager: a Server for `model` on a free loopback port; yields it."""

    def __init__(self, model, cache_budget=64 << 20, wrap=None, **settings):
        self.model, self.budget, self.wrap = model, cache_budget, wrap
        self.settings = ServeSettings(port=0, model_name=NAME, **settings)

    def __enter__(self):
        self.inner = self.model.backend
        if self.wrap is not None:
            self.model.backend = self.wrap
        self.srv = Server(self.model, self.settings, cache=make_cache(self.model, self.budget)).start()
        return self.srv

    def __exit__(self, *exc):
        if self.wrap is not None:
            self.wrap.gate.set()
        self.srv.stop()
        self.model.backend = self.inner
        return False


def client(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(c, messages, **kw):
    return c.chat.completions.create(model=NAME, messages=messages, **{"max_tokens": 6, "temperature": 0, **kw})


def wait_for(pred, timeout=20.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


# ---- the API with the official client ------------------------------------------------------------

def test_openai_client_streamed_and_not_give_the_models_own_answer(model):
    want = model.generate("Once upon a time", 5)
    want_text = model.tokenizer.decode(want)
    with served(model) as srv:
        c = client(srv)
        assert [m.id for m in c.models.list().data] == [NAME]
        r = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == want_text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len(model.tokenizer.encode(
            "Once upon a time", add_special=True, parse_special=True))
        assert r.usage.total_tokens == r.usage.prompt_tokens + 5
        parts = list(c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0,
                                          stream=True))
        assert "".join(p.choices[0].text for p in parts) == want_text
        assert parts[-1].choices[0].finish_reason == "length"
        # a prompt of token ids
        ids = model.tokenizer.encode("Once upon a time", add_special=True, parse_special=True)
        r = c.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0)
        assert r.choices[0].text == want_text
        assert r.usage.prompt_tokens_details.cached_tokens > 0     # the same prompt again
        msgs = [{"role": "user", "content": "Hello"}]
        whole = chat(c, msgs)
        assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
        text = whole.choices[0].message.content
        assert isinstance(text, str) and whole.usage.completion_tokens > 0
        chunks = list(chat(c, msgs, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_seed_and_sampling_are_repeatable(model):
    with served(model) as srv:
        c = client(srv)
        kw = dict(prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
        a = c.completions.create(model=NAME, **kw).choices[0].text
        b = c.completions.create(model=NAME, **kw).choices[0].text
        assert a == b
        stops = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0,
                                     stop=[a[2:4]] if len(a) > 3 else None)
        assert stops.choices[0].finish_reason in ("stop", "length")


def test_a_multi_turn_chat_resumes_from_the_cache_with_the_same_answers(model):
    turns = ["Hi there", "Tell me more", "And then?"]

    def talk(budget):
        with served(model, cache_budget=budget) as srv:
            c, msgs, out = client(srv), [], []
            for t in turns:
                msgs.append({"role": "user", "content": t})
                r = chat(c, msgs)
                msgs.append({"role": "assistant", "content": r.choices[0].message.content})
                out.append((r.choices[0].message.content, r.usage.prompt_tokens,
                            r.usage.prompt_tokens_details.cached_tokens))
            stats = httpx.get(srv.url + "/v1/stats").json()
        return out, stats

    cold, cold_stats = talk(0)
    warm, warm_stats = talk(64 << 20)
    assert [w[0] for w in warm] == [c[0] for c in cold]           # the same answers
    assert [w[1] for w in warm] == [c[1] for c in cold]
    assert all(c[2] == 0 for c in cold) and cold_stats["cache"] is None
    assert warm[0][2] == 0 and all(w[2] > 0 for w in warm[1:])
    # each later turn resumes where the earlier turn's messages end (before its answer's prompt,
    # which the template renders differently once the answer is in the conversation)
    from ggfuse.runtime.chat import ChatTemplate
    template, msgs = ChatTemplate.from_tokenizer(model.tokenizer), []
    for k, t in enumerate(turns[:-1]):
        msgs.append({"role": "user", "content": t})
        head = model.tokenizer.encode(template.render(msgs, add_generation_prompt=False), add_special=False,
                                      parse_special=True)
        assert warm[k + 1][2] == len(head) < warm[k][1], warm
        msgs.append({"role": "assistant", "content": warm[k][0]})
    assert warm_stats["cache"]["hits"] == 2 and warm_stats["cache"]["bytes"] <= 64 << 20


# ---- load and faults ------------------------------------------------------------------------------

def test_concurrent_clients_each_get_their_own_answer(model):
    prompts = [f"Story number {i}:" for i in range(6)]
    with served(model) as srv:
        c = client(srv)
        alone = [c.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0).choices[0].text
                 for p in prompts]
        got = [None] * len(prompts)
        errors = []

        def ask(i):
            try:
                if i % 2:
                    parts = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=4, temperature=0,
                                                 stream=True)
                    got[i] = "".join(p.choices[0].text for p in parts)
                else:
                    got[i] = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=4,
                                                  temperature=0).choices[0].text
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and got == alone
        assert wait_for(lambda: srv.worker.running is None)
        st = srv.worker.status()
        assert st["served"] == 12 and st["waiting"] == 0 and not st["running"]


def test_requests_wait_in_order_and_a_full_queue_answers_503(model):
    gate = Gated(model.backend, model.tokenizer.eog_ids)
    with served(model, wrap=gate, max_queue=2) as srv:
        gate.gate.clear()
        results = {}

        def ask(name):
            r = httpx.post(srv.url + "/v1/completions", timeout=60,
                           json={"model": NAME, "prompt": f"{name} {name} {name}", "max_tokens": 2, "temperature": 0})
            results[name] = (r.status_code, time.monotonic())
        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert wait_for(lambda: srv.worker.running is not None)
        others = []
        for name in ("second", "third"):
            others.append(threading.Thread(target=ask, args=(name,)))
            others[-1].start()
            assert wait_for(lambda n=len(others): srv.worker.status()["waiting"] == n)
        full = httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "fourth", "max_tokens": 2})
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        err = full.json()["error"]
        assert err["code"] == "queue_full" and "busy" in err["message"]
        gate.gate.set()
        for t in [first, *others]:
            t.join(60)
        assert all(results[n][0] == 200 for n in ("first", "second", "third"))
        assert results["first"][1] <= results["second"][1] <= results["third"][1]
        # the prompts reached the model in arrival order
        tok = model.tokenizer
        order = [next(n for n in ("first", "second", "third") if tok.encode(f"{n} {n} {n}", add_special=True,
                                                                             parse_special=True)[:4] == s[:4])
                 for s in gate.seen if len(s) > 1]
        assert order == ["first", "second", "third"]
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "waiting": 0, "running": False}


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(model):
    gate = Gated(model.backend, model.tokenizer.eog_ids, delay=0.01)
    with served(model, wrap=gate) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions",
                          json={"model": NAME, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 400,
                                "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [next(lines) for _ in range(5)]
                assert any(x.startswith("data: ") for x in got)
            # closed after a few events: the job stops and the model is free
        assert wait_for(lambda: srv.worker.status()["cancelled"] == 1 and srv.worker.running is None)
        n_chunks = len(gate.seen)
        assert n_chunks < 100, "the generation ran on after the client left"
        r = client(srv).completions.create(model=NAME, prompt="next", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3


def test_a_client_that_leaves_while_queued_frees_its_place(model):
    gate = Gated(model.backend, model.tokenizer.eog_ids)
    with served(model, wrap=gate, max_queue=1) as srv:
        gate.gate.clear()
        t = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": NAME, "prompt": "one", "max_tokens": 2}))
        t.start()
        assert wait_for(lambda: srv.worker.running is not None)
        with pytest.raises(httpx.ReadTimeout):     # waits in the queue, gives up
            httpx.post(srv.url + "/v1/completions", timeout=0.5, json={"model": NAME, "prompt": "two", "max_tokens": 2})
        assert wait_for(lambda: srv.worker.status()["waiting"] == 0)
        assert srv.worker.status()["cancelled"] == 1
        gate.gate.set()
        t.join(60)
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={"model": NAME, "prompt": "three", "max_tokens": 2})
        assert r.status_code == 200


BAD = [
    ("bad json", b"{not json", 400, "invalid_json", None),
    ("not an object", b"[1, 2]", 400, "invalid_json", None),
    ("unknown field", {"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "unknown_parameter", "frobnicate"),
    ("temperature type", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("temperature range", {"model": NAME, "prompt": "x", "temperature": 5}, 400, "invalid_value", "temperature"),
    ("top_p range", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p"),
    ("max_tokens", {"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ("seed", {"model": NAME, "prompt": "x", "seed": 1.5}, 400, "invalid_value", "seed"),
    ("stop", {"model": NAME, "prompt": "x", "stop": [1]}, 400, "invalid_value", "stop"),
    ("n", {"model": NAME, "prompt": "x", "n": 2}, 400, "unsupported_value", "n"),
    ("no prompt", {"model": NAME}, 400, "missing_parameter", "prompt"),
    ("empty prompt", {"model": NAME, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("token out of range", {"model": NAME, "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ("no model", {"prompt": "x"}, 400, "missing_parameter", "model"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model_not_found", "model"),
    ("prompt too long", {"model": NAME, "prompt": "word " * 200}, 400, "context_length_exceeded", "prompt"),
    ("max_tokens too many", {"model": NAME, "prompt": "x", "max_tokens": 500}, 400, "context_length_exceeded",
     "max_tokens"),
]
BAD_CHAT = [
    ("no messages", {"model": NAME}, 400, "missing_parameter", "messages"),
    ("empty messages", {"model": NAME, "messages": []}, 400, "invalid_value", "messages"),
    ("bad role", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role"),
    ("image part", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "invalid_value", "messages[0].content"),
    ("tools", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_value", "tools"),
    ("json mode", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                   "response_format": {"type": "json_object"}}, 400, "unsupported_value", "response_format"),
]


def test_bad_requests_are_400_with_an_error_object_and_the_server_carries_on(model):
    with served(model, max_context=64, max_body_bytes=4096) as srv, httpx.Client(base_url=srv.url) as h:
        for route, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for what, body, status, code, param in cases:
                kw = {"content": body} if isinstance(body, bytes) else {"json": body}
                r = h.post(route, **kw)
                assert r.status_code == status, (what, r.text)
                err = r.json()["error"]
                assert err["code"] == code and err["param"] == param and err["message"], (what, err)
                assert err["type"] == "invalid_request_error"
        r = h.post("/v1/completions", content=b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}')
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = h.post("/v1/completions", content=iter([b'{"model": "tiny", ', b'"prompt": "' + b"x" * 5000 + b'"}']))
        assert r.status_code == 413                                       # chunked: counted as it comes
        assert h.get("/v1/nothing").status_code == 404 and h.get("/v1/nothing").json()["error"]["code"] == "not_found"
        assert h.get("/v1/completions").status_code == 405
        # the official client raises the API's own errors
        c = client(srv)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            c.completions.create(model=NAME, prompt="word " * 200)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="gpt-9", prompt="x")
        r = c.completions.create(model=NAME, prompt="still here", max_tokens=2)
        assert r.usage.completion_tokens == 2 and srv.worker.status()["failed"] == 0


def test_the_api_key_guards_every_route_but_health(model):
    with served(model, api_key="s3cret") as srv, httpx.Client(base_url=srv.url) as h:
        assert h.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret-and-more"}):
            r = h.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert h.post("/v1/completions", json={"model": NAME, "prompt": "x"}).status_code == 401
        assert h.get("/v1/nothing").status_code == 401
        assert h.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").models.list()
        assert client(srv, "s3cret").completions.create(model=NAME, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_the_default_bind_is_loopback(model):
    assert ServeSettings().host == "127.0.0.1"
    from ggfuse.compiler.cli import build_parser
    assert build_parser().parse_args(["serve", "m.gguf"]).host == "127.0.0.1"
    with served(model) as srv:
        assert srv.sock.getsockname()[0] == "127.0.0.1"


def test_accepted_connections_do_not_wait_for_delayed_acks(model):
    """Nagle is off on the server's side of every connection (TCP_NODELAY): with it on, a response
    written in two pieces on a kept-alive connection waits for the client's delayed ACK (40 ms on
    Linux). asyncio sets it only on sockets whose proto is IPPROTO_TCP, so the listening socket
    must be made with that proto for the accepted ones to inherit it."""
    import socket
    import httpx
    with served(model) as srv:
        assert srv.sock.proto == socket.IPPROTO_TCP
        with httpx.Client() as c:
            assert c.get(srv.url + "/health").status_code == 200
            conns = list(srv._uvicorn.server_state.connections)
            assert conns
            for proto in conns:
                sock = proto.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert c.get(srv.url + "/health").status_code == 200


def test_chat_without_a_template_is_a_400(model):
    m = ggfuse.load(fixture("qwen3moe"), device="cpu")
    assert m.tokenizer.chat_template is None
    with served(m) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user",
                                                                                          "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "x",
                                                             "max_tokens": 1}).status_code == 200


# ---- the command -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--port", "http"], "--port must be an integer"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--cache-budget", "lots"], "--cache-budget"),
    (["--cache-memory", "disk"], "--cache-memory"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--api-key", "a", "--api-key-file", "k.txt"], "not both"),
    (["--api-key", "has space"], "API key"),
    (["--device", "tpu"], "--device"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_flags_are_one_line_errors(args, words, capsys):
    from ggfuse.compiler.cli import main
    rc = main(["serve", EXAMPLE, *args])     # checked before the model loads
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_the_command_serves_until_interrupted(tmp_path):
    key = tmp_path / "key.txt"
    key.write_text("k3y\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.Popen([sys.executable, "-m", "ggfuse.compiler.cli", "serve", EXAMPLE, "--device", "cpu",
                          "--port", "0", "--api-key-file", str(key), "--cache-budget", "16MiB", "--max-context", "256"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for _ in range(50):       # the model loads first
            seen.append(p.stderr.readline())
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", seen[-1])
            if m or not seen[-1]:
                break
        assert m, "".join(seen)
        line = seen[-1]
        assert "context 256" in line and "API key required" in line
        c = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="k3y", max_retries=0, timeout=60)
        name = c.models.list().data[0].id
        assert name == "qwen35moe-tiny-q4_k_m"
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(30)
    assert rc == 0, p.stderr.read()


def test_serve_captures_small_chunks_unless_told():
    """`ggfuse serve` captures down to 16 tokens (the answer's prompt after a cached prefix runs the
    smallest captured size); a --sub-chunk-min given wins, and a bad one is the usual error."""
    from ggfuse.compiler.cli import build_parser
    from ggfuse.errors import GGFuseError
    from ggfuse.options import Options
    from ggfuse.runtime.serve.cli import SERVE_SUB_CHUNK_MIN, serve_options
    p = build_parser()
    assert serve_options(p.parse_args(["serve", "m.gguf"])).sub_chunk_min == SERVE_SUB_CHUNK_MIN == 16
    assert Options().sub_chunk_min == 256
    assert serve_options(p.parse_args(["serve", "m.gguf", "--sub-chunk-min", "64"])).sub_chunk_min == 64
    with pytest.raises(GGFuseError, match="--sub-chunk-min"):
        serve_options(p.parse_args(["serve", "m.gguf", "--sub-chunk-min", "zero"]))


def _marks_both_ways(endpoint, req):
    """(ids, marks) of a chat request by the endpoint, and the mark by rendering the messages
    without the answer's prompt (what the shortcut must agree with)."""
    from ggfuse.runtime.generate import encode_rendered
    ids, marks = endpoint.prompt_ids(req)
    head = endpoint.template.render(req.messages, add_generation_prompt=False, **req.template_kwargs)
    return ids, marks, encode_rendered(endpoint.model.tokenizer, head)


@pytest.mark.parametrize("template", [None, "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                                            "{% if add_generation_prompt %}<assistant turn={{ messages | length }}>"
                                            "{% endif %}"])
def test_chat_prompt_marks_where_the_messages_end(model, template):
    # the model's own template (its answer's prompt found once, on a probe) and one whose answer
    # prompt changes with the conversation (the probe's does not match: rendered without it)
    from ggfuse.runtime.chat import ChatTemplate
    from ggfuse.runtime.serve.app import TextEndpoint
    from ggfuse.runtime.serve.protocol import parse_chat
    ep = TextEndpoint(model, ChatTemplate.from_tokenizer(model.tokenizer, template), 4096)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    for turn in range(3):
        req = parse_chat({"model": "m", "messages": msgs}, "m")
        ids, marks, head = _marks_both_ways(ep, req)
        assert marks == (len(head),) and ids[:len(head)] == head and len(head) < len(ids), (turn, marks)
        msgs = msgs + [{"role": "assistant", "content": f"Red, green and blue ({turn})."},
                       {"role": "user", "content": "And three more?"}]
    assert ep.prompt_ids(req, want_marks=False) == (ids, ())
    if template is None:        # the shortcut was taken: the answer's prompt known from the probe
        (text, tail), = ep._answer_prompts.values()
        assert text and ids[-len(tail):] == tail
