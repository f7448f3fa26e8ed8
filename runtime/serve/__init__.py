"""`ggfuse serve`: a model behind an OpenAI-compatible HTTP API, with a prompt-prefix cache.

    from ggfuse.runtime.serve import Server, ServeSettings, make_cache
    m = ggfuse.load("model.gguf")
    srv = Server(m, ServeSettings(port=0, model_name="tiny"), cache=make_cache(m, 4 << 30)).start()
    ...  # http://127.0.0.1:{srv.port}/v1/chat/completions
    srv.stop()

The pieces: protocol.py (the API's request checks and response shapes), worker.py (one job at a
time on the model, a bounded FIFO, cancellation), app.py (Starlette routes, key and body-size
guard, server-sent events). The stack is Starlette on uvicorn (the `serve` extra): a small,
well-kept ASGI toolkit and server; requests are checked by hand against the API's rules, which
is where OpenAI's error shapes come from.
"""
from __future__ import annotations

import socket
import threading
import time

from ggfuse.errors import GGFuseError
from ggfuse.runtime.serve.app import ServeSettings

__all__ = ["Server", "ServeSettings", "make_cache", "warm_up", "require_stack"]


def require_stack() -> None:
    """GGFuseError unless Starlette and uvicorn are installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GGFuseError(None, f"ggfuse serve needs Starlette and uvicorn ({e.name} is missing): "
                                f"pip install 'ggfuse[serve]'") from None


def make_cache(model, budget: int, memory: str = "auto"):
    """A PrefixCache of `budget` bytes for the model, or None (budget 0). memory: host, device
    or auto (device memory where the budget takes at most half of what the GPU has free)."""
    from ggfuse.runtime.prefix_cache import PrefixCache
    if memory not in ("auto", "host", "device"):
        raise GGFuseError(None, f"--cache-memory must be auto, host or device, not {memory!r}")
    if budget == 0:
        return None
    be = model.backend
    if be.name == "cpu":
        if memory == "device":
            raise GGFuseError(None, "--cache-memory device needs the cuda device (the cpu device has host memory only)")
        return PrefixCache(budget, "host")
    if memory == "auto":
        free = be.cp.cuda.runtime.memGetInfo()[0]
        memory = "device" if budget <= free // 2 else "host"
    return PrefixCache(budget, memory)


def warm_up(model) -> None:
    """Run each chunk size the device captures once (a prefill of that many tokens, the one-token
    step included), so that no request pays for module loading and graph capture."""
    sizes = sorted(set(getattr(model.backend, "captures", None) or []))
    for c in sizes:
        model.reset()
        model.prefill([0] * c, logits="last")
    model.reset()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets
        # whose proto says TCP, and with Nagle on, a response written in two pieces (headers, then
        # the body or an event) waits for the client's delayed ACK: 40 ms on a kept-alive connection
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except (OSError, UnicodeError) as e:
        raise GGFuseError(None, f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Server:
    """The app on uvicorn, in the foreground (run) or a background thread (start / stop)."""

    def __init__(self, model, settings: ServeSettings, *, cache=None, chat_template: str | None = None,
                 log_level: str = "warning"):
        from ggfuse.runtime.chat import ChatTemplate, ChatTemplateError
        from ggfuse.runtime.generate import context_limit
        from ggfuse.runtime.serve.app import TextEndpoint, make_app
        from ggfuse.runtime.serve.worker import ModelWorker
        require_stack()
        tok = model.tokenizer            # GGFuseError when the GGUF has none: text needs it
        try:
            template = ChatTemplate.from_tokenizer(tok, chat_template)
        except ChatTemplateError:
            if chat_template is not None:
                raise
            template = None              # /v1/chat/completions answers 400 then
        limits = [x for x in (context_limit(model), settings.max_context) if x]
        if not limits:
            raise GGFuseError(model.gguf.path, "the model's context length is unknown; give --max-context")
        self.model, self.settings, self.cache = model, settings, cache
        self.context = min(limits)
        self.worker = ModelWorker(model, cache=cache, max_queue=settings.max_queue)
        self.app = make_app(self.worker, TextEndpoint(model, template, self.context), settings)
        self.log_level = log_level
        self.sock = _listen(settings.host, settings.port)
        self.port = self.sock.getsockname()[1]
        self._uvicorn = None
        self._thread = None

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def _make_uvicorn(self):
        import uvicorn
        cfg = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="off",
                             timeout_graceful_shutdown=5, server_header=False)
        return uvicorn.Server(cfg)

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C / SIGTERM), then stop the worker."""
        self._uvicorn = self._make_uvicorn()
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.worker.close()
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        self._uvicorn = self._make_uvicorn()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="ggfuse-serve", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise GGFuseError(None, "the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        self.worker.close()
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
