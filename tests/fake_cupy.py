"""A numpy-backed stand-in for CuPy, for CPU tests of the CUDA backend's plumbing: it lets
CUDABackend upload weights, lay out the arena, bind every launch and capture, with each kernel
launcher replaced by a stub that checks its call against the real launcher's signature.

Stream-ordering operations are logged in the same call list as the kernel stubs, in program
order: ("event.record", (event, stream)), ("stream.wait_event", (stream, event)),
("runtime.memcpyAsync", (dst, src, nbytes, kind, stream_ptr)) - the copy really happens, host to
host, since a fake device array is host memory - ("runtime.hostRegister", (ptr, size, flags)),
("capture.begin", stream) and ("capture.end", stream)."""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import importlib
import inspect
import sys
import types

import numpy as np


class FakeArray(np.ndarray):
    def set(self, src, stream=None):
        self[...] = np.asarray(src).reshape(self.shape)

    def get(self, stream=None):
        return np.asarray(self)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _arr(a):
    return np.asarray(a).view(FakeArray)


_ids = itertools.count(1)


class Stream:
    log: list = []

    by_ptr: dict = {}

    def __init__(self, non_blocking=False):
        self.captures = 0
        self.ptr = 0x1000 + next(_ids)
        Stream.by_ptr[self.ptr] = self

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def synchronize(self):
        pass

    def wait_event(self, event):
        Stream.log.append(("stream.wait_event", (self, event)))

    def begin_capture(self):
        self.captures += 1
        Stream.log.append(("capture.begin", self))

    def end_capture(self):
        Stream.log.append(("capture.end", self))
        return _fake_graph()


def _fake_graph(pdl: bool = False):
    return types.SimpleNamespace(launch=lambda stream=None: Stream.log.append(("graph.launch", stream)),
                                 pdl_edges=0, pdl=pdl)


def _stream_end_capture(ptr):
    """cudaStreamEndCapture as kernels/graph.py calls it for a programmatic graph: the handle
    its _programmatic_graph (patched by fake_device) receives."""
    Stream.log.append(("capture.end", Stream.by_ptr[ptr]))
    return ptr


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.id = next(_ids)

    def record(self, stream=None):
        Stream.log.append(("event.record", (self, stream)))

    def synchronize(self):
        pass

    def __repr__(self):
        return f"Event#{self.id}"


def _memcpy_async(dst, src, n, kind, stream_ptr):
    Stream.log.append(("runtime.memcpyAsync", (dst, src, n, kind, stream_ptr)))
    ctypes.memmove(dst, src, n)


def _host_register(ptr, size, flags):
    Stream.log.append(("runtime.hostRegister", (ptr, size, flags)))
    if Stream.refuse_register:
        raise RuntimeError("cudaErrorNotSupported (fake)")


def make_fake_cupy():
    cp = types.ModuleType("cupy")
    cp.float32, cp.uint16, cp.uint8, cp.int32 = np.float32, np.uint16, np.uint8, np.int32
    cp.empty = lambda shape, dtype=np.float32: _arr(np.full(shape, 0xFF if np.dtype(dtype).kind in "ui" else np.nan,
                                                             dtype=dtype))
    cp.zeros = lambda shape, dtype=np.float32: _arr(np.zeros(shape, dtype=dtype))
    cp.asnumpy = lambda a, stream=None: np.array(a)
    cp.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
        as_strided=lambda a, shape, strides: np.lib.stride_tricks.as_strided(a, shape, strides).view(FakeArray)))
    cuda = types.SimpleNamespace()
    cuda.Stream = Stream
    cuda.alloc_pinned_memory = lambda n: bytearray(n)
    cuda.runtime = types.SimpleNamespace(memGetInfo=lambda: (70 << 30, 80 << 30), getDeviceCount=lambda: 1,
                                         memcpyAsync=_memcpy_async, hostRegister=_host_register,
                                         streamEndCapture=_stream_end_capture,
                                         hostUnregister=lambda ptr: Stream.log.append(("runtime.hostUnregister", ptr)),
                                         getDeviceProperties=lambda i: {"multiProcessorCount": 132,
                                                                        "name": b"fake H200"})
    cuda.Device = lambda *a: types.SimpleNamespace(synchronize=lambda: None, compute_capability=Stream.cc, id=0)
    cuda.memory = types.SimpleNamespace(OutOfMemoryError=MemoryError)
    cuda.Event = Event
    cuda.get_elapsed_time = lambda a, b: 1.0
    cp.cuda = cuda
    return cp


LAUNCH_MODULES = ["ggfuse.kernels.dense.launch", "ggfuse.kernels.gemm.launch", "ggfuse.kernels.moe.launch",
                  "ggfuse.kernels.attention.launch", "ggfuse.kernels.deltanet.launch",
                  "ggfuse.kernels.dense.qf32", "ggfuse.kernels.moe.launch_f32", "ggfuse.kernels.gemm.blas"]


@contextlib.contextmanager
def fake_device(monkeypatch, refuse_register: bool = False, cc: str = "90"):
    """Install the fake cupy and signature-checking launcher stubs; yields the call log (kernel
    calls and stream operations in program order). refuse_register: hostRegister raises; cc:
    the fake device's compute capability (an H200's by default)."""
    cp = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    calls = []
    Stream.log = calls
    Stream.refuse_register = refuse_register
    Stream.cc = cc
    from ggfuse.kernels.gemm import blas
    from ggfuse.kernels.gemm import launch as gl
    monkeypatch.setattr(blas, "usable", lambda a_dtype, w_type: a_dtype == "bf16" and w_type == "bf16")
    monkeypatch.setattr(gl, "_cc", {})      # per-device caches of the real device's properties
    monkeypatch.setattr(gl, "_sms", {})
    from ggfuse.kernels import graph as kgraph
    monkeypatch.setattr(kgraph, "_programmatic_graph", lambda handle: _fake_graph(pdl=True))
    for modname in LAUNCH_MODULES:
        mod = importlib.import_module(modname)
        for name, fn in list(vars(mod).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != modname:
                continue
            sig = inspect.signature(fn)
            if "stream" not in sig.parameters and name != "prepare":
                continue  # pure helpers (workspace sizes, smem sizes) stay real

            def stub(*args, __sig=sig, __name=f"{modname.split('.')[-2]}.{name}", **kwargs):
                sig_bound = __sig.bind(*args, **kwargs)   # raises TypeError on a wrong call
                calls.append((__name, sig_bound))
                return None
            monkeypatch.setattr(mod, name, stub)
    yield calls
