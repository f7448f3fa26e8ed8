"""The schema of a plan file (format 4.x): the types and ranges of every field the loader, the
runtime and `ggfuse inspect` read, checked before any of them looks at the file.

A plan is input like a GGUF: it may be truncated, hand-edited or hostile. `read_plan_json`
parses it with bounds (size, nesting depth, digits, no NaN / Infinity), then
`validate_plan_json` checks it against the pydantic models below (strict: no "3" for 3, no true
for 1). Fields a newer 4.x minor version adds are ignored (the bump rule in compiler/plan.py);
fields this version reads must have their types. Every failure names the field, e.g.
`steps[12].inputs[0]: ...`.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ggfuse.ir.ops import Op
from ggfuse.ir.types import DType

MAX_PLAN_BYTES = 1 << 30         # a 80B-parameter model's plan is a few MiB
MAX_DEPTH = 32                   # the deepest real nesting is 6 (steps[].meta.kernel.by_chunk.N.tile)
MAX_INT = 1 << 62                # byte offsets of the largest GGUF fit easily
MAX_STEPS = 1 << 20

Int = Annotated[int, Field(ge=0, le=MAX_INT)]
SmallInt = Annotated[int, Field(ge=0, le=1 << 31)]
PosInt = Annotated[int, Field(ge=1, le=1 << 31)]
Num = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=4096)]
ValueRef = Annotated[str, Field(pattern=r"^%[0-9]{1,9}(\.[0-9]{1,3})?$")]
ChunkKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
Scalar = Union[bool, int, float, str, None]
Dim = Union[Annotated[int, Field(ge=0, le=1 << 40)], Annotated[str, Field(max_length=64)]]


class _M(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Source(_M):
    path: Name
    size: Int
    header_sha256: Name


class BuildInfo(_M):
    version: Optional[Name] = None
    commit: Optional[Name] = None


class TensorJSON(_M):
    dtype: Literal[tuple(d.value for d in DType)]        # type: ignore[valid-type]
    shape: Annotated[list[Dim], Field(max_length=8)]


class KernelRecord(_M):
    name: Name
    by_chunk: dict[ChunkKey, dict[Name, Any]] = {}


class NodeMeta(_M):
    kernel: Optional[KernelRecord] = None
    storage: Optional[Annotated[list[Name], Field(max_length=16)]] = None
    workspace: Optional[dict[ChunkKey, dict[Name, Int]]] = None
    workspace_at: Optional[dict[ChunkKey, dict[Name, Int]]] = None
    arena: Optional[dict[ChunkKey, list[Optional[Int]]]] = None
    layer: Optional[SmallInt] = None
    segment: Optional[SmallInt] = None
    sched_key: Num = 0.0        # absent: the node's id (ir/graph.py topo); never null


class Step(_M):
    id: SmallInt
    op: Literal[tuple(o.value for o in Op)]               # type: ignore[valid-type]
    name: Name = ""
    inputs: Annotated[list[ValueRef], Field(max_length=256)]
    attrs: dict[Name, Union[Scalar, Annotated[list[Union[Scalar, list[Scalar]]], Field(max_length=256)]]]
    outputs: Annotated[list[TensorJSON], Field(min_length=1, max_length=16)]
    meta: NodeMeta = NodeMeta()


class WeightJSON(_M):
    name: Name
    ggml_type: Name
    shape: Annotated[list[Int], Field(max_length=8)]
    offset: Int
    nbytes: Int


class Hparams(_M):
    n_vocab: PosInt
    n_layer: Optional[SmallInt] = None
    n_embd: Optional[SmallInt] = None
    n_expert: Optional[SmallInt] = None
    n_expert_used: Optional[SmallInt] = None
    recurrent: Optional[Annotated[list[bool], Field(max_length=1 << 16)]] = None


class Memory(_M):
    peak_bytes: Int
    naive_bytes: Int
    arena_bytes: Int = 0


class Predicted(_M):
    transfer_ms: Num
    h2d_gbps: Num
    compute_ms: Num
    chunk_ms: Num
    hidden_fraction: Num


class Prefetch(_M):
    budget_bytes: Optional[Int] = None
    resident_bytes: Int = 0
    fixed_bytes: dict[Name, Int] = {}
    pinned_layers: list[SmallInt] = []
    streamed_layers: list[SmallInt] = []
    streamed_experts: dict[Name, SmallInt] = {}
    slots: SmallInt = 0
    slot_bytes: Int = 0
    pieces_per_layer: PosInt = 1
    n_experts: Optional[SmallInt] = None
    mode: Name = ""
    bytes_moved_per_chunk: Int = 0
    max_context: Optional[PosInt] = None
    embedding: Optional[Name] = None
    embedding_tensor: Optional[Name] = None
    head_block: Optional[PosInt] = None
    predicted: Optional[Predicted] = None


class Segment(_M):
    id: SmallInt
    n_nodes: SmallInt
    starts_with: Name


class Target(_M):
    name: Name
    cc: SmallInt
    sms: PosInt


class DenseForm(_M):
    why: Name


class Pdl(_M):
    on: bool
    why: Annotated[str, Field(max_length=400)]


class Lowering(_M):
    target: Target
    precision: Name
    captures: Annotated[list[PosInt], Field(min_length=1, max_length=64)]
    dense_form: DenseForm
    pdl: Optional[Pdl] = None


class DeviceWeight(_M):
    forms: list[Name] = []
    residency: Optional[Name] = None
    device_bytes: Optional[Int] = None
    resident_experts: Optional[SmallInt] = None


class GraphMeta(_M):
    memory: Optional[Memory] = None
    prefetch: Optional[Prefetch] = None
    segments: Optional[list[Segment]] = None
    lowering: Optional[Lowering] = None
    weights: Optional[dict[Name, DeviceWeight]] = None
    op_counts_before: Optional[dict[Name, Int]] = None


class Stats(GraphMeta):
    pass


class PlanJSON(_M):
    format: Literal["ggfuse-plan"]
    version: Annotated[list[SmallInt], Field(min_length=2, max_length=2)]
    source: Source
    arch: Annotated[str, Field(min_length=1, max_length=256)]
    hparams: Hparams
    chunk: PosInt
    options: dict[Name, Scalar]
    ggfuse: BuildInfo = BuildInfo()
    passes: list[Name] = []
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]
    outputs: dict[Name, ValueRef]
    weights: list[WeightJSON]
    graph_meta: GraphMeta = GraphMeta()
    stats: Stats = Stats()


class PlanSchemaError(ValueError):
    """One line: the field (e.g. steps[3].attrs.eps) and what is wrong with it."""


def _where(loc) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif str(p).startswith(("function-", "union[", "list[", "tuple[", "json-or-python", "literal[",
                                "constrained-", "nullable[", "is-instance[", "lax-or-strict")) or \
                str(p) in ("int", "str", "float", "bool", "none"):
            continue        # pydantic's union branches and validators, not fields
        else:
            out += ("." if out else "") + str(p)
    return out or "top level"


def _reject_constant(s):
    raise PlanSchemaError(f"a non-finite number ({s}) is not valid in a plan")


def _int(s: str):
    # big integers parse (the schema then names the field that holds one, with its bound); only
    # absurd digit counts stop here, before Python's int() spends time or refuses them
    if len(s.lstrip("-")) > 400:
        raise PlanSchemaError(f"a number of {len(s)} digits ({s[:24]}...) is not valid in a plan")
    return int(s)


def _float(s: str):
    v = float(s)
    if not math.isfinite(v):
        raise PlanSchemaError(f"number {s[:24]} is out of range")
    return v


def _depth_ok(d) -> None:
    """Nesting at most MAX_DEPTH deep (iteratively: a hostile file must not recurse us)."""
    stack = [(d, 0)]
    while stack:
        x, k = stack.pop()
        if k > MAX_DEPTH:
            raise PlanSchemaError(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(x, dict):
            stack.extend((v, k + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, k + 1) for v in x)


def parse_plan_text(text: str):
    """JSON with bounds: no NaN / Infinity, integers of at most 400 digits, nesting <= MAX_DEPTH."""
    try:
        d = json.loads(text, parse_constant=_reject_constant, parse_int=_int, parse_float=_float)
    except RecursionError:
        raise PlanSchemaError(f"nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as e:
        raise PlanSchemaError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    _depth_ok(d)
    return d


def validate_plan_json(d) -> PlanJSON:
    """The parsed plan checked against the schema; PlanSchemaError naming the first bad field."""
    if not isinstance(d, dict):
        raise PlanSchemaError(f"expected a JSON object at the top level, got {type(d).__name__}")
    try:
        return PlanJSON.model_validate(d)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_context=False, include_input=True)
        # the most specific first: a union's branches all fail; the deepest location is the field
        err = max(errs, key=lambda x: len([p for p in x["loc"] if not str(p).startswith(("function-", "union["))]))
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {json.dumps(got)[:60]})" \
            if isinstance(got, (int, float, str, bool, type(None))) else ""
        more = f"; {len(errs) - 1} more problem(s)" if len(errs) > 1 else ""
        raise PlanSchemaError(f"{_where(err['loc'])}: {err['msg']}{shown}{more}") from None
