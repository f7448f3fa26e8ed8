"""kernels/deltanet/launch.py gated_delta_rule_recurrent's host side, without a GPU: which
recurrent.cu kernel it launches (gdr_step_* for one token at head dims the step kernel takes,
gdr_recurrent_* otherwise), with what grid, block, arguments and shared memory. The kernels
themselves: tests/test_gpu_deltanet_recurrent.py."""
import types

import numpy as np
import pytest

from fake_cupy import make_fake_cupy

from ggfuse.kernels.deltanet import launch as dn

CASES = {   # id: (T, Hk, Hv, K, V, state offset in floats, kernel) -> the family that runs
    "decode-q35": ((1, 16, 32, 128, 128, 0, "auto"), "step"),
    "K256": ((1, 2, 4, 256, 64, 0, "auto"), "step"),
    "V36": ((1, 2, 4, 40, 36, 0, "auto"), "step"),
    "T2": ((2, 16, 32, 128, 128, 0, "auto"), "loop"),
    "K288": ((1, 1, 2, 288, 32, 0, "auto"), "loop"),
    "V30": ((1, 2, 4, 32, 30, 0, "auto"), "loop"),
    "state-unaligned": ((1, 2, 4, 32, 32, 1, "auto"), "loop"),
    "forced-loop": ((1, 16, 32, 128, 128, 0, "loop"), "loop"),
}


def _launch(monkeypatch, T, Hk, Hv, K, V, offset, kernel, in_dt="bf16", out_dt="f32"):
    cp = make_fake_cupy()
    calls = []

    def get_function(name):
        return lambda grid, block, args, shared_mem=0: calls.append((name, grid, block, args, shared_mem))
    monkeypatch.setattr(dn, "load_module", lambda path, *a, **k: types.SimpleNamespace(get_function=get_function))
    idt = cp.uint16 if in_dt == "bf16" else cp.float32
    row = cp.zeros((T, 2 * Hk * K + Hv * V), idt)
    q = row[:, :Hk * K].reshape(T, Hk, K)
    k = row[:, Hk * K:2 * Hk * K].reshape(T, Hk, K)
    v = row[:, 2 * Hk * K:].reshape(T, Hv, V)
    g, beta = cp.zeros((T, Hv)), cp.zeros((T, Hv))
    base = cp.zeros(Hv * K * V + 4)
    start = (-base.data.ptr % 16) // 4 + offset            # 16-byte aligned, then `offset` floats on
    state = base[start:start + Hv * K * V].reshape(Hv, K, V)
    out = cp.zeros((T, Hv, V), cp.uint16 if out_dt == "bf16" else cp.float32)
    dn.gated_delta_rule_recurrent(q, k, v, g, beta, state, out, 0.5, "interleave", kernel=kernel)
    assert len(calls) == 1
    return calls[0], (q, k, v, g, beta, state, out)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_choice(case, monkeypatch):
    (T, Hk, Hv, K, V, offset, kernel), family = CASES[case]
    (name, grid, block, args, smem), (q, k, v, g, beta, state, out) = _launch(monkeypatch, T, Hk, Hv, K, V, offset,
                                                                             kernel)
    assert grid == (Hv, (V + 31) // 32)
    if family == "step":
        assert name == "gdr_step_bf16_f32" and block == (256,) and smem == 0
        assert args[:7] == (q, k, v, g, beta, state, out)
        assert [int(a) for a in args[7:11]] == [Hk, Hv, K, V] and float(args[11]) == 0.5 and int(args[12]) == 1
    else:
        assert name == "gdr_recurrent_bf16_f32" and block == (32,) and smem == (K * 32 + 2 * K) * 4
        assert args[0] is q and args[1] is k and args[3] is v   # with the row strides in elements
        assert int(args[2]) == q.strides[0] // 2 and int(args[4]) == v.strides[0] // 2
        if T > 1:
            assert int(args[2]) == int(args[4]) == 2 * Hk * K + Hv * V
        assert [int(a) for a in args[9:14]] == [T, Hk, Hv, K, V]


@pytest.mark.parametrize("in_dt,out_dt", [("f32", "f32"), ("bf16", "f32"), ("f32", "bf16"), ("bf16", "bf16")])
@pytest.mark.parametrize("kernel", dn.RECURRENT_KERNELS)
def test_kernel_names(kernel, in_dt, out_dt, monkeypatch):
    (name, *_), _ = _launch(monkeypatch, 1, 2, 4, 32, 32, 0, kernel, in_dt, out_dt)
    assert name == dn.recurrent_kernel_name(kernel, in_dt, out_dt)
    assert name == (f"gdr_step_{in_dt}_{out_dt}" if kernel == "step" else
                    "gdr_recurrent_f32" if in_dt == out_dt == "f32" else f"gdr_recurrent_{in_dt}_{out_dt}")


@pytest.mark.parametrize("T,K,V,offset", [(2, 32, 32, 0), (1, 288, 32, 0), (1, 32, 30, 0), (1, 32, 32, 1)],
                         ids=["T2", "K288", "V30", "state-unaligned"])
def test_forced_step_refuses_what_it_cannot_run(T, K, V, offset, monkeypatch):
    with pytest.raises(ValueError, match="the step kernel takes one token"):
        _launch(monkeypatch, T, 2, 4, K, V, offset, "step")


def test_unknown_kernel_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="kernel must be 'auto', 'loop' or 'step', got 'fast'"):
        _launch(monkeypatch, 1, 2, 4, 32, 32, 0, "fast")


def test_step_supported():
    assert dn.step_supported(128, 128) and dn.step_supported(256, 4) and dn.step_supported(1, 36)
    assert not dn.step_supported(257, 128) and not dn.step_supported(128, 30) and not dn.step_supported(0, 32)
