"""CPU kernels the engine builds for the machine it runs on, with the torch path as the fallback.

Decode attention over a paged KV cache is the one step that eager torch cannot do without copying:
it must gather each sequence's blocks into a padded batch, then run batched matmuls with a handful of
query rows each. `csrc/kernels.cpp` reads the blocks in place instead (see it for layouts), and fuses
the small per-layer ops (residual add + RMSNorm, RoPE + KV-cache write, SiLU x up, greedy argmax), each
of which eager torch runs as three to eight kernels of a few microseconds of launch cost each.

The source is compiled on first use with the system C++ compiler (`g++ -O3 -march=native -fopenmp`,
about 2 s) into a cache directory keyed by the source, the compiler and the CPU's flags, and loaded
with ctypes: no torch headers, so the build is quick and needs nothing beyond a compiler. OpenMP in the
kernel shares the runtime torch has already loaded (`libgomp.so.1`), so it uses torch's thread count.
Where no compiler is present, the build fails, or `TOKENFAB_CPU_KERNELS=0` is set, `supports()` is false
and `ops()` returns None, and the engine keeps its torch path; `describe()` says which is in use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = "kernels.cpp"
# -ffast-math: vectorised exp (glibc libmvec) and reductions; the kernels assume finite inputs.
# Compiled and linked in two steps: linking a shared library with -ffast-math adds crtfastmath.o,
# whose constructor turns on flush-to-zero for the whole process when the library loads, changing
# the floating-point results of every other library in it (NumPy, SciPy, the tests' Hypothesis).
_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
_LINK = ["-shared", "-fopenmp"]
_DTYPES = {torch.bfloat16: 0, torch.float32: 1}
_state: dict[str, object] = {}
_lock = threading.Lock()


def _arch_flag() -> str:
    """-march for the build: this CPU by default; TOKENFAB_KERNEL_ARCH (e.g. x86-64-v3) builds for an older
    instruction set, which is how the tests check the generic code paths on an AVX-512 machine."""
    return "-march=" + (os.environ.get("TOKENFAB_KERNEL_ARCH") or "native")


def _cache_dir() -> Path:
    """TOKENFAB_KERNEL_CACHE, else `kernels/` under the engine's cache (TOKENFAB_CACHE_DIR or ~/.cache/tokenfab)."""
    if os.environ.get("TOKENFAB_KERNEL_CACHE"):
        return Path(os.environ["TOKENFAB_KERNEL_CACHE"])
    return Path(os.environ.get("TOKENFAB_CACHE_DIR") or Path.home() / ".cache" / "tokenfab") / "kernels"


