"""Strided views, as pure arithmetic on (shape, strides): which reshapes of a view need no copy.

The kernels accept row-strided operands, so RESHAPE and SLICE of an activation are views of its
buffer wherever the strides allow; the lowering (passes/lower_cuda.py) decides view or copy per
RESHAPE with these functions and records it in the plan, and the CUDA runtime builds exactly
that view with the same functions. Strides are in elements.
"""
from __future__ import annotations


def contiguous_strides(shape) -> tuple:
    out, acc = [], 1
    for d in reversed(tuple(int(x) for x in shape)):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def is_contiguous(shape, strides) -> bool:
    """C-contiguous (dims of size 1 may have any stride)."""
    expect = 1
    for d, s in zip(reversed(tuple(shape)), reversed(tuple(strides))):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def slice_strides(shape, strides, axis: int, start: int, stop: int) -> tuple[tuple, tuple, int]:
    """(shape, strides, element offset) of x[..., start:stop, ...] along `axis`."""
    shape, strides = list(shape), tuple(strides)
    ax = axis % len(shape)
    shape[ax] = stop - start
    return tuple(shape), strides, start * strides[ax]


def reshape_strides(shape, strides, new_shape) -> tuple | None:
    """The strides of `new_shape` as a view of an array (shape, strides), or None when only a
    copy can give it: contiguous arrays reshape freely; a row-strided view whose rows are
    contiguous may split or merge its trailing dims (the leading dim kept)."""
    shape = tuple(int(d) for d in shape)
    new_shape = tuple(int(d) for d in new_shape)
    if is_contiguous(shape, strides):
        return contiguous_strides(new_shape)
    if not shape or not new_shape or new_shape[0] != shape[0] or strides[-1] != 1:
        return None
    inner = 1
    for d in shape[1:]:
        inner *= d
    inner_new = 1
    for d in new_shape[1:]:
        inner_new *= d
    if inner != inner_new or not is_contiguous(shape[1:], strides[1:]):
        return None
    return (strides[0],) + contiguous_strides(new_shape[1:])
