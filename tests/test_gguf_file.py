"""GGUFFile: reading a valid file, and one-line errors for bad ones."""

from __future__ import annotations

import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from badfiles import ARCH, OUTPUT_NORM, TOKEN_EMBD, make_bad_files, write_valid_gguf
from ggfuse.compiler.gguf_file import SUPPORTED_TYPES, GGUFFile, TensorInfo
from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def valid(bad):
    with GGUFFile(bad["valid"]) as f:
        yield f


# ---------------------------------------------------------------- valid file

def test_header_and_keys(valid, bad):
    assert valid.path == str(bad["valid"])
    assert valid.size == bad["valid"].stat().st_size
    assert valid.arch == ARCH and valid.version == 3 and valid.alignment == 32
    assert valid.data_offset % 32 == 0
    assert valid.keys() == ["general.architecture", "general.name", f"{ARCH}.block_count",
                            f"{ARCH}.embedding_length", f"{ARCH}.test_int_array",
                            "tokenizer.ggml.tokens"]
    assert valid.key("general.name") == "tiny"
    assert valid.arch_key("block_count") == 2 and isinstance(valid.arch_key("block_count"), int)
    assert valid.arch_key("test_int_array") == [1, 2, 3, 4]
    assert valid.vocab() == ["<s>", "a", "b", "</s>"]
    assert valid.has_key("general.name") and not valid.has_key("GGUF.version")
    assert valid.key("nope", None) is None and valid.arch_key("expert_count", 0) == 0


def test_tensors(valid):
    assert list(valid.tensors) == [TOKEN_EMBD[0], OUTPUT_NORM[0]]  # file order
    t = valid.tensor(TOKEN_EMBD[0], shape=TOKEN_EMBD[1])
    assert isinstance(t, TensorInfo)
    assert t.shape == (8, 32) and t.ne == (32, 8)  # numpy order is reversed ggml order
    assert (t.type_name, t.ggml_type, t.nbytes, t.n_elements) == ("F32", 0, 8 * 32 * 4, 256)
    assert t.offset == valid.data_offset  # first tensor starts the data section
    with pytest.raises(Exception):
        t.nbytes = 0  # frozen


def test_raw_and_dequantize_f32(valid):
    expect = np.random.default_rng(0).standard_normal(TOKEN_EMBD[1]).astype(np.float32)
    raw = valid.raw(TOKEN_EMBD[0])
    assert raw.dtype == np.uint8 and raw.shape == (expect.nbytes,)
    assert not raw.flags.owndata and not raw.flags.writeable  # a view of the read-only map
    assert raw.tobytes() == expect.tobytes()
    x = valid.dequantize(TOKEN_EMBD[0])
    assert x.dtype == np.float32 and x.shape == (8, 32)
    np.testing.assert_array_equal(x, expect)
    x[0, 0] = 123.0  # dequantize returns a fresh array even for F32
    np.testing.assert_array_equal(valid.dequantize(OUTPUT_NORM[0]), np.ones(32, np.float32))


# Types gguf-py can quantize: compare against data written with gguf.quants.quantize.
@pytest.mark.parametrize("qt", [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1])
def test_dequantize_quantized(tmp_path, qt):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, qt)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    if qt == QT.F16:
        w.add_tensor("w", q)
    else:
        w.add_tensor("w", q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with GGUFFile(path) as f:
        t = f.tensor("w", shape=(4, 64))
        assert t.type_name == qt.name and t.ne == (64, 4) and t.nbytes == q.nbytes
        assert f.raw("w").tobytes() == q.tobytes()
        got = f.dequantize("w")
    assert got.dtype == np.float32 and got.shape == (4, 64)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(q, qt))
    if qt == QT.F16:
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))


