"""Read a GGUF file: metadata, tensor table and (memory-mapped) tensor bytes.

Parsing is gguf.GGUFReader's. What this module adds is a guard against bad
input: GGUFReader trusts every count and length in the file, so a corrupt
or hostile file makes it raise arbitrary exceptions, allocate huge arrays or
loop (practically) forever -- a numeric array whose count says 2**60 never
fails, because reads past EOF silently return empty arrays and the loop
over the count just keeps going. ``_StrictReader`` overrides GGUFReader's
low-level read helpers so that every read is bounds-checked and every
count is checked against the bytes left before GGUFReader loops over it,
and validates the tensor table before GGUFReader builds tensor views.
Anything that still goes wrong inside GGUFReader is turned into a one-line
GGUFFormatError naming the file.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC
from gguf.quants import dequantize as _gguf_dequantize
from gguf.quants import quant_shape_to_byte_shape

from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError

__all__ = ["GGUFFile", "TensorInfo", "SUPPORTED_TYPES", "SUPPORTED_VERSIONS"]

# ggml types ggfuse can dequantize / run. llama.cpp's Q4_K_M, Q5_K_M, Q6_K,
# Q8_0 and Q4_0 files only use these (mixes fall back to Q5_0/Q8_0/Q6_K/Q4_1).
SUPPORTED_TYPES: tuple[QT, ...] = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
)
_SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)
SUPPORTED_VERSIONS = (2, 3)

GGML_MAX_DIMS = 4
# Sanity limits, far above any real model (vocabularies are ~150k-260k
# entries, tensor tables a few thousand) but low enough that GGUFReader's
# per-element Python loop cannot run for minutes or eat gigabytes when a
# corrupt count happens to fit inside a big file.
MAX_ARRAY_LEN = 1 << 24
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20

# Fixed header: magic u32, version u32, tensor count u64, kv count u64.
_HEADER = struct.Struct("<IIQQ")
# Smallest possible encodings, used to reject counts the file cannot hold.
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_DTYPES = {t: np.dtype(t) for t in GGUFReader.gguf_scalar_to_np.values()}
_MIN_VALUE_BYTES = {
    **{int(t): np.dtype(d).itemsize for t, d in GGUFReader.gguf_scalar_to_np.items()},
    int(GGUFValueType.STRING): 8,       # length prefix
    int(GGUFValueType.ARRAY): 4 + 8,    # item type + count
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    type_name: str            # "Q4_K", "F32", ...
    ne: tuple[int, ...]       # ggml order: ne[0] is the contiguous row length
    shape: tuple[int, ...]    # numpy order, i.e. reversed(ne)
    offset: int               # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=object))


class _StrictReader(GGUFReader):
    """GGUFReader whose reads cannot go past EOF and whose loops are bounded.

    Relies on GGUFReader's internal helpers (_get, _get_str,
    _get_field_parts, _build_tensors) as of gguf 0.17-0.19; the tests in
    tests/test_gguf_file.py pin the behaviour if gguf changes them.
    """

    def __init__(self, path: str):
        self._path = path
        self._where = "header"
        self._tensor_idx = -1
        super().__init__(path, "r")

    # -- error context ----------------------------------------------------
    def _fail(self, what: str) -> GGUFFormatError:
        where = self._where
        if where == "metadata":
            n = len(self.fields) - 3  # GGUFReader pushes 3 header pseudo-fields first
            last = list(self.fields)[-1]
            where = f"metadata entry #{n}" + (f" (after key '{last}')" if n > 0 else "")
        elif where == "tensor table":
            where = f"tensor table entry #{self._tensor_idx}"
        return GGUFFormatError(self._path, f"bad {where}: {what}")

    def _build_fields(self, offs: int, count: int) -> int:
        self._where = "metadata"
        return super()._build_fields(offs, count)

    def _get_tensor_info_field(self, orig_offs: int):
        self._where = "tensor table"
        self._tensor_idx += 1
        # Check n_dims before GGUFReader reads that many dims, for a clear message.
        name_len, name = self._get_str(orig_offs)
        n_dims = int(self._get(orig_offs + 8 + len(name), np.uint32)[0])
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            name = bytes(name).decode("utf-8", "replace")
            raise self._fail(f"tensor '{name}' has {n_dims} dimensions, expected 1 to {GGML_MAX_DIMS}")
        return super()._get_tensor_info_field(orig_offs)

    # -- bounds-checked reads ---------------------------------------------
    def _get(self, offset, dtype, count=1, override_order=None):
        # Same contract as GGUFReader._get, with two changes:
        # - a read past EOF raises (GGUFReader's memmap slice silently
        #   truncates, which is what lets bad counts loop forever);
        # - it slices a plain ndarray view of the map: np.memmap's
        #   __getitem__/__array_finalize__ dominate GGUFReader's cost (a 150k
        #   token vocabulary takes ~11 s to open with stock GGUFReader, ~1/4
        #   of that this way).
        buf = self.__dict__.get("_buf")
        if buf is None:
            buf = self._buf = self.data.view(np.ndarray)
        dt = _DTYPES.get(dtype) or np.dtype(dtype)
        offset = int(offset)
        end = offset + dt.itemsize * int(count)
        if end > len(buf):
            raise self._fail(f"needs bytes [{offset}, {end}) but the file ends at "
                             f"{len(buf)}; the file is truncated or corrupt")
        arr = buf[offset:end].view(dt)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(dt.newbyteorder(order))

    def _get_str(self, offset: int):
        # As GGUFReader._get_str, but with a clear message for a bad length.
        slen = self._get(offset, np.uint64)
        n = int(slen[0])
        if offset + 8 + n > len(self.data):
            raise self._fail(f"string at byte {offset} claims length {n}, past the end "
                             f"of the file (size {len(self.data)})")
        return slen, self._get(offset + 8, np.uint8, n)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        raw_type = int(raw_type)
        if raw_type not in _MIN_VALUE_BYTES:
            raise self._fail(f"unknown value type {raw_type} at byte {orig_offs}")
        if raw_type == GGUFValueType.ARRAY:
            # GGUFReader loops `for idx in range(count)`; check the count first.
            itype = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            if itype not in _MIN_VALUE_BYTES:
                raise self._fail(f"array at byte {orig_offs} has unknown item type {itype}")
            need = count * _MIN_VALUE_BYTES[itype]
            left = len(self.data) - (orig_offs + 12)
            if need > left:
                raise self._fail(
                    f"array at byte {orig_offs} claims {count} items of type "
                    f"{GGUFValueType(itype).name} (at least {need} bytes) but only {left} "
                    f"bytes are left in the file")
            if count > MAX_ARRAY_LEN:
                raise self._fail(f"array at byte {orig_offs} claims {count} items, "
                                 f"more than the sanity limit {MAX_ARRAY_LEN}")
        return super()._get_field_parts(orig_offs, raw_type)

    # -- tensor table -----------------------------------------------------
    def _build_tensors(self, start_offs: int, fields) -> None:
        # Validate before GGUFReader builds views: it would otherwise fail in
        # np.prod overflow / reshape / enum lookup with an opaque message.
        size = len(self.data)
        seen: set[str] = set()
        for i, field in enumerate(fields):
            _, name_data, _, dims, raw_dtype, rel_off = field.parts
            try:
                name = bytes(name_data).decode("utf-8")
            except UnicodeDecodeError:
                raise GGUFFormatError(self._path, f"tensor table entry #{i} has a name "
                                      f"that is not valid UTF-8") from None
            if name in seen:
                raise GGUFFormatError(self._path, f"duplicate tensor '{name}' in the tensor table")
            seen.add(name)
            ne = [int(d) for d in dims]  # n_dims was checked in _get_tensor_info_field
            if any(d >= 1 << 63 for d in ne):
                raise GGUFFormatError(self._path, f"tensor '{name}' has absurd dimensions {ne}")
            tid = int(raw_dtype[0])
            try:
                qt = QT(tid)
            except ValueError:
                raise UnsupportedError(self._path, f"tensor '{name}' has unknown ggml type id "
                                       f"{tid}, supported: {_SUPPORTED_NAMES}") from None
            if qt not in SUPPORTED_TYPES:
                raise UnsupportedError(self._path, f"tensor '{name}' has ggml type {qt.name}, "
                                       f"supported: {_SUPPORTED_NAMES}")
            block, type_size = GGML_QUANT_SIZES[qt]
            if ne[0] % block:
                raise GGUFFormatError(self._path, f"tensor '{name}' has row length ne[0]={ne[0]}, "
                                      f"not a multiple of the {qt.name} block size {block}")
            nbytes = int(np.prod(ne, dtype=object)) // block * type_size
            rel = int(rel_off[0])
            if rel % self.alignment:
                raise GGUFFormatError(self._path, f"tensor '{name}' data offset {rel} is not "
                                      f"a multiple of the alignment {self.alignment}")
            begin = start_offs + rel
            if begin + nbytes > size:
                raise GGUFFormatError(
                    self._path, f"tensor '{name}' data [{begin}, {begin + nbytes}) lies past the "
                    f"end of the file (size {size}); the file is truncated or corrupt")
        super()._build_tensors(start_offs, fields)


_REQUIRED: Any = object()


class GGUFFile:
    """A validated, memory-mapped GGUF file. Opening reads only the header,
    metadata and tensor table; tensor data is touched only by raw()/dequantize()."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.size, self.version = _check_header(self.path)
        try:
            self._reader: GGUFReader | None = _StrictReader(self.path)
        except GGFuseError:
            raise
        except Exception as e:  # noqa: BLE001 -- any GGUFReader failure means a bad file
            raise GGUFFormatError(self.path, f"malformed GGUF file ({type(e).__name__}: {e})") from e
        r = self._reader
        self.data_offset = int(r.data_offset)
        self.alignment = int(r.alignment)
        # GGUFReader's first three fields are header pseudo-fields (GGUF.version, ...).
        self._fields = dict(list(r.fields.items())[3:])
        self._values: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(
                name=t.name, ggml_type=int(t.tensor_type), type_name=t.tensor_type.name,
                ne=tuple(int(d) for d in t.shape),
                shape=tuple(int(d) for d in reversed(t.shape)),
                offset=int(t.data_offset), nbytes=int(t.n_bytes))
            for t in r.tensors
        }
        arch = self.key("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFFormatError(self.path, f"metadata key 'general.architecture' is {arch!r}, "
                                  f"expected a non-empty string")
        self.arch: str = arch

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        # np.memmap has no close(); dropping the reader (and with it every
        # view we created) releases the mapping once callers drop raw() views.
        self._reader = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, arch={getattr(self, 'arch', None)!r}, tensors={len(self.tensors)})"

    @property
    def _data(self) -> np.memmap:
        if self._reader is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        return self._reader.data

    # -- identity -----------------------------------------------------------
    def identity(self) -> dict:
        """Size + sha256 of everything before the tensor data (header, metadata,
        tensor table): changes when the model's structure or metadata does,
        cheap because no tensor data is read."""
        h = hashlib.sha256(self._data[: self.data_offset])
        return {"size": self.size, "header_sha256": h.hexdigest()}

    # -- metadata -----------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._fields)

    def has_key(self, name: str) -> bool:
        return name in self._fields

    def key(self, name: str, default: Any = _REQUIRED) -> Any:
        """Metadata value as Python str/int/float/bool, or a list of those."""
        if name in self._values:
            return self._values[name]
        field = self._fields.get(name)
        if field is None:
            if default is _REQUIRED:
                raise GGUFFormatError(self.path, f"missing required metadata key '{name}'")
            return default
        try:
            value = field.contents()
        except UnicodeDecodeError:
            raise GGUFFormatError(self.path, f"metadata key '{name}' holds a string that is "
                                  f"not valid UTF-8") from None
        self._values[name] = value
        return value

    def arch_key(self, suffix: str, default: Any = _REQUIRED) -> Any:
        return self.key(f"{self.arch}.{suffix}", default)

    def vocab(self) -> list[str] | None:
        return self.key("tokenizer.ggml.tokens", None)

    # -- tensors ------------------------------------------------------------
    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """TensorInfo for `name`; if `shape` (numpy order) is given, check it."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFFormatError(self.path, f"missing tensor '{name}'")
        if shape is not None and tuple(int(d) for d in shape) != t.shape:
            raise GGUFFormatError(self.path, f"tensor '{name}' has shape {t.shape}, expected "
                                  f"{tuple(int(d) for d in shape)} from the metadata")
        return t

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a flat uint8 view of the memory map (no copy, read-only)."""
        t = self.tensor(name)
        return self._data[t.offset: t.offset + t.nbytes].view(np.ndarray)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array in numpy shape."""
        t = self.tensor(name)
        qt = QT(t.ggml_type)
        rows = self.raw(name).reshape(quant_shape_to_byte_shape(t.shape, qt))
        out = _gguf_dequantize(rows, qt)
        if np.shares_memory(out, rows):  # F32 comes back as a view of the map
            out = out.copy()
        return out.astype(np.float32, copy=False).reshape(t.shape)


def _check_header(path: str) -> tuple[int, int]:
    """Cheap checks before GGUFReader maps the file: it exists, is a regular
    file, has the GGUF magic and a supported version, and its counts are
    possible for its size. Returns (size, version)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GGUFFormatError(path, "no such file") from None
    except OSError as e:
        raise GGUFFormatError(path, f"cannot access the file: {e.strerror}") from None
    if not os.path.isfile(path):
        raise GGUFFormatError(path, "not a regular file (expected a .gguf model file)")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise GGUFFormatError(path, f"cannot read the file: {e.strerror}") from None
    if size == 0:
        raise GGUFFormatError(path, "empty file, not a GGUF model")
    if len(head) < 4 or struct.unpack_from("<I", head)[0] != GGUF_MAGIC:
        raise GGUFFormatError(path, f"not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if len(head) < _HEADER.size:
        raise GGUFFormatError(path, f"truncated GGUF header ({size} bytes, need {_HEADER.size})")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and struct.unpack(">I", head[4:8])[0] in SUPPORTED_VERSIONS:
            raise UnsupportedError(path, "big-endian GGUF files are not supported")
        raise GGUFFormatError(path, f"unsupported GGUF version {version} "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    left = size - _HEADER.size
    if n_kv > MAX_KV or n_kv * _MIN_KV_BYTES > left:
        raise GGUFFormatError(path, f"header claims {n_kv} metadata entries, impossible "
                              f"for a file of {size} bytes; the file is corrupt")
    if n_tensors > MAX_TENSORS or n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > left:
        raise GGUFFormatError(path, f"header claims {n_tensors} tensors, impossible "
                              f"for a file of {size} bytes; the file is corrupt")
    return size, version