@functools.cache
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Intel Sapphire Rapids and later). oneDNN's bf16 matmuls
    and torch's CPU flash attention use them, which moves the engine's kernel crossovers: measured on
    the 2-core VMs (docs/performance.md), a Xeon with AMX runs prefill attention faster in SDPA and
    small batches faster in pre-packed bf16 than in int4 from ~6 tokens; an AMD EPYC without AMX the
    other way round up to ~14 tokens."""
    return " amx_bf16" in _cpu_flags()


def _build(cxx: str, source: bytes) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = [_arch_flag(), *_FLAGS]
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags + _LINK).encode(),
                                     _cpu_flags().encode()]))
    target = _cache_dir() / key.hexdigest()[:16] / "libtokenfab_kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        obj, out = Path(tmp) / "kernels.o", Path(tmp) / target.name
        for cmd in ([cxx, *flags, "-c", str(src), "-o", str(obj)], [cxx, *_LINK, str(obj), "-o", str(out)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders (several servers starting) do not collide
    return target


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build_and_open()
    return _state["lib"]  # type: ignore[return-value]


def _build_and_open() -> ctypes.CDLL | None:
    lib = None
    if os.environ.get("TOKENFAB_CPU_KERNELS", "1") in ("0", "false", "no", "off"):
        _state["why"] = "disabled by TOKENFAB_CPU_KERNELS=0"
    elif not sys.platform.startswith("linux"):
        _state["why"] = f"not built on {sys.platform}"
    elif (cxx := os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")) is None:
        _state["why"] = "no C++ compiler found (install g++)"
    else:
        try:
            source = resources.files("tokenfab.engine").joinpath("csrc", _SOURCE).read_bytes()
            path = _build(cxx, source)
            torch.get_num_threads()  # torch's OpenMP runtime is loaded before the kernel's, so they share it
            lib = ctypes.CDLL(str(path))
            lib.tf_kernel_isa.restype = ctypes.c_char_p
            i32, i64, ptr, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
            signatures = {
                "tf_decode_attention": ([i32, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, f32], i32),
                "tf_add_rms_norm": ([i32, ptr, ptr, ptr, ptr, i64, i64, f32], None),
                "tf_rope_and_cache": ([i32, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64], None),
                "tf_silu_mul": ([i32, ptr, ptr, i64, i64], None),
                "tf_argmax_rows": ([i32, ptr, ptr, i64, i64], None),
            }
            for name, (args, res) in signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, res
            _state["why"] = f"built for this CPU ({lib.tf_kernel_isa().decode()})"
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["why"] = f"build failed, using torch ops: {e}"
            log.warning("CPU kernels: %s", _state["why"])
            lib = None
    log.debug("CPU kernels: %s", _state["why"])
    return lib


def describe() -> str:
    """One line: whether the built kernels are in use, and why not if not."""
    _load()
    return str(_state["why"])


def available() -> bool:
    return _load() is not None


def supports(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in _DTYPES and available()


class Ops:
    """The kernels without argument checks, for the model's hot loop (about 6 us a call less than the
    checked functions below, which matters at ~150 calls a step). Callers pass what the checked
    functions would accept: contiguous CPU tensors of one supported dtype, shapes as documented there.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._attn = lib.tf_decode_attention
        self._norm = lib.tf_add_rms_norm
        self._rope = lib.tf_rope_and_cache
        self._silu = lib.tf_silu_mul
        self._argmax = lib.tf_argmax_rows

    def decode_attention(self, q, cache, tables, lens, block_size, kv_heads, scale):
        b, heads, hd = q.shape
        out = torch.empty(b, heads, hd, dtype=q.dtype)
        rc = self._attn(_DTYPES[q.dtype], q.data_ptr(), q.stride(0), cache.data_ptr(), cache.shape[1],
                        tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(),
                        b, heads, kv_heads, hd, block_size, scale)
        if rc != 0:
            raise ValueError(f"decode_attention cannot take heads={heads}, kv heads={kv_heads}, head dim={hd}, "
                             f"block size={block_size}")
        return out

    def add_rms_norm(self, x, delta, weight, eps):
        out = torch.empty_like(x)
        self._norm(_DTYPES[x.dtype], x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                   out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def rope_and_cache(self, qkv, cos, sin, slots, cache, heads, kv_heads):
        n, _, hd = qkv.shape
        self._rope(_DTYPES[qkv.dtype], qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                   cache.data_ptr(), n, heads, kv_heads, hd, cache.shape[1])

    def silu_mul(self, gu):
        n, f2 = gu.shape
        out = torch.empty(n, f2 // 2, dtype=gu.dtype)
        self._silu(_DTYPES[gu.dtype], gu.data_ptr(), out.data_ptr(), n, f2 // 2)
        return out

    def argmax_rows(self, x):
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(_DTYPES[x.dtype], x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
        return out


def ops() -> Ops | None:
    """The unchecked kernels, or None where they are not built."""
    if "ops" not in _state:
        lib = _load()
        _state["ops"] = None if lib is None else Ops(lib)
    return _state["ops"]  # type: ignore[return-value]


def _checked(*tensors: torch.Tensor) -> Ops:
    o = ops()
    if o is None:
        raise RuntimeError(f"CPU kernels unavailable: {_state['why']}")
    for x in tensors:
        if x.dtype not in _DTYPES or x.device.type != "cpu":
            raise TypeError(f"CPU kernels take bfloat16 or float32 CPU tensors, got {x.dtype} on {x.device}")
    if any(x.dtype != tensors[0].dtype for x in tensors):
        raise TypeError(f"CPU kernels take tensors of one dtype, got {sorted({str(x.dtype) for x in tensors})}")
    return o


def decode_attention(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                     block_size: int, num_kv_heads: int, scale: float) -> torch.Tensor:
    """Attention of one query per sequence over its paged context, read in place.

    q: [B, heads, head_dim] (rows may be strided, heads and dims contiguous); cache: [2 x kv heads,
    slots, head_dim] contiguous, same dtype; tables: [B, max blocks] int64 block ids; lens: [B] int64,
    each at least 1 and within its table. Returns [B, heads, head_dim] in q's dtype.
    """
    if q.dtype != cache.dtype or q.dtype not in _DTYPES:
        raise TypeError(f"decode_attention takes bfloat16 or float32 q and cache, got {q.dtype} and {cache.dtype}")
    o = _checked(q, cache)
    b, heads, hd = q.shape
    if q.stride(2) != 1 or q.stride(1) != hd or not cache.is_contiguous():
        raise ValueError("decode_attention needs contiguous heads in q and a contiguous cache")
    if tables.dtype != torch.int64 or lens.dtype != torch.int64 or not tables.is_contiguous() or not lens.is_contiguous():
        raise TypeError("decode_attention takes contiguous int64 block tables and lengths")
    if cache.shape[0] != 2 * num_kv_heads or cache.shape[2] != hd or lens.shape != (b,) or tables.shape[0] != b:
        raise ValueError(f"decode_attention: cache {tuple(cache.shape)}, tables {tuple(tables.shape)} and lens "
                         f"{tuple(lens.shape)} do not fit q {tuple(q.shape)} with {num_kv_heads} kv heads")
    if b and (int(lens.min()) < 1 or int(lens.max()) > tables.shape[1] * block_size
              or int(tables.min()) < 0 or int(tables.max()) >= cache.shape[1] // block_size):
        raise ValueError("decode_attention: a length or block id lies outside the cache")
    return o.decode_attention(q, cache, tables, lens, block_size, num_kv_heads, scale)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, when given); returns RMSNorm(x) * weight[:d]. x, delta: [n, d]."""
    o = _checked(x, weight, *(() if delta is None else (delta,)))
    if x.dim() != 2 or not x.is_contiguous() or not weight.is_contiguous() or weight.shape[0] < x.shape[1]:
        raise ValueError("add_rms_norm takes a contiguous [n, d] x and a weight of at least d entries")
    if delta is not None and (delta.shape != x.shape or not delta.is_contiguous()):
        raise ValueError(f"delta must be contiguous and shaped like x: {tuple(delta.shape)} vs {tuple(x.shape)}")
    return o.add_rms_norm(x, delta, weight, eps)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   cache: torch.Tensor, heads: int, kv_heads: int) -> None:
    """Rotate the Q and K heads of the fused projection in place (rotate-half layout) and write each
    token's K and V heads into the cache at its slot.

    qkv: [n, heads + 2 kv_heads, hd]; cos, sin: [n, hd/2] float32; slots: [n] int64; cache: [2 kv_heads, slots, hd].
    """
    o = _checked(qkv, cache)
    n, width, hd = qkv.shape
    if width != heads + 2 * kv_heads or not qkv.is_contiguous() or not cache.is_contiguous():
        raise ValueError("rope_and_cache: qkv must be contiguous with heads + 2 kv_heads rows per token")
    if cache.shape[0] != 2 * kv_heads or cache.shape[2] != hd:
        raise ValueError(f"rope_and_cache: cache {tuple(cache.shape)} does not hold {kv_heads} kv heads of {hd}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != (n, hd // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope_and_cache: cos and sin must be float32 [{n}, {hd // 2}]")
    if slots.dtype != torch.int64 or slots.shape != (n,):
        raise ValueError("rope_and_cache: slots must be int64 [n]")
    if n and (int(slots.min()) < 0 or int(slots.max()) >= cache.shape[1]):
        raise ValueError("rope_and_cache: a slot lies outside the cache")
    o.rope_and_cache(qkv, cos.contiguous(), sin.contiguous(), slots.contiguous(), cache, heads, kv_heads)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gu = [gate | up], [n, 2f] -> [n, f]."""
    o = _checked(gu)
    if gu.dim() != 2 or gu.shape[1] % 2 or not gu.is_contiguous():
        raise ValueError("silu_mul takes a contiguous [n, 2f] tensor")
    return o.silu_mul(gu)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """First index of each row's maximum, [n, v] -> [n] int64 (rows must be NaN-free)."""
    o = _checked(x)
    if x.dim() != 2 or x.shape[1] == 0 or not x.is_contiguous():
        raise ValueError("argmax_rows takes a contiguous [n, v] tensor with v >= 1")
    return o.argmax_rows(x)
