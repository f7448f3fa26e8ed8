"""Programmatic dependent launch without a GPU: which edges of a captured graph kernels/graph.py
makes programmatic (a fake driver API stands in for cuda-python), and that every ggfuse kernel
built for sm_90 waits (griddepcontrol.wait) before its first global memory access, in the PTX
NVRTC makes of each source, while the sm_89 builds have no such instruction."""
import os
import re
import types
from enum import Enum

import pytest

from ggfuse.kernels import graph as kgraph
from ggfuse.kernels import nvrtc as knvrtc


class NodeType(Enum):
    KERNEL = 0
    MEMCPY = 1


class DepType(Enum):
    DEFAULT = 0
    PROGRAMMATIC = 1


class EdgeData:
    def __init__(self, type=DepType.DEFAULT, from_port=0):
        self.type, self.from_port, self.to_port = type, from_port, 0


class FakeDriver:
    """The calls make_programmatic makes, on a graph given as nodes {id: (type, func)} and
    edges [(src, dst, EdgeData)] (cuda-python 13's shapes: (error, *values))."""
    CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC = 1

    def __init__(self, nodes, edges, failing_params=()):
        self.nodes, self.edges, self.failing = nodes, list(edges), set(failing_params)
        self.CUgraphNodeType = types.SimpleNamespace(CU_GRAPH_NODE_TYPE_KERNEL=NodeType.KERNEL)
        self.CUgraphDependencyType = types.SimpleNamespace(CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC=DepType.PROGRAMMATIC)
        self.CUgraphEdgeData = EdgeData

    def cuGraphGetEdges(self, graph, n=0):
        if n == 0:
            return (0, None, None, None, len(self.edges))
        src, dst, data = zip(*self.edges)
        return (0, list(src), list(dst), list(data), len(self.edges))

    def cuGraphNodeGetType(self, node):
        return (0, self.nodes[node][0])

    def cuGraphKernelNodeGetParams(self, node):
        if node in self.failing:
            return (1, None)
        return (0, types.SimpleNamespace(func=self.nodes[node][1]))

    refuse: set = set()

    def cuGraphRemoveDependencies(self, graph, src, dst, data, n):
        if (src[0], dst[0]) in self.refuse:
            return (801,)      # CUDA_ERROR_NOT_SUPPORTED
        e = next(e for e in self.edges if e[0] == src[0] and e[1] == dst[0])
        self.edges.remove(e)
        return (0,)

    def cuGraphAddDependencies(self, graph, src, dst, data, n):
        self.edges.append((src[0], dst[0], data[0]))
        return (0,)


@pytest.fixture
def ready(monkeypatch):
    monkeypatch.setattr(knvrtc, "_pdl_ready", {101, 102, 103})
    return {101, 102, 103}


def _kinds(cu):
    return {(s, d): (e.type, e.from_port) for s, d, e in cu.edges}


def test_kernel_edges_into_ready_kernels_become_programmatic(ready):
    # 1 (ggfuse) -> 2 (ggfuse) -> 3 (cuBLAS, not ready) -> 4 (ggfuse) -> 5 (copy) -> 6 (ggfuse);
    # 6 -> 7 (ggfuse, params unreadable) ; 4 -> 8 (ggfuse, already programmatic)
    nodes = {1: (NodeType.KERNEL, 101), 2: (NodeType.KERNEL, 102), 3: (NodeType.KERNEL, 999),
             4: (NodeType.KERNEL, 103), 5: (NodeType.MEMCPY, None), 6: (NodeType.KERNEL, 101),
             7: (NodeType.KERNEL, 102), 8: (NodeType.KERNEL, 103)}
    edges = [(1, 2, EdgeData()), (2, 3, EdgeData()), (3, 4, EdgeData()), (4, 5, EdgeData()), (5, 6, EdgeData()),
             (6, 7, EdgeData()), (4, 8, EdgeData(DepType.PROGRAMMATIC, 1))]
    cu = FakeDriver(nodes, edges, failing_params={7})
    assert kgraph.make_programmatic(cu, "g") == 2
    k = _kinds(cu)
    prog = (DepType.PROGRAMMATIC, 1)
    assert k[(1, 2)] == prog and k[(3, 4)] == prog and k[(4, 8)] == prog   # a library kernel may precede
    assert k[(2, 3)] == (DepType.DEFAULT, 0)      # into cuBLAS: it does not wait
    assert k[(4, 5)] == (DepType.DEFAULT, 0) and k[(5, 6)] == (DepType.DEFAULT, 0)   # copies
    assert k[(6, 7)] == (DepType.DEFAULT, 0)      # a kernel whose function cannot be read
    assert len(cu.edges) == len(edges)


