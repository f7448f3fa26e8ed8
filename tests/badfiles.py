"""Write small valid and hostile GGUF files, for tests that check bad input
is rejected with a clear one-line error (GGUFFile tests, CLI exit-code tests).

    from badfiles import make_bad_files, write_valid_gguf
    paths = make_bad_files(tmp_path)      # {"truncated_data": Path, ...}

Every hostile file is derived from the valid one by patching bytes whose
offsets are located by reading the valid file back with gguf.GGUFReader,
so the patches hit exactly the field they mean to.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import gguf

ARCH = "qwen3moe"
# The two tensors of the valid file (numpy shapes).
TOKEN_EMBD = ("token_embd.weight", (8, 32))   # ne = (32, 8)
OUTPUT_NORM = ("output_norm.weight", (32,))


def write_valid_gguf(path: str | Path, *, block_count: int = 2, name: str = "tiny",
                     token_embd: np.ndarray | None = None) -> Path:
    """A minimal valid GGUF: arch qwen3moe, a few KV pairs (string, uint32,
    uint32 array, string array) and two small F32 tensors."""
    path = Path(path)
    rng = np.random.default_rng(0)
    if token_embd is None:
        token_embd = rng.standard_normal(TOKEN_EMBD[1]).astype(np.float32)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    w.add_uint32(f"{ARCH}.block_count", block_count)
    w.add_uint32(f"{ARCH}.embedding_length", 32)
    w.add_array(f"{ARCH}.test_int_array", [1, 2, 3, 4])
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "</s>"])
    w.add_tensor(TOKEN_EMBD[0], token_embd)
    w.add_tensor(OUTPUT_NORM[0], np.ones(OUTPUT_NORM[1], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _part_offset(field, index: int) -> int:
    """Absolute file offset of field.parts[index] (parts are laid out back to back)."""
    return field.offset + sum(int(p.nbytes) for p in field.parts[:index])


def _patch(src: Path, dst: Path, offset: int, fmt: str, value) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


def make_bad_files(directory: str | Path) -> dict[str, Path]:
    """Write the valid file plus one hostile variant per case into `directory`.

    Returns {case name: path}; "valid" is the unpatched file. Expected errors
    (see tests/test_gguf_file.py BAD_CASES): every case raises
    GGUFFormatError, except unsupported_type / unknown_type (UnsupportedError).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    valid = write_valid_gguf(d / "valid.gguf")
    blob = valid.read_bytes()
    r = gguf.GGUFReader(valid)
    out: dict[str, Path] = {"valid": valid}

    def cut(name: str, n: int) -> None:
        (d / f"{name}.gguf").write_bytes(blob[:n])
        out[name] = d / f"{name}.gguf"

    def patch(name: str, offset: int, fmt: str, value) -> None:
        out[name] = _patch(valid, d / f"{name}.gguf", offset, fmt, value)

    t0 = r.tensors[0]          # token_embd.weight, 1 KiB of F32 data
    tinfo = t0.field           # parts: name_len, name, n_dims, dims, type, offset
    arr = r.fields[f"{ARCH}.test_int_array"]   # parts: klen, key, vtype, itype, count, items...
    tok = r.fields["tokenizer.ggml.tokens"]
    name_field = r.fields["general.name"]      # parts: klen, key, vtype, slen, bytes

    cut("truncated_header", r.data_offset // 2)        # inside metadata / tensor table
    cut("truncated_fixed_header", 12)                  # magic + version + half a count
    cut("truncated_data", t0.data_offset + t0.n_bytes // 2)
    cut("empty_file", 0)
    patch("wrong_magic", 0, "<4s", b"GGML")
    patch("bad_version", 4, "<I", 7)
    # Relative data offset of tensor 0 moved far past EOF (aligned, so only the bounds check trips).
    patch("data_past_end", _part_offset(tinfo, 5), "<Q", 1 << 40)
    # Numeric array count 2**60: plain GGUFReader loops ~forever on this one.
    patch("absurd_array_length", _part_offset(arr, 4), "<Q", 1 << 60)
    patch("absurd_string_array_length", _part_offset(tok, 4), "<Q", 1 << 60)
    patch("absurd_string_length", _part_offset(name_field, 3), "<Q", 1 << 60)
    patch("absurd_tensor_count", 8, "<Q", 1 << 60)
    patch("absurd_kv_count", 16, "<Q", 1 << 60)
    patch("absurd_n_dims", _part_offset(tinfo, 2), "<I", 1 << 30)
    patch("bad_value_type", _part_offset(r.fields[f"{ARCH}.block_count"], 2), "<I", 77)
    patch("unsupported_type", _part_offset(tinfo, 4), "<I", int(gguf.GGMLQuantizationType.IQ2_XXS))
    patch("unknown_type", _part_offset(tinfo, 4), "<I", 999)

    (d / "not_gguf.gguf").write_text("this is not a model\njust some text\n")
    out["not_gguf"] = d / "not_gguf.gguf"
    out["missing"] = d / "does_not_exist.gguf"
    (d / "a_directory.gguf").mkdir(exist_ok=True)
    out["directory"] = d / "a_directory.gguf"
    del r  # drop the memory map before returning
    return out
