"""CPU kernel of the exact path: a few-row matmul whose per-row arithmetic is fixed.

`rowmm(x [M, K] fp32, w [N, K] fp32|bf16|fp16|int8, scale [N] fp32 or empty) -> y [M, N] fp32`:
every output y[r, n] is ONE fixed sequence of L-lane FMAs over K (a zero-padded last chunk when
K is not a multiple of L), then a fixed horizontal sum (then * scale[n] for int8), whatever M,
the other rows, the tiling or the thread split. So verify rows are bit-identical to decode by
construction, and each weight tile is read from memory once for all M rows (the other row
groups find it in cache): verify costs about what decode costs while memory-bound.

Builds of one source, chosen at run time from the CPU's flags:
  avx512bf16  the avx512 build + bf16 x bf16 matmuls by AVX512-BF16 dot products (`rowmm_bf16`,
              bf16 models: their activations are bf16, so no input is rounded);
  avx512      L = 16 (AVX-512 F/BW + FMA + F16C), 4 x 4 register tiles;
  avx2        L = 8 (AVX2 + FMA + F16C), 4 x 2 tiles.
The two give different bits from each other (lane count), never within one process.
Each is built with the weight prefetch of the CPU's vendor (`prefetch_level`: L1 on Intel, L2 and a
sequential one-row bf16 stream on AMD; `MTPLX_KERNEL_PREFETCH=l1|l2` overrides), same bits either way.
`MTPLX_KERNEL_ISA=avx2` forces the AVX2 build; `MTPLX_NO_KERNEL=1` disables the kernel (the
model keeps the pure-torch exact path: row padding, model.ROW_GROUP); other CPUs (ARM, old
x86) get that fallback too.

Threads: columns are split across torch's intra-op threads (OpenMP), in chunks of at least
PAR_MIN_BYTES of weight, so the default model's tiny matrices stay on one thread (a fork costs
more than they do) while the 0.8B shape's matrices use every thread.

Built on first use with torch.utils.cpp_extension (a C++ compiler and ninja; ~40 s, cached in
torch's extension folder). Why not a prebuilt wheel: a torch C++ extension is tied to the exact
torch version it was built against, and mtplx accepts a range of torch versions.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

PAR_MIN_BYTES = int(os.environ.get("MTPLX_KERNEL_PAR_BYTES", 256 << 10))

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = ("ops.cpp", "step.cpp", "bindings.cpp")  # one translation unit, in this order


def _source() -> str:
    parts = []
    for name in _SOURCES:
        with open(os.path.join(_CSRC, name)) as f:
            parts.append(f.read())
    return "\n".join(parts)

_ISA_FLAGS = {
    "avx512bf16": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c"),
                   ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
                    "-DMTPLX_AVX512", "-DMTPLX_AVX512BF16"]),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DMTPLX_AVX512"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
_VERSION = "v13b"
_lock = threading.Lock()
_state: dict = {}


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ('' off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def kernel_isa() -> str | None:
    """The instruction set the kernel is built for on this CPU, or None (no usable one)."""
    flags = _cpu_flags()
    forced = os.environ.get("MTPLX_KERNEL_ISA", "").strip().lower()
    order = [forced] if forced else ["avx512bf16", "avx512", "avx2"]
    for isa in order:
        if isa in _ISA_FLAGS and all(f in flags for f in _ISA_FLAGS[isa][0]):
            return isa
    return None


# The weight prefetch (csrc/ops.cpp: prefetch_lines): which cache and how far ahead, per CPU
# vendor, as measured with the weights in DRAM. Intel (Sapphire Rapids-class): into L1, 2 tiles
# ahead. AMD Zen 4: into L2, 4 tiles ahead (1 thread, 1 row: bf16 12.5 -> 19-20 GB/s, fp32
# 17 -> 25; into L1 the prefetches crowd out the demand loads), and a one-row bf16 dot product
# reads its weight rows as one sequential stream, no software prefetch (19 -> 22-27 GB/s), and so
# does a two-row one (a depth-1 verify: 54 -> 45 ms over a 0.8B model's bf16 weights). No
# arithmetic changes, so both give the same bits. MTPLX_KERNEL_PREFETCH=l1|l2 overrides.
_PREFETCH_FLAGS = {"l1": ["-DPF_HINT=_MM_HINT_T0", "-DPF_TILES=2"],
                   "l2": ["-DPF_HINT=_MM_HINT_T1", "-DPF_TILES=4", "-DDOT_DECODE_SEQUENTIAL=1",
                          "-DDOT_SEQUENTIAL_ROWS=2"]}


def prefetch_level() -> str:
    forced = os.environ.get("MTPLX_KERNEL_PREFETCH", "").strip().lower()
    if forced:
        if forced not in _PREFETCH_FLAGS:
            raise ValueError(f"MTPLX_KERNEL_PREFETCH must be one of {', '.join(_PREFETCH_FLAGS)}, got {forced!r}")
        return forced
    return "l2" if _cpuinfo("vendor_id") == "AuthenticAMD" else "l1"


def extra_defines() -> list[str]:
    """MTPLX_KERNEL_DEFINES="A=1 B=0": preprocessor switches for kernel experiments and the tests that
    check a switch changes no bit (HSUM_TRANSPOSED=0: every horizontal sum on its own)."""
    out = []
    for item in os.environ.get("MTPLX_KERNEL_DEFINES", "").split():
        name = item.split("=", 1)[0]
        if not name.replace("_", "").isalnum() or not name[0].isalpha():
            raise ValueError(f"MTPLX_KERNEL_DEFINES: {item!r} is not NAME or NAME=VALUE")
        out.append(f"-D{item}")
    return out


def _name(isa: str) -> str:
    tag = "".join(c if c.isalnum() else "_" for c in "".join(extra_defines()))
    return f"mtplx_rowmm_{_VERSION}_{isa}_pf{prefetch_level()}" + (f"_{tag}" if tag else "")


def get_rowmm():
    """rowmm(x, w, scale=None) -> y, compiled for this CPU; None when unavailable (no compiler,
    no AVX2, not x86, MTPLX_NO_KERNEL=1)."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, isa = None, kernel_isa()
        if os.environ.get("MTPLX_NO_KERNEL", "") in ("1", "true"):
            _state["error"] = "disabled by MTPLX_NO_KERNEL"
        elif isa is None:
            _state["error"] = "this CPU has neither AVX-512 nor AVX2 + FMA + F16C"
        else:
            prefetch_level(), extra_defines()  # bad settings are the user's to fix, not a reason to fall back
            try:
                from torch.utils.cpp_extension import load_inline

                if not is_built():
                    sys.stderr.write(f"mtplx: building the fixed-order CPU kernel ({isa}), once per torch version "
                                     "(about a minute; MTPLX_NO_KERNEL=1 skips it)\n")

                mod = load_inline(_name(isa), cpp_sources=_source(), functions=None,
                                  extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS[isa][1],
                                                *_PREFETCH_FLAGS[prefetch_level()], *extra_defines()],
                                  extra_ldflags=["-fopenmp"], verbose=False)
                empty = torch.empty(0)

                def fn(x, w, scale=None, _f=mod.rowmm):
                    return _f(x, w, empty if scale is None else scale, PAR_MIN_BYTES)

                if hasattr(mod, "rowmm_bf16"):
                    _state["bf16"] = lambda x, w, _f=mod.rowmm_bf16: _f(x, w, PAR_MIN_BYTES)

                _state["mod"] = mod
            except Exception as e:  # no compiler, no ninja, ...
                _state["error"] = f"{type(e).__name__}: {e}"
                fn = None
        _state["fn"], _state["isa"] = fn, isa if fn is not None else None
        return fn


