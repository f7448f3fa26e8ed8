"""kernels/attention/window_keys.cuh (which rows window_attn.cu reads for one query) against the
reference's visibility rule (kernels/attention/ref.py attention_window / ring_positions), without
a GPU: the header compiles as plain C++. For every chunk start P, query row t, ring size R and
window, the rows read are exactly the visible keys, each once, every ring row read holds the
position it stands for (the ring as kv_ring_append leaves it), and no key outside the window is
read. R = 0 (causal attention over the KV cache) as well.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from quant_blocks import build_host_driver

from ggfuse.kernels.attention import ref

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "attention/window_keys.cuh"

// stdin: lines "P t R window"; stdout per line: "3 src row n src row n src row n" (the runs)
int main() {
    int P, t, R, w;
    while (scanf("%d %d %d %d", &P, &t, &R, &w) == 4) {
        wk::Run runs[3];
        wk::key_runs(P, t, R, w, runs);
        printf("3");
        for (int i = 0; i < 3; ++i) printf(" %d %d %d", runs[i].src, runs[i].row, runs[i].n);
        printf("\n");
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "window_keys_host", DRIVER)


def _cases():
    out = []
    for window, R in ((8, 8), (8, 7), (8, 12), (5, 4), (1, 1), (512, 512), (0, 0), (8, 0), (512, 0)):
        for P in (0, 1, 3, 7, 8, 9, 15, 16, 17, 100, 511, 512, 513, 1000, 1031):
            for t in (0, 1, 2, 5, 7, 8, 9, 31, 63, 600):
                out.append((P, t, R, window))
    return out


def _run(driver, cases):
    text = "".join(f"{P} {t} {R} {w}\n" for P, t, R, w in cases)
    res = subprocess.run([str(driver)], input=text, capture_output=True, text=True, check=True)
    return [list(map(int, line.split())) for line in res.stdout.splitlines()]


def test_runs_are_the_visible_keys(driver):
    cases = _cases()
    for (P, t, R, window), got in zip(cases, _run(driver, cases), strict=True):
        assert got[0] == 3 and len(got) == 10
        runs = [got[1 + 3 * i:4 + 3 * i] for i in range(3)]
        assert [r[0] for r in runs] == [0, 0, 1] and all(r[2] >= 0 for r in runs)
        runs = [r for r in runs if r[2] > 0]
        qp = P + t
        ring_pos = ref.ring_positions(P, R) if R else None
        read = []
        for src, row, cnt in runs:
            rows = np.arange(row, row + cnt)
            if src == 1:                                   # the chunk's own rows
                assert R > 0 and rows.min() >= 0 and rows.max() <= t
                read += list(P + rows)
            elif R == 0:                                   # the KV cache, position = row
                read += list(rows)
            else:                                          # the ring before the chunk
                assert rows.min() >= 0 and rows.max() < R, (P, t, R, window, runs)
                pos = ring_pos[rows]
                assert (pos >= 0).all(), (P, t, R, window, runs)   # never an empty ring row
                read += list(pos)
        want = [p for p in range(qp + 1) if window == 0 or qp - p < window]
        assert sorted(read) == want, (P, t, R, window, runs)       # each visible key once, no other


def test_ring_reads_match_the_appended_ring(driver):
    """Chunks of several sizes appended with kv_ring_append: the ring rows each query reads hold
    the keys of the positions it should see (values = positions)."""
    rng = np.random.default_rng(13)
    for window, R in ((8, 8), (8, 7), (6, 11)):
        ring = np.full((R, 1, 1), -1.0, np.float32)
        P = 0
        for T in rng.integers(1, 20, size=12):
            cases = [(P, t, R, window) for t in range(T)]
            for (_, t, _, _), got in zip(cases, _run(driver, cases), strict=True):
                runs = [got[1 + 3 * i:4 + 3 * i] for i in range(3)]
                pos = [int(ring[r, 0, 0]) for src, row, cnt in runs if src == 0 for r in range(row, row + cnt)]
                pos += [P + r for src, row, cnt in runs if src == 1 for r in range(row, row + cnt)]
                assert sorted(pos) == [p for p in range(P + t + 1) if P + t - p < window]
            ring = ref.kv_ring_append(ring, np.arange(P, P + T, dtype=np.float32).reshape(T, 1, 1), P=P)
            P += int(T)
