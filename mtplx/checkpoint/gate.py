"""The tensor gate: expected / found / missing / extra / wrong-shape, per group.

    res = run_gate(shapes, cfg, head_quantization=..., n_mtp_layers=...)
    res.groups["mtp"].ok, res.groups["mtp"].missing, ...

`shapes` is {file key: shape} (a TensorStore's `.shapes()` or any dict). Expected sets come
from layout.expected_group: derived from the config and the detected storage format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig, QuantizationConfig
from .layout import GroupFormat, detect_format, expected_group, optional_keys
from .names import split_key


@dataclass
class GroupGate:
    group: str
    format: GroupFormat
    expected: int
    found: int
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, expected, found)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.wrong_shape)

    def to_dict(self, limit: int | None = None) -> dict:
        def cut(xs):
            return list(xs if limit is None else xs[:limit])
        return {
            "ok": self.ok, "expected": self.expected, "found": self.found,
            "missing_count": len(self.missing), "extra_count": len(self.extra),
            "wrong_shape_count": len(self.wrong_shape),
            "missing": cut(self.missing), "extra": cut(self.extra),
            "wrong_shape": [{"name": n, "expected": list(e), "found": list(f)} for n, e, f in cut(self.wrong_shape)],
            "layout": self.format.experts, "prefix": self.format.prefix,
            "quantized": self.format.quantized,
        }


@dataclass
class GateResult:
    groups: dict[str, GroupGate]
    ignored: list[str]  # keys outside the text model (vision tower, ...)


def gate_group(shapes: dict[str, tuple], cfg: ModelConfig, group: str, fmt: GroupFormat) -> GroupGate:
    exp = expected_group(cfg, group, fmt)
    opt = optional_keys(cfg, group, fmt)
    present = {}
    for k, shp in shapes.items():
        s = split_key(k)
        if s and s[0] == group:
            present[k] = tuple(shp)
    missing = sorted(k for k in exp if k not in present)
    extra = sorted(k for k in present if k not in exp and k not in opt)
    wrong = sorted((k, exp[k], present[k]) for k in exp if k in present and tuple(exp[k]) != present[k])
    found = sum(1 for k in exp if k in present)
    return GroupGate(group, fmt, len(exp), found, missing, extra, wrong)


def detect_group_format(shapes: dict[str, tuple], cfg: ModelConfig, group: str, *,
                        quantization: QuantizationConfig | None = None, quant_path_strip: str = "",
                        n_mtp_layers: int | None = None) -> GroupFormat:
    fmt = detect_format(list(shapes), cfg, group, quantization=quantization, n_mtp_layers=n_mtp_layers)
    fmt.quant_path_strip = quant_path_strip
    for k, shp in shapes.items():
        if k.endswith("linear_attn.conv1d.weight") and len(shp) == 3:
            s = split_key(k)
            if s and s[0] == group:
                fmt.conv = "mlx" if (shp[-1] == 1 and shp[1] != 1) else "hf"
                break
    else:
        if group == "backbone" and fmt.prefix.startswith("language_model."):
            fmt.conv = "mlx"
    return fmt


def run_gate(shapes: dict[str, tuple], cfg: ModelConfig, *, head_quantization: QuantizationConfig | None = None,
             head_quant_path_strip: str = "", n_mtp_layers: int | None = None,
             head_cfg: ModelConfig | None = None, include_backbone: bool = True) -> GateResult:
    """Gate both groups. head_cfg: the config the head is checked against (default cfg)."""
    groups = {}
    if include_backbone:
        bfmt = detect_group_format(shapes, cfg, "backbone", quantization=cfg.quantization)
        groups["backbone"] = gate_group(shapes, cfg, "backbone", bfmt)
    hq = head_quantization if head_quantization is not None else cfg.quantization
    hc = head_cfg or cfg
    mfmt = detect_group_format(shapes, hc, "mtp", quantization=hq, quant_path_strip=head_quant_path_strip,
                               n_mtp_layers=n_mtp_layers)
    groups["mtp"] = gate_group(shapes, hc, "mtp", mfmt)
    ignored = sorted(k for k in shapes if split_key(k) is None)
    return GateResult(groups, ignored)
