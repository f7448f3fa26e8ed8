"""Compile CUDA C++ kernels with NVRTC (through cuda-python) and cache the cubins on disk.

    mod = load_module("kernels/dense/elementwise.cu")     # cupy.RawModule, compiled for this GPU
    fn = mod.get_function("rms_norm_f32")

The cache key is the source text (with every #include "..." of kernels/ inlined), the target
arch, the options and the NVRTC version, so an edit, another GPU or another toolkit recompiles.
`compile_cubin` needs no GPU: the CPU-only tests compile every kernel for sm_89 and sm_90.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import threading

KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OPTIONS = ("-std=c++17", "-default-device", "--use_fast_math", "-lineinfo")
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
_lock = threading.Lock()
_modules: dict = {}
_ARCH_CC = re.compile(r"^(?:sm|compute)_(\d+)")
_pdl_ready: set = set()     # CUfunction handles of kernels that wait before reading (kernels/pdl.cuh)


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> str:
    from ggfuse.options import cache_dir_env
    d = cache_dir_env() or os.path.join(os.path.expanduser("~"), ".cache", "ggfuse", "cubin")
    os.makedirs(d, exist_ok=True)
    return d


def cuda_include_dirs() -> list[str]:
    """Where cuda_bf16.h and friends live: CUDA_HOME, /usr/local/cuda, or the pip wheels."""
    from ggfuse.options import cuda_homes
    cands = [os.path.join(d, "include") for d in cuda_homes()]
    cands.append("/usr/local/cuda/include")
    try:
        import nvidia
        for base in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            cands += sorted(glob.glob(os.path.join(base, "cuda_runtime", "include")))
    except ImportError:
        pass
    return [d for d in cands if os.path.exists(os.path.join(d, "cuda_bf16.h"))][:1]


def expand_source(path: str, seen=None) -> str:
    """Source with local #include "x" inlined (NVRTC cannot see our files otherwise)."""
    seen = set() if seen is None else seen
    path = os.path.abspath(path)
    if path in seen:
        return ""
    seen.add(path)
    with open(path) as f:
        text = f.read()

    def sub(m):
        inc = os.path.join(os.path.dirname(path), m.group(1))
        if not os.path.exists(inc):
            inc = os.path.join(KERNELS_DIR, m.group(1))
        return expand_source(inc, seen)
    return _INCLUDE.sub(sub, text)


def nvrtc_version() -> str:
    from cuda.bindings import nvrtc
    err, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def _check(res, prog=None, what="nvrtc"):
    from cuda.bindings import nvrtc
    err = res[0] if isinstance(res, tuple) else res
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise KernelBuildError(f"{what} failed ({err}):\n{log}")
    return res


def compile_cubin(path: str, arch: str, options=(), defines: dict | None = None) -> bytes:
    """Compile one .cu file for `arch` ("sm_90", "sm_89", "sm_90a") to a cubin, or for a virtual
    arch ("compute_89") to PTX that the driver compiles for a newer device at load, via the cache."""
    from cuda.bindings import nvrtc
    src = expand_source(path)
    defs = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    opts = [f"--gpu-architecture={arch}", *DEFAULT_OPTIONS, *options, *defs]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    key = hashlib.sha256("\0".join([src, arch, *opts, nvrtc_version()]).encode()).hexdigest()[:32]
    ptx = arch.startswith("compute_")
    out = os.path.join(cache_dir(), f"{os.path.basename(path)}.{arch}.{key}.{'ptx' if ptx else 'cubin'}")
    if os.path.exists(out):
        with open(out, "rb") as f:
            return f.read()
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), os.path.basename(path).encode(), 0, [], []))[1]
    try:
        bopts = [o.encode() for o in opts]
        _check(nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts), prog, f"compiling {os.path.relpath(path, KERNELS_DIR)} for {arch}")
        if ptx:
            _, n = _check(nvrtc.nvrtcGetPTXSize(prog))
            cubin = b" " * n
            _check(nvrtc.nvrtcGetPTX(prog, cubin))
            cubin = cubin.rstrip(b"\0 ")
        else:
            _, n = _check(nvrtc.nvrtcGetCUBINSize(prog))
            cubin = b" " * n
            _check(nvrtc.nvrtcGetCUBIN(prog, cubin))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    tmp = out + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(cubin)
    os.replace(tmp, out)
    return cubin


