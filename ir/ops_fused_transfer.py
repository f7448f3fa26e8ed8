"""FETCH_WEIGHTS: host -> device copy of streamed expert weights, on the copy stream.

Inputs: n_weights weight values, then optional control inputs (a value that must exist before
the copy may start: the last use of the device slot it overwrites, or, in "routed" mode, the
layer's expert ids, which the runtime reads on the host to copy only the routed experts).
Outputs: the same weights, now device-resident; the reference passes them through unchanged.
"""
from ggfuse.ir.ops import Op, register, _req


def _infer(a, ins):
    _req(1 <= a.n_weights <= len(ins), f"fetch_weights: n_weights {a.n_weights} vs {len(ins)} inputs")
    _req(a.mode in ("all", "routed"), f"fetch_weights mode {a.mode!r} must be all or routed")
    return tuple(ins[: a.n_weights])


register(Op.FETCH_WEIGHTS, (1, 16), _infer, lambda a, env, *xs: tuple(xs[: a.n_weights]),
         lambda a, ins, outs, env: 0, n_outputs=3)
