"""One model, one generation at a time: a FIFO of requests served by a worker thread.

Every model call (prefill, decode, the prefix cache's snapshots and restores) happens on the
worker thread, so no two requests ever share the model's state. Requests wait in arrival order
in a bounded queue (QueueFull when it is full: the server answers 503 with Retry-After). A
request can be cancelled at any time (its client went away): waiting, it leaves the queue at
once; running, it stops after the current prefill chunk or token and the next one starts.

A job's events go to its asyncio queue on the server's event loop, in order:
    ("token",)          the first new token exists (time to first token; chat sends its role)
    ("text", str)       a piece of the answer
    ("done", result)    the end: a dict with finish, usage numbers and timings
    ("error", APIError) the end, by failure
Exactly one of done / error ends every job that was accepted, cancelled ones included, so that
nothing waits for ever.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from ggfuse.errors import GGFuseError
from ggfuse.runtime.serve.protocol import FINISH, APIError

log = logging.getLogger("ggfuse.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised inside the worker to abandon a job whose client went away."""


@dataclass(eq=False)
class Job:
    ids: list
    max_new: int
    sampling: dict
    stop: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    ended: bool = False
    tokenize_s: float = 0.0
    tag: str = ""
    marks: tuple = ()          # prompt positions the prefix cache keeps a snapshot at too
    use_cache: bool = True     # False: neither resume from the prefix cache nor add to it

    def post(self, *event) -> None:
        if event[0] in ("done", "error"):
            if self.ended:
                return
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:     # the event loop is gone (server shut down): nobody is waiting
            pass


class ModelWorker:
    """Owns a model (and its prefix cache); runs one job at a time in FIFO order."""

    def __init__(self, model, *, cache=None, max_queue: int = 16):
        self.model = model
        self.cache = cache
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.running: Job | None = None
        self.served = 0
        self.failed = 0
        self.cancelled = 0
        self._mean_s = 1.0     # a running mean of job durations, for Retry-After
        self._thread = threading.Thread(target=self._serve_forever, name="ggfuse-model-worker", daemon=True)
        self._thread.start()

    # ---- the server's side (event-loop thread) --------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves the queue, or stops where it runs."""
        if job.ended:
            return
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return             # running (it stops at its next check) or already taken
        self.cancelled += 1
        job.post("error", APIError(499, "cancelled: the client went away", code="cancelled"))

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: when the running job ends, about a
        job's mean duration."""
        return int(min(max(math.ceil(self._mean_s), 1), 120))

    def status(self) -> dict:
        return {"waiting": len(self._waiting), "running": self.running is not None, "max_queue": self.max_queue,
                "served": self.served, "failed": self.failed, "cancelled": self.cancelled}

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, end the waiting ones (503), stop the running one, join the thread."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in waiting:
            job.post("error", APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        if self.running is not None:
            self.running.cancelled.set()
        self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------------
    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self.running = job
            try:
                self._run(job)
            except BaseException as e:   # never lose the thread: the job fails, the next one runs
                log.exception("worker: unexpected error")
                self.failed += 1
                job.post("error", APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        from ggfuse.runtime.generate import Generation
        job.t_start = time.perf_counter()
        if job.cancelled.is_set():
            self.cancelled += 1
            job.post("error", APIError(499, "cancelled: the client went away", code="cancelled"))
            return

        def check(_n_past):
            if job.cancelled.is_set():
                raise Cancelled()

        gen = None
        steps = None
        try:
            cache = self.cache if job.use_cache else None
            gen = Generation(self.model, job.ids, job.max_new, cache=cache, on_chunk=check, stop=job.stop,
                             cache_marks=job.marks, **job.sampling)
            steps = gen.pieces()
            first = True
            for tok, piece in steps:
                if first:
                    job.post("token")
                    first = False
                if piece:
                    job.post("text", piece)
                if job.cancelled.is_set():
                    raise Cancelled()
        except Cancelled:
            self.cancelled += 1
            job.post("error", APIError(499, "cancelled: the client went away", code="cancelled"))
            return
        except GGFuseError as e:
            self.failed += 1
            job.post("error", APIError(400, e.message, code="invalid_value"))
            return
        finally:
            if steps is not None:
                steps.close()
        st = gen.stats
        done = time.perf_counter()
        self.served += 1
        self._mean_s = 0.8 * self._mean_s + 0.2 * (done - job.t_start)
        result = {"finish": FINISH.get(st.finish, "stop"), "n_prompt": len(job.ids), "n_new": st.n_new,
                  "n_cached": st.n_cached,
                  "timings": {"queue_ms": 1e3 * (job.t_start - job.t_submit), "tokenize_ms": 1e3 * job.tokenize_s,
                              "prefill_ms": 1e3 * st.prefill_s, "ttft_ms": 1e3 * st.ttft_s,
                              "decode_ms": 1e3 * st.decode_s, "prompt_n": len(job.ids),
                              "cached_n": st.n_cached, "predicted_n": st.n_new,
                              "predicted_per_second": st.decode_tok_per_s}}
        log.info("%s prompt %d (%d cached) new %d, queue %.1f ms, TTFT %.1f ms, decode %.1f tok/s, %s", job.tag,
                 len(job.ids), st.n_cached, st.n_new, result["timings"]["queue_ms"], result["timings"]["ttft_ms"],
                 st.decode_tok_per_s, st.finish)
        job.post("done", result)