def test_no_ready_kernels_no_change(monkeypatch):
    monkeypatch.setattr(knvrtc, "_pdl_ready", set())
    nodes = {1: (NodeType.KERNEL, 101), 2: (NodeType.KERNEL, 102)}
    cu = FakeDriver(nodes, [(1, 2, EdgeData())])
    assert kgraph.make_programmatic(cu, "g") == 0 and _kinds(cu)[(1, 2)] == (DepType.DEFAULT, 0)


def test_only_sm90_modules_register_their_kernels(monkeypatch):
    monkeypatch.setattr(knvrtc, "_pdl_ready", set())
    raw = types.SimpleNamespace(get_function=lambda name: types.SimpleNamespace(ptr=hash(name) & 0xFFFF or 1))
    a = knvrtc._Module(raw, pdl=True).get_function("k_ready")
    b = knvrtc._Module(raw, pdl=False).get_function("k_old")
    assert knvrtc.pdl_ready(a.ptr) and not knvrtc.pdl_ready(b.ptr)
    assert knvrtc._ARCH_CC.match("compute_89").group(1) == "89" and knvrtc._ARCH_CC.match("sm_90a").group(1) == "90"


nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
SOURCES = knvrtc.all_sources()
_GLOBAL_ACCESS = re.compile(r"^\s*(?:@%p\d+\s+)?(ld\.global|st\.global|atom\.|red\.|cp\.async|ldu\.global)", re.M)


def _entries(ptx: str) -> dict:
    """{entry name: body} of a PTX module."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx):
        start = ptx.index("{", m.end())
        depth, i = 0, start
        while True:
            c = ptx[i]
            depth += c == "{"
            depth -= c == "}"
            if depth == 0:
                break
            i += 1
        out[m.group(1)] = ptx[start:i]
    return out


@pytest.mark.parametrize("path", SOURCES, ids=[os.path.relpath(p, knvrtc.KERNELS_DIR) for p in SOURCES])
def test_every_sm90_kernel_waits_before_touching_memory(path, tmp_path, monkeypatch):
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))
    arch = knvrtc.source_arch(path, "sm_90").replace("sm_", "compute_")
    entries = _entries(knvrtc.compile_cubin(path, arch).decode())
    assert entries
    for name, body in entries.items():
        w = body.find("griddepcontrol.wait")
        assert w >= 0, f"{name}: no griddepcontrol.wait (call ggf_pdl_entry / ggf_pdl_wait, kernels/pdl.cuh)"
        early = _GLOBAL_ACCESS.search(body[:w])
        assert early is None, f"{name}: {early.group(1)} before griddepcontrol.wait"


@pytest.mark.parametrize("path", [p for p in SOURCES if knvrtc.source_arch(p, "sm_89") == "sm_89"][:3])
def test_sm89_builds_have_no_programmatic_wait(path, tmp_path, monkeypatch):
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))
    assert "griddepcontrol" not in knvrtc.compile_cubin(path, "compute_89").decode()


def test_an_edge_the_driver_refuses_keeps_its_full_dependency(ready):
    nodes = {1: (NodeType.KERNEL, 101), 2: (NodeType.KERNEL, 102), 3: (NodeType.KERNEL, 103)}
    cu = FakeDriver(nodes, [(1, 2, EdgeData()), (2, 3, EdgeData())])
    cu.refuse = {(1, 2)}
    assert kgraph.make_programmatic(cu, "g") == 1
    k = _kinds(cu)
    assert k[(1, 2)] == (DepType.DEFAULT, 0) and k[(2, 3)] == (DepType.PROGRAMMATIC, 1)
