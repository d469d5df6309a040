"""The built CPU decode-attention kernel against an fp32 reference, on random paged caches."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tokenfab.engine import cpu_kernels


def test_kernel_builds_where_a_compiler_is_present():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the engine uses its torch path")
    assert cpu_kernels.available(), cpu_kernels.describe()
    assert cpu_kernels.describe().startswith("built for this CPU")
    if os.environ.get("TOKENFAB_KERNEL_ARCH") in ("x86-64-v3", "x86-64-v2", "x86-64"):
        assert cpu_kernels.describe() == "built for this CPU (generic)"


def _reference(q, cache, tables, lens, bs, kvh):
    """Per sequence: gather its slots, fp32 softmax attention with grouped heads."""
    b, heads, hd = q.shape
    rep = heads // kvh
    out = torch.empty(b, heads, hd)
    for i in range(b):
        n = int(lens[i])
        slots = (tables[i][:, None] * bs + torch.arange(bs)).flatten()[:n]
        k, v = cache[:kvh, slots].float(), cache[kvh:, slots].float()  # [kvh, n, hd]
        qq = q[i].float().view(kvh, rep, hd)
        p = (qq @ k.transpose(1, 2) * hd**-0.5).softmax(-1)
        out[i] = (p @ v).reshape(heads, hd)
    return out


CASES = [  # heads, kv heads, head dim, block size, dtype: the first three take the AVX512-BF16 path where built
    (9, 3, 64, 16, torch.bfloat16),  # SmolLM2
    (32, 8, 128, 32, torch.bfloat16),  # Llama-3.1-8B shape, larger blocks
    (4, 4, 32, 16, torch.bfloat16),  # no grouping
    (12, 2, 48, 8, torch.bfloat16),  # head dim and block size the fast path does not take
    (9, 3, 64, 16, torch.float32),
    (8, 1, 96, 4, torch.float32),
]


@pytest.mark.parametrize("heads,kvh,hd,bs,dtype", CASES)
def test_decode_attention_matches_reference(heads, kvh, hd, bs, dtype):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    g = torch.Generator().manual_seed(heads * 1000 + hd)
    lens = torch.tensor([1, bs - 1, bs, bs + 1, 5 * bs + 3, 97], dtype=torch.int64)
    nblocks = 64
    per_seq = [-(-int(n) // bs) for n in lens]
    table_w = max(per_seq) + 2  # wider than needed: padding entries must never be read
    perm = torch.randperm(nblocks, generator=g)
    tables = torch.zeros(len(lens), table_w, dtype=torch.int64)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    cache = torch.randn(2 * kvh, nblocks * bs, hd, generator=g).to(dtype)
    # q as the engine passes it: a strided view into a fused QKV output
    qkv = torch.randn(len(lens), heads + 2 * kvh, hd, generator=g).to(dtype)
    q = qkv[:, :heads]
    got = cpu_kernels.decode_attention(q, cache, tables, lens, bs, kvh, hd**-0.5)
    want = _reference(q, cache, tables, lens, bs, kvh)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output's own rounding (2^-8 relative)
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (got.float() - want).abs().max()


def test_decode_attention_rejects_what_it_cannot_read():
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    cache = torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    tables, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        cpu_kernels.decode_attention(torch.zeros(1, 1, 64, dtype=torch.float16), cache.half(), tables, lens, 16, 1, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.decode_attention(torch.zeros(1, 64, 1, dtype=torch.bfloat16).transpose(1, 2), cache, tables, lens, 16, 1, 0.1)
    with pytest.raises(ValueError, match="do not fit q"):
        cpu_kernels.decode_attention(torch.zeros(1, 3, 64, dtype=torch.bfloat16), cache, tables, lens, 16, 2, 0.1)
    with pytest.raises(ValueError, match="cannot take heads=3, kv heads=2"):
        cpu_kernels.decode_attention(torch.zeros(1, 3, 64, dtype=torch.bfloat16), torch.zeros(4, 64, 64, dtype=torch.bfloat16),
                                     tables, lens, 16, 2, 0.1)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_kernels.decode_attention(torch.zeros(1, 1, 64, dtype=torch.bfloat16), cache, tables, lens * 17, 16, 1, 0.1)


DTYPES = [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 200])  # 200 x 576 splits over threads
def test_add_rms_norm_matches_torch(dtype, tol, n):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    g = torch.Generator().manual_seed(n)
    d = 576
    x = torch.randn(n, d, generator=g).to(dtype)
    delta = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(2 * d, generator=g).to(dtype)  # the model keeps norm weights doubled; the kernel reads [:d]
    summed = (x.float() + delta.float()).to(dtype)  # the residual as torch's add rounds it
    want = torch.nn.functional.rms_norm(summed.float(), (d,), w[:d].float(), 1e-5)
    x_in = x.clone()
    got = cpu_kernels.add_rms_norm(x_in, delta, w, 1e-5)
    assert torch.equal(x_in, summed)  # the residual stream is updated in place
    assert torch.allclose(got.float(), want, atol=tol * 4, rtol=tol), (got.float() - want).abs().max()
    alone = cpu_kernels.add_rms_norm(x.clone(), None, w, 1e-5)
    want_alone = torch.nn.functional.rms_norm(x.float(), (d,), w[:d].float(), 1e-5)
    assert torch.allclose(alone.float(), want_alone, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_rope_and_cache_rotates_and_writes_the_cache(dtype, tol):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    g = torch.Generator().manual_seed(7)
    n, heads, kvh, hd, slots = 5, 9, 3, 64, 40
    qkv = torch.randn(n, heads + 2 * kvh, hd, generator=g).to(dtype)
    pos = torch.tensor([0, 3, 17, 100, 2047])
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = pos.float()[:, None] * inv[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    slot = torch.tensor([4, 0, 39, 12, 13])
    cache = torch.zeros(2 * kvh, slots, hd, dtype=dtype)

    def rotate(x):  # rotate-half reference in fp32
        x = x.float()
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)

    want_q, want_k, v = rotate(qkv[:, :heads]), rotate(qkv[:, heads : heads + kvh]), qkv[:, heads + kvh :].clone()
    cpu_kernels.rope_and_cache(qkv, cos, sin, slot, cache, heads, kvh)
    assert torch.allclose(qkv[:, :heads].float(), want_q, atol=tol, rtol=tol)
    assert torch.allclose(qkv[:, heads : heads + kvh].float(), want_k, atol=tol, rtol=tol)
    assert torch.equal(cache[:kvh, slot].transpose(0, 1), qkv[:, heads : heads + kvh])  # rotated K, as stored
    assert torch.equal(cache[kvh:, slot].transpose(0, 1), v)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot] = False
    assert not cache[:, untouched].any()


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1536), (64, 1536), (3, 40)])  # 40: a row that is not a multiple of 16
def test_silu_mul_matches_torch(dtype, tol, shape):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    n, f = shape
    gu = (torch.randn(n, 2 * f, generator=torch.Generator().manual_seed(f)) * 4).to(dtype)
    gu[0, 0], gu[0, 1] = -200.0, 200.0  # saturated ends: silu(-200) = 0, silu(200) = 200
    want = torch.nn.functional.silu(gu[:, :f].float()) * gu[:, f:].float()
    got = cpu_kernels.silu_mul(gu)
    assert got.shape == (n, f) and got.dtype == dtype
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (got.float() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_returns_the_first_maximum(dtype):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    x = torch.randn(7, 49152, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[1, 5] = x[1, 900] = 100.0  # a tie: the first index wins, as torch's argmax
    x[2, -1] = 100.0  # the last column
    x[3] = -1.0  # all equal
    got = cpu_kernels.argmax_rows(x)
    assert got.tolist() == x.float().argmax(dim=-1).tolist()
    assert got[1] == 5 and got[2] == 49151 and got[3] == 0


def test_checked_kernels_refuse_mismatched_inputs():
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.describe())
    x = torch.zeros(2, 8)
    with pytest.raises(TypeError, match="one dtype"):
        cpu_kernels.add_rms_norm(x, None, torch.ones(16, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="at least d entries"):
        cpu_kernels.add_rms_norm(x, None, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="2f"):
        cpu_kernels.silu_mul(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_kernels.rope_and_cache(torch.zeros(1, 3, 8), torch.zeros(1, 4), torch.zeros(1, 4),
                                   torch.tensor([10]), torch.zeros(2, 4, 8), 1, 1)


def test_kernels_can_be_switched_off_and_the_engine_says_so():
    import subprocess
    import sys

    code = ("from tokenfab.engine import cpu_kernels; import torch; "
            "print(cpu_kernels.describe()); print(cpu_kernels.supports(torch.bfloat16, torch.device('cpu')))")
    env = {**__import__("os").environ, "TOKENFAB_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["disabled by TOKENFAB_CPU_KERNELS=0", "False"]


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"], ids=["avx2", "avx512-without-bf16"])
def test_generic_paths_on_older_instruction_sets(arch):
    """The same checks on builds without AVX512-BF16 (and without AVX-512), in a fresh process."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() != "x86_64" or not cpu_kernels.available():
        pytest.skip("x86-64 builds only")
    needs = {"x86-64-v3": {"avx2", "fma", "bmi2"}, "x86-64-v4": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}}[arch]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    if not needs <= flags:  # a build for that level would not run here (SIGILL), so there is nothing to check
        pytest.skip(f"this CPU lacks {', '.join(sorted(needs - flags))}")
    env = {**os.environ, "TOKENFAB_KERNEL_ARCH": arch}
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "matches or rotates or argmax or builds"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