def ptxas_report(path: str, arch: str, defines: dict | None = None) -> str:
    """NVRTC's log of compiling `path` for `arch` with `ptxas -v` (registers, spills, stack per
    entry point), uncached; for the CPU-only checks that a kernel does not spill."""
    from cuda.bindings import nvrtc
    src = expand_source(path)
    defs = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    opts = [f"--gpu-architecture={arch}", *DEFAULT_OPTIONS, "--ptxas-options=-v", *defs]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), os.path.basename(path).encode(), 0, [], []))[1]
    try:
        bopts = [o.encode() for o in opts]
        _check(nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts), prog, f"compiling {path} for {arch}")
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, buf)
        return buf.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def device_arch() -> str:
    import cupy
    return f"sm_{cupy.cuda.Device().compute_capability}"  # CuPy gives "90", "89"


def build_arch() -> str:
    """What load_module builds for: the device's own arch, or, when the kernels are being built
    for an older target (kernels/target.py building_for: an sm_89 plan on an H200), that
    target's virtual arch, as PTX the driver compiles for this device."""
    from ggfuse.kernels import target
    dev = device_arch()
    spec = target.current()
    if spec is None or f"sm_{spec.cc}" == dev:
        return dev
    return f"compute_{spec.cc}"


_ARCH_MAP = re.compile(r"^//\s*ggfuse-nvrtc-arch:\s*(sm_\w+)\s*->\s*(sm_\w+)\s*$", re.M)


def source_arch(path: str, arch: str) -> str:
    """The target to build `path` for on a device of `arch`. A source may ask for an
    arch-specific target with a line `// ggfuse-nvrtc-arch: sm_90 -> sm_90a` (wgmma and setmaxnreg
    exist only in sm_90a code); other sources build for `arch` itself."""
    with open(path) as f:
        head = f.read(4096)
    for src, dst in _ARCH_MAP.findall(head):
        if src == arch:
            return dst
    return arch


def load_module(path: str, options=(), defines: dict | None = None):
    """The compiled module for the current GPU (a cupy.RawModule), built once per process."""
    import cupy
    if not os.path.isabs(path):
        path = os.path.join(KERNELS_DIR, path)
    arch = source_arch(path, build_arch())
    key = (path, arch, tuple(options), tuple(sorted((defines or {}).items())))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            cubin = compile_cubin(path, arch, options, defines)
            ext = "ptx" if arch.startswith("compute_") else "cubin"
            fd = os.path.join(cache_dir(), f"load.{hashlib.sha256(cubin).hexdigest()[:24]}.{ext}")
            if not os.path.exists(fd):
                with open(fd, "wb") as f:
                    f.write(cubin)
            mod = _Module(cupy.RawModule(path=fd), pdl=int(_ARCH_CC.match(arch).group(1)) >= 90)
            _modules[key] = mod
    return mod


class _Module:
    """A loaded module (cupy.RawModule's methods) whose get_function notes, for a module built
    for sm_90 or newer, the kernel's handle as ready for a programmatic edge (kernels/pdl.cuh:
    every ggfuse kernel waits before it reads what an earlier kernel wrote; below sm_90 the
    wait compiles to nothing)."""

    def __init__(self, mod, pdl: bool):
        self._mod, self.pdl = mod, pdl

    def get_function(self, name: str):
        fn = self._mod.get_function(name)
        if self.pdl:
            # a cupy.RawKernel: its cupy.cuda.function.Function (.kernel) holds the CUfunction
            ptr = getattr(fn, "ptr", None) or getattr(getattr(fn, "kernel", None), "ptr", None)
            if ptr:
                _pdl_ready.add(int(ptr))
        return fn

    def __getattr__(self, name):
        return getattr(self._mod, name)


def pdl_ready(func_handle: int) -> bool:
    """Whether the kernel with this CUfunction handle came from a module load_module built for
    sm_90 or newer (so it waits for the kernels before it: kernels/pdl.cuh)."""
    return int(func_handle) in _pdl_ready


def all_sources() -> list[str]:
    """Every kernel source file (the CPU-only compile test walks these)."""
    return sorted(glob.glob(os.path.join(KERNELS_DIR, "**", "*.cu"), recursive=True))
