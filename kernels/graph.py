"""Capture launches as one CUDA graph, optionally with programmatic dependent launch (PDL).

    g = capture(stream, launches, pdl=True)    # launches: callables that enqueue on `stream`
    g.launch(stream)                           # replay
    g.pdl_edges                                # edges made programmatic (0 without pdl)

Stream capture records one launch after another as a chain of full dependencies: a kernel
starts only after the one before it has completed and drained, which costs a few microseconds
per edge, most of a small kernel's time (the decode step runs about 600 of them per token).
With `pdl`, every kernel-to-kernel edge whose destination is a ggfuse kernel built for sm_90 or
newer (kernels/nvrtc.py pdl_ready) becomes a programmatic edge: the destination's blocks may
be scheduled once every block of the source has issued griddepcontrol.launch_dependents, run
what needs no earlier kernel (a GEMV asks L2 for its weight rows), and wait in
griddepcontrol.wait until the source has completed and its writes are visible
(kernels/pdl.cuh). Transitively each kernel still starts its dependent work after every kernel
before it has completed: a kernel's completion follows its own wait. Edges into other kernels
(cuBLAS, CuPy's), copies and memsets stay full dependencies.

Without pdl this is CuPy's own capture (its Graph). With pdl the graph is ended, rewritten and
instantiated through the driver API (cuda-python), which CuPy's Graph does not expose.
"""
from __future__ import annotations

from ggfuse.kernels import nvrtc


class GraphError(RuntimeError):
    pass


def _check(res, what: str) -> tuple:
    """cuda-python's (error, *values): the values, or GraphError naming the call."""
    res = res if isinstance(res, tuple) else (res,)
    if int(res[0]) != 0:
        raise GraphError(f"{what} failed: {res[0]}")
    return res[1:]


def capture(stream, launches, pdl: bool = False):
    """The launches captured on `stream` as one graph (see the module doc)."""
    stream.begin_capture()
    handle = None
    try:
        with stream:        # launches that use "the current stream" record into the capture too
            for fn in launches:
                fn()
    finally:
        if pdl:
            import cupy
            handle = cupy.cuda.runtime.streamEndCapture(stream.ptr)
        else:
            g = stream.end_capture()
    if not pdl:
        return g
    return _programmatic_graph(handle)


def _edges(cu, graph):
    """(from, to, edge data or None) of every edge, for cuda-python 12 (the _v2 calls) or 13."""
    get = getattr(cu, "cuGraphGetEdges_v2", None) or cu.cuGraphGetEdges
    count = _check(get(graph, 0), "cuGraphGetEdges")[-1]
    if count == 0:
        return []
    out = _check(get(graph, count), "cuGraphGetEdges")
    if len(out) == 4:
        src, dst, data, _ = out
    else:
        (src, dst, _), data = out, [None] * count
    return list(zip(src, dst, data))


def _node_info(cu, node, cache: dict) -> tuple:
    """(is a kernel node, is a kernel ready for a programmatic edge into it)."""
    key = int(node)
    if key not in cache:
        (ty,) = _check(cu.cuGraphNodeGetType(node), "cuGraphNodeGetType")
        kernel = ty == cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL
        ready = False
        if kernel:
            res = cu.cuGraphKernelNodeGetParams(node)     # fails for some library kernels: not ready
            ready = int(res[0]) == 0 and nvrtc.pdl_ready(int(res[1].func))
        cache[key] = (kernel, ready)
    return cache[key]


def make_programmatic(cu, graph) -> int:
    """Turn every full edge kernel -> ready ggfuse kernel of `graph` into a programmatic one
    (source port: its launch_dependents); the number of edges changed."""
    cache: dict = {}
    add = getattr(cu, "cuGraphAddDependencies_v2", None) or cu.cuGraphAddDependencies
    remove = getattr(cu, "cuGraphRemoveDependencies_v2", None) or cu.cuGraphRemoveDependencies
    prog = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
    changed = 0
    for src, dst, data in _edges(cu, graph):
        if data is not None and data.type == prog:
            continue
        src_kernel, _ = _node_info(cu, src, cache)
        _, dst_ready = _node_info(cu, dst, cache)
        if not (dst_ready and src_kernel):
            continue
        # the driver refuses some edges (CUDA_ERROR_NOT_SUPPORTED, e.g. around library kernels
        # that captured nodes of their own): those keep their full dependency
        if int(remove(graph, [src], [dst], [data] if data is not None else None, 1)[0]) != 0:
            continue
        ed = cu.CUgraphEdgeData()
        ed.type = prog
        ed.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
        if int(add(graph, [src], [dst], [ed], 1)[0]) != 0:
            _check(add(graph, [src], [dst], [data] if data is not None else None, 1), "cuGraphAddDependencies")
            continue
        changed += 1
    return changed


class ProgrammaticGraph:
    """A captured graph rewritten with programmatic edges, instantiated through the driver."""

    def __init__(self, handle: int):
        from cuda.bindings import driver as cu
        self._cu = cu
        self.graph = cu.CUgraph(int(handle))
        self.exec = None
        try:
            self.pdl_edges = make_programmatic(cu, self.graph)
            (self.exec,) = _check(cu.cuGraphInstantiate(self.graph, 0), "cuGraphInstantiate")
        except BaseException:
            cu.cuGraphDestroy(self.graph)
            self.graph = None
            raise

    def launch(self, stream=None):
        import cupy
        s = stream if stream is not None else cupy.cuda.get_current_stream()
        _check(self._cu.cuGraphLaunch(self.exec, self._cu.CUstream(int(s.ptr))), "cuGraphLaunch")

    def __del__(self):
        cu = getattr(self, "_cu", None)
        if cu is None:
            return
        try:
            if self.exec is not None:
                cu.cuGraphExecDestroy(self.exec)
            if self.graph is not None:
                cu.cuGraphDestroy(self.graph)
        except Exception:  # noqa: BLE001 -- interpreter shutdown: the driver may be gone
            pass


def _programmatic_graph(handle):
    return ProgrammaticGraph(handle)