# K-quants: gguf-py cannot quantize them, so write random blocks and check the plumbing.
@pytest.mark.parametrize("qt", [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_dequantize_k_quants(tmp_path, qt):
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    q = np.random.default_rng(2).integers(0, 256, (3, 2 * type_size), dtype=np.uint8)
    q[:, :type_size] = 0  # first block all zeros: must dequantize to exact zeros
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_tensor("w", q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with GGUFFile(path) as f:
        got = f.dequantize("w")
    assert got.shape == (3, 2 * block) and got.dtype == np.float32
    np.testing.assert_array_equal(got, gguf.quants.dequantize(q, qt))
    assert not got[:, :block].any()


def test_supported_types():
    assert {t.name for t in SUPPORTED_TYPES} == {
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


# ------------------------------------------------------------------ identity

def test_identity(tmp_path, bad, valid):
    ident = valid.identity()
    assert ident == GGUFFile(bad["valid"]).identity()
    assert ident["size"] == valid.size and len(ident["header_sha256"]) == 64

    # Only tensor data differs: same identity.
    other = np.full(TOKEN_EMBD[1], 7.0, np.float32)
    assert GGUFFile(write_valid_gguf(tmp_path / "d.gguf", token_embd=other)).identity() == ident
    # A metadata value differs (same size): identity changes.
    meta = GGUFFile(write_valid_gguf(tmp_path / "m.gguf", block_count=3)).identity()
    assert meta["size"] == ident["size"] and meta != ident
    # A tensor-table entry differs: patch output_norm's ne[0] (32 -> 16, so still in bounds).
    r = gguf.GGUFReader(bad["valid"])
    field = r.tensors[1].field
    dims_at = field.offset + sum(int(p.nbytes) for p in field.parts[:3])
    data = bytearray(bad["valid"].read_bytes())
    struct.pack_into("<Q", data, dims_at, 16)
    (tmp_path / "t.gguf").write_bytes(bytes(data))
    f = GGUFFile(tmp_path / "t.gguf")
    assert f.tensor(OUTPUT_NORM[0]).shape == (16,)
    assert f.identity() != ident and f.identity()["size"] == ident["size"]


# ---------------------------------------------------------------- bad files

# case -> (error class, words the message must contain)
BAD_CASES = {
    "truncated_header": (GGUFFormatError, ["metadata", "truncated"]),
    "truncated_fixed_header": (GGUFFormatError, ["truncated", "header"]),
    "truncated_data": (GGUFFormatError, ["token_embd.weight", "past the end", "truncated"]),
    "empty_file": (GGUFFormatError, ["empty"]),
    "wrong_magic": (GGUFFormatError, ["not a GGUF file", "GGML"]),
    "bad_version": (GGUFFormatError, ["version 7", "supported: 2, 3"]),
    "data_past_end": (GGUFFormatError, ["token_embd.weight", "past the end", "size"]),
    "absurd_array_length": (GGUFFormatError, [f"{ARCH}.embedding_length", "array",
                                              str(1 << 60), "INT32"]),
    "absurd_string_array_length": (GGUFFormatError, ["array", str(1 << 60), "STRING"]),
    "absurd_string_length": (GGUFFormatError, ["string", str(1 << 60)]),
    "absurd_tensor_count": (GGUFFormatError, [str(1 << 60), "tensors"]),
    "absurd_kv_count": (GGUFFormatError, [str(1 << 60), "metadata entries"]),
    "absurd_n_dims": (GGUFFormatError, ["tensor table", "token_embd.weight", str(1 << 30),
                                        "dimensions"]),
    "bad_value_type": (GGUFFormatError, ["unknown value type 77"]),
    "unsupported_type": (UnsupportedError, ["token_embd.weight", "IQ2_XXS", "supported: F32",
                                            "Q4_K", "Q6_K"]),
    "unknown_type": (UnsupportedError, ["token_embd.weight", "999", "supported: F32"]),
    "not_gguf": (GGUFFormatError, ["not a GGUF file"]),
    "missing": (GGUFFormatError, ["no such file"]),
    "directory": (GGUFFormatError, ["not a regular file"]),
}


def test_every_bad_case_is_covered(bad):
    assert set(bad) - {"valid"} == set(BAD_CASES)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file(bad, case):
    cls, words = BAD_CASES[case]
    path = bad[case]
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(cls) as info:
        GGUFFile(path)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    err = info.value
    msg = str(err)
    assert isinstance(err, GGFuseError)
    assert msg.startswith(f"{path}: ") and err.path == str(path)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert elapsed < 1.0, f"{case} took {elapsed:.2f}s"
    assert peak < 16 << 20, f"{case} allocated {peak >> 20} MiB"


def test_invalid_utf8_value(tmp_path, bad):
    # Open succeeds (values decode lazily); reading the key gives a clear error.
    r = gguf.GGUFReader(bad["valid"])
    field = r.fields["general.name"]
    at = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    data = bytearray(bad["valid"].read_bytes())
    data[at] = 0xFF
    (tmp_path / "u.gguf").write_bytes(bytes(data))
    f = GGUFFile(tmp_path / "u.gguf")
    with pytest.raises(GGUFFormatError, match="'general.name'.*not valid UTF-8"):
        f.key("general.name")


def test_missing_arch(tmp_path):
    path = tmp_path / "noarch.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    w.kv_data[0].pop("general.architecture")  # GGUFWriter always adds it; drop it
    w.add_tensor("x", np.zeros(32, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFFormatError) as info:
        GGUFFile(path)
    assert str(info.value) == f"{path}: missing required metadata key 'general.architecture'"


# ------------------------------------------------------------ lookup errors

def test_lookup_messages(valid):
    p = valid.path
    with pytest.raises(GGUFFormatError) as info:
        valid.arch_key("expert_count")
    assert str(info.value) == f"{p}: missing required metadata key '{ARCH}.expert_count'"
    with pytest.raises(GGUFFormatError) as info:
        valid.tensor("blk.3.ffn_down_exps.weight")
    assert str(info.value) == f"{p}: missing tensor 'blk.3.ffn_down_exps.weight'"
    with pytest.raises(GGUFFormatError) as info:
        valid.tensor(TOKEN_EMBD[0], shape=(32, 8))
    assert str(info.value) == (f"{p}: tensor 'token_embd.weight' has shape (8, 32), "
                               f"expected (32, 8) from the metadata")
    with pytest.raises(GGUFFormatError):
        valid.raw("nope")


def test_error_format():
    assert str(GGUFFormatError("/m.gguf", "bad thing")) == "/m.gguf: bad thing"
    assert str(GGFuseError(None, "no file")) == "no file"
    e = UnsupportedError("x.gguf", "two\nlines")
    assert str(e) == "x.gguf: two lines" and e.message == "two lines" and e.path == "x.gguf"
    assert isinstance(e, GGFuseError) and isinstance(e, Exception)


def test_close(bad):
    f = GGUFFile(bad["valid"])
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.raw(TOKEN_EMBD[0])


def test_fuzz_never_leaks_other_exceptions(tmp_path, bad):
    """Random byte damage to the header/metadata/tensor table: either the file
    still opens, or a one-line GGFuseError -- never another exception or a hang."""
    import random
    src = bad["valid"].read_bytes()
    head = GGUFFile(bad["valid"]).data_offset
    rng = random.Random(0)
    path = tmp_path / "fuzz.gguf"
    for _ in range(300):
        d = bytearray(src)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(head)] = rng.randrange(256)
        else:  # overwrite 8 bytes with a random u64: lengths, counts, offsets
            at = rng.randrange(8, head - 8)
            d[at:at + 8] = rng.randrange(1 << 64).to_bytes(8, "little")
        path.write_bytes(bytes(d))
        t0 = time.perf_counter()
        try:
            f = GGUFFile(path)
            for k in f.keys():
                f.key(k)
            for name in f.tensors:
                f.dequantize(name)
        except GGFuseError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))
        assert time.perf_counter() - t0 < 1.0