_MISSING = object()


def rowmm_fn():
    """get_rowmm without the lock once resolved (called for every exact-path matmul)."""
    fn = _state.get("fn", _MISSING)
    return get_rowmm() if fn is _MISSING else fn


def rowmm_bf16_fn():
    """bf16 x bf16 -> fp32 by AVX512-BF16 dot products (the avx512bf16 build), or None."""
    return _state.get("bf16") if rowmm_fn() is not None else None


def get_fused():
    """The build's fused ops (gdn_core, rms_rows, moe_act; model.py's exact path with the
    kernel), or None when the kernel is unavailable."""
    return _state.get("mod") if rowmm_fn() is not None else None


def loaded() -> object | None:
    """The build's module if a model already loaded it, else None (never builds: for helpers
    such as the greedy argmax that must not compile anything for a pure-torch model)."""
    return _state.get("mod")


def active_isa() -> str | None:
    """The instruction set of the loaded kernel (after get_rowmm), or None."""
    return _state.get("isa")


def is_built() -> bool:
    """Whether the extension for this CPU is already compiled in torch's extension cache."""
    isa = kernel_isa()
    if isa is None:
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory

        d = _get_build_directory(_name(isa), False)
        return any(f.endswith(".so") for f in os.listdir(d))
    except Exception:
        return False


def kernel_error() -> str | None:
    return _state.get("error")
