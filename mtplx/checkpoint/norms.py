"""Which RMSNorm convention a file uses: zero-centred `w` (y = x̂ (1 + w)) or `1 + w` (y = x̂ w).

Declared format wins where the file tells us:
- an MLX MTP sidecar folder (`qwen3_5_mtp`) or an MLX-converted checkpoint holds `1 + w`
  (mlx-lm adds 1 at conversion; the signal mlx-lm itself uses is a conv1d stored [C, K, 1]);
- an HF checkpoint (conv1d stored [C, 1, K]) holds zero-centred `w`.
Otherwise (and always as a cross-check) weight statistics: trained or synthetic zero-centred
norm weights sit near 0, `1 + w` weights near 1. Only the small norm vectors are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .names import is_norm, split_key

ZERO_CENTERED = "zero_centered"  # file holds w, multiplier is 1 + w
ONE_PLUS_W = "one_plus_w"  # file holds the multiplier itself
CONVENTIONS = (ZERO_CENTERED, ONE_PLUS_W)

_MAX_NORMS_READ = 16


@dataclass
class NormReport:
    group: str  # "backbone" | "mtp"
    convention: str | None  # ZERO_CENTERED | ONE_PLUS_W | None (no norms found)
    source: str  # "declared" | "statistics" | "caller" | "none"
    evidence: str
    mean: float | None = None  # median over norm tensors of their mean value
    n_tensors: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "group": self.group, "convention": self.convention, "source": self.source,
            "evidence": self.evidence, "mean": self.mean, "n_tensors": self.n_tensors,
            "warnings": list(self.warnings),
        }


def norm_keys(keys, group: str) -> list[str]:
    out = []
    for k in keys:
        s = split_key(k)
        if s and s[0] == group and is_norm(group, s[1]):
            out.append(k)
    return out


def norm_statistics(tensors: Mapping, keys: list[str]) -> float | None:
    """Median over (at most 16) norm tensors of their mean value."""
    means = []
    for k in keys[:_MAX_NORMS_READ]:
        a = np.asarray(tensors[k])
        if a.size:
            means.append(float(np.mean(a.astype(np.float32))))
    return float(np.median(means)) if means else None


def _stat_convention(mean: float) -> str:
    return ONE_PLUS_W if mean >= 0.5 else ZERO_CENTERED


def declared_backbone_convention(tensors: Mapping) -> tuple[str | None, str]:
    """(convention, why) from the conv1d layout / file metadata, as mlx-lm decides it."""
    shapes = _shapes(tensors)
    for k, shp in shapes.items():
        if k.endswith("linear_attn.conv1d.weight") and len(shp) == 3:
            if shp[-1] == 1 and shp[1] != 1:
                return ONE_PLUS_W, f"MLX-converted: {k} stored [C, K, 1] {list(shp)}"
            if shp[1] == 1:
                return ZERO_CENTERED, f"Hugging Face layout: {k} stored [C, 1, K] {list(shp)}"
    meta = getattr(tensors, "headers", None)
    if meta:
        for h in meta.values():
            if str(h.metadata.get("format", "")).lower() == "mlx":
                return ONE_PLUS_W, f"MLX-converted: {h.path.name} metadata format=mlx"
    return None, ""


def _shapes(tensors: Mapping) -> dict[str, tuple[int, ...]]:
    if hasattr(tensors, "shapes"):
        return tensors.shapes()
    return {k: tuple(np.shape(v)) for k, v in tensors.items()}


def detect_norm_convention(tensors: Mapping, group: str = "mtp") -> NormReport:
    """Detect the norm convention of `group` ("mtp" or "backbone") with its evidence."""
    keys = norm_keys(list(tensors.keys()), group)
    if not keys:
        return NormReport(group, None, "none", f"no {group} norm tensors found")
    mean = norm_statistics(tensors, keys)
    n = len(keys)
    declared, why = None, ""
    head = getattr(tensors, "head", None)
    if group == "mtp" and head is not None and head.declared_norm_convention:
        declared, why = head.declared_norm_convention, f"MLX MTP sidecar ({head.path.name}) stores 1 + w"
    elif group == "mtp" and head is not None and head.kind != "embedded":
        declared = None  # a plain sidecar file: statistics decide
    else:
        declared, why = declared_backbone_convention(tensors)
        if declared and group == "mtp":
            why = why + " (head embedded in the same checkpoint)"
    stat_txt = "" if mean is None else f"median norm-weight mean {mean:.3f} over {min(n, _MAX_NORMS_READ)} of {n} tensors"
    if declared:
        rep = NormReport(group, declared, "declared", why + (f"; {stat_txt}" if stat_txt else ""), mean, n)
        if mean is not None and _stat_convention(mean) != declared and abs(mean - 0.5) > 0.25:
            rep.warnings.append(
                f"{group} norm weights look {_stat_convention(mean)} ({stat_txt}) but the format declares "
                f"{declared}: a head shifted twice or never gives ~0% acceptance"
            )
        return rep
    if mean is None:
        return NormReport(group, ZERO_CENTERED, "statistics", "empty norm tensors; assuming zero-centred", None, n)
    conv = _stat_convention(mean)
    rep = NormReport(group, conv, "statistics",
                     f"{stat_txt} (near {'1: 1 + w' if conv == ONE_PLUS_W else '0: zero-centred'})", mean, n)
    if abs(mean - 0.5) < 0.2:
        rep.warnings.append(f"{group} norm convention uncertain: {stat_txt} is between 0 and 1")
    return rep


def resolve_conventions(tensors: Mapping, source_norm_convention="auto") -> dict[str, str]:
    """{"backbone": conv, "mtp": conv} from "auto", a single convention, or a per-group dict."""
    spec = source_norm_convention
    if isinstance(spec, str) and spec != "auto":
        if spec not in CONVENTIONS:
            raise ValueError(f"norm convention must be 'auto' or one of {CONVENTIONS}, got {spec!r}")
        return {"backbone": spec, "mtp": spec}
    spec = {} if spec == "auto" or spec is None else dict(spec)
    out = {}
    for group in ("backbone", "mtp"):
        v = spec.get(group, "auto")
        if v == "auto":
            v = detect_norm_convention(tensors, group).convention or ZERO_CENTERED
        elif v not in CONVENTIONS:
            raise ValueError(f"norm convention for {group} must be 'auto' or one of {CONVENTIONS}, got {v!r}")
        out[group] = v
    return out
