"""The key-split one-token attention (kernels/attention/decode_attn.cu) as its numpy mirror
computes it (ref.attention_decode_split): the ranges cover the keys 0..P once, in order, at
least DECODE_MIN_KEYS keys each, and the combined partial states equal attention_cache; the
launcher's split count and workspace size. The CUDA kernel against the same reference:
tests/test_gpu_decode_attn.py."""
import numpy as np
import pytest

from ggfuse.kernels.attention import launch
from ggfuse.kernels.attention import ref


@pytest.mark.parametrize("n,n_split", [(1, 128), (32, 4), (33, 4), (100, 3), (4096, 128), (5001, 128), (7, 1)])
def test_key_ranges_cover_every_key_once(n, n_split):
    r = ref.decode_key_ranges(n, n_split, launch.DECODE_MIN_KEYS)
    assert len(r) == n_split
    keys = [j for lo, hi in r for j in range(lo, hi)]
    assert keys == list(range(n))
    used = [hi - lo for lo, hi in r if lo < hi]
    assert all(u >= launch.DECODE_MIN_KEYS for u in used[:-1]) and all(lo >= hi for lo, hi in r[len(used):])
    # the combine kernel's count of ranges that hold keys
    per = max(-(-n // n_split), launch.DECODE_MIN_KEYS)
    assert len(used) == min(n_split, -(-n // per))


@pytest.mark.parametrize("P,Hq,Hkv,D,n_split", [(0, 4, 2, 64, 8), (40, 8, 1, 32, 3), (300, 16, 2, 64, 128),
                                                (2500, 16, 2, 128, 64)])
def test_split_decode_equals_attention_over_the_cache(P, Hq, Hkv, D, n_split):
    rng = np.random.default_rng(P + D)
    k = rng.standard_normal((P + 5, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((P + 5, Hkv, D)).astype(np.float32)
    q = (2 * rng.standard_normal((1, Hq, D))).astype(np.float32)
    want = ref.attention_cache(q, k, v, P, scale=D ** -0.5)
    got = ref.attention_decode_split(q, k, v, P, scale=D ** -0.5, n_split=n_split)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_split_count_and_workspace():
    assert launch.decode_splits(2, 8192) == 128 and launch.decode_splits(8, 8192) == 32
    assert launch.decode_splits(2, 64) == 2 and launch.decode_splits(300, 8192) == 1
    assert launch.decode_workspace_bytes(16, 256, 128) == 4 * 16 * 128 * 258
    assert launch.decode_supported(256, 256, 16, 2) and launch.decode_supported(512, 512, 32, 2)
    assert not launch.decode_supported(256, 256, 34, 2) and not launch.decode_supported(96, 96, 8, 2)
    assert not launch.decode_supported(256, 128, 16, 2)
