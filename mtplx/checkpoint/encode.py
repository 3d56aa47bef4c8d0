"""Canonical tensors -> the tensors of a file layout (HF per-expert / fused, MLX switch_mlp,
optionally MLX-affine-quantized), with the file's norm convention and key prefix.

The inverse of `canonical.py`. Used by the synthetic writer and by forge's head writer.
"""

from __future__ import annotations

import numpy as np

from .canonical import fuse_ba, fuse_qkvz
from .norms import ZERO_CENTERED
from .names import is_norm, split_key
from .quant import quantize as mlx_quantize


def is_norm_name(name: str) -> bool:
    s = split_key(name)
    return bool(s) and is_norm(*s)


_QUANTIZABLE_SUFFIXES = (".weight",)


def _module_in_dim(arr_shape: tuple[int, ...]) -> int:
    return arr_shape[-1]


class Encoder:
    """Turns canonical tensors into file tensors for one group (backbone or head)."""

    def __init__(self, cfg, layout, prefix, norm_conv, dtype, quant, quant_overrides, module_prefix):
        self.cfg, self.layout, self.prefix, self.norm_conv = cfg, layout, prefix, norm_conv
        self.dtype, self.quant, self.overrides = dtype, quant, quant_overrides
        self.module_prefix = module_prefix  # module-path prefix recorded in config overrides
        self.file: dict[str, np.ndarray] = {}
        self.expected: dict[str, np.ndarray] = {}

    def _cast(self, a: np.ndarray) -> np.ndarray:
        return a.astype(self.dtype)

    def linear(self, file_module: str, canon_module: str, w: np.ndarray, *, stacked: bool = False,
               router: bool = False):
        """A Linear/Embedding module (weight [.., out, in]); quantized when requested and possible."""
        q = None
        if self.quant is not None:
            bits, gs = self.quant
            if router:
                bits, gs = 8, 64
            if w.shape[-1] % gs == 0:
                q = (bits, gs)
                if router:
                    self.overrides[self.module_prefix + file_module] = {"group_size": gs, "bits": bits}
        wd = self._cast(w)
        if q is None:
            self.file[self.prefix + file_module + ".weight"] = wd
            self.expected[canon_module if stacked else canon_module + ".weight"] = wd
            return
        p, s, b = mlx_quantize(wd, group_size=q[1], bits=q[0])
        for part, arr in (("weight", p), ("scales", s), ("biases", b)):
            self.file[f"{self.prefix}{file_module}.{part}"] = arr
            self.expected[f"{canon_module}.{part}"] = arr

    def plain(self, file_name: str, canon_name: str, a: np.ndarray, expected: np.ndarray | None = None):
        self.file[self.prefix + file_name] = a
        self.expected[canon_name] = a if expected is None else expected

    def norm(self, file_name: str, canon_name: str, w: np.ndarray):
        if self.norm_conv == ZERO_CENTERED:
            a = self._cast(w)
            exp = np.float32(1.0) + a.astype(np.float32)
        else:
            a = self._cast(np.float32(1.0) + w.astype(np.float32))
            exp = a.astype(np.float32)
        self.file[self.prefix + file_name] = a
        self.expected[canon_name] = exp


def encode_group(enc: Encoder, canon: dict[str, np.ndarray], names: list[str], strip: str, out_prefix: str,
                  expert_layout: str):
    """Encode canonical tensors `names` (all starting with `strip`) into enc."""
    cfg = enc.cfg
    done = set()
    for name in names:
        if name in done:
            continue
        rest = name[len(strip):]
        canon_name = out_prefix + rest
        a = canon[name]
        if is_norm_name(name):
            enc.norm(rest, canon_name, a)
        elif rest.endswith("linear_attn.conv1d.weight"):
            c = enc._cast(a)
            shaped = c[:, :, None] if enc.layout == "mlx" else c[:, None, :]
            enc.plain(rest, canon_name, shaped, c)
        elif rest.endswith(("linear_attn.A_log", "linear_attn.norm.weight")):
            enc.plain(rest, canon_name, a.astype(np.float32))
        elif rest.endswith("linear_attn.dt_bias"):
            enc.plain(rest, canon_name, enc._cast(a))
        elif cfg.family == "qwen3_next" and rest.endswith("linear_attn.in_proj_qkv.weight"):
            la = rest[: -len(".in_proj_qkv.weight")]
            cla = out_prefix + la
            z = canon[strip + la + ".in_proj_z.weight"]
            b = canon[strip + la + ".in_proj_b.weight"]
            aa = canon[strip + la + ".in_proj_a.weight"]
            done.update({strip + la + s for s in (".in_proj_z.weight", ".in_proj_b.weight", ".in_proj_a.weight")})
            qkvz = fuse_qkvz(a, z, cfg)
            ba = fuse_ba(b, aa, cfg)
            _encode_fused_linear(enc, la + ".in_proj_qkvz", cla, qkvz, ("in_proj_qkv", "in_proj_z"), "qkvz")
            _encode_fused_linear(enc, la + ".in_proj_ba", cla, ba, ("in_proj_b", "in_proj_a"), "ba")
        elif ".mlp.experts." in "." + rest:
            mlp = rest.split(".experts.")[0]
            cmlp = out_prefix + mlp
            key = strip + mlp + ".experts."
            g, u, d = canon[key + "gate_proj"], canon[key + "up_proj"], canon[key + "down_proj"]
            done.update({key + "gate_proj", key + "up_proj", key + "down_proj"})
            if expert_layout == "mlx":
                for proj, arr in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
                    enc.linear(f"{mlp}.switch_mlp.{proj}", f"{cmlp}.experts.{proj}", arr, stacked=True)
            elif expert_layout == "hf_fused":
                gd, ud, dd = enc._cast(g), enc._cast(u), enc._cast(d)
                enc.file[enc.prefix + f"{mlp}.experts.gate_up_proj"] = np.concatenate([gd, ud], axis=1)
                enc.file[enc.prefix + f"{mlp}.experts.down_proj"] = dd
                enc.expected.update({f"{cmlp}.experts.gate_proj": gd, f"{cmlp}.experts.up_proj": ud,
                                     f"{cmlp}.experts.down_proj": dd})
            else:
                for proj, arr in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
                    ad = enc._cast(arr)
                    for e in range(arr.shape[0]):
                        enc.file[enc.prefix + f"{mlp}.experts.{e}.{proj}.weight"] = ad[e]
                    enc.expected[f"{cmlp}.experts.{proj}"] = ad
        elif rest.endswith(".weight"):
            module = rest[: -len(".weight")]
            enc.linear(module, out_prefix + module, a,
                       router=module.endswith(("mlp.gate", "shared_expert_gate")))
        else:
            enc.plain(rest, canon_name, enc._cast(a))


def _encode_fused_linear(enc: Encoder, file_module: str, canon_la: str, w: np.ndarray, parts: tuple[str, str],
                         kind: str):
    """Write a fused Qwen3-Next projection; expected canonical = its split (weights or triples)."""
    from .canonical import split_ba, split_qkvz

    split = (lambda x: split_qkvz(x, enc.cfg)) if kind == "qkvz" else (lambda x: split_ba(x, enc.cfg))
    before = set(enc.expected)
    enc.linear(file_module, "__tmp__", w)
    new = {k: enc.expected.pop(k) for k in set(enc.expected) - before}
    for k, arr in new.items():
        suffix = k[len("__tmp__"):]  # ".weight" / ".scales" / ".biases"
        x, y = split(arr)
        enc.expected[f"{canon_la}.{parts[0]}{suffix}"] = x
        enc.expected[f"{canon_la}.{parts[1]}{suffix}"] = y
