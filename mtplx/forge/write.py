"""Write a trained MTP head back into a checkpoint, in that checkpoint's own layout.

Where: the head goes where the checkpoint already keeps one (embedded in the model's shards,
a sidecar file such as `mtp.safetensors`, an `mtp/` folder, or an MLX sidecar folder). A
checkpoint without a head gets it embedded when it is one `model.safetensors` file, else as a
`mtp.safetensors` sidecar. How: the same key names, expert storage (per-expert, fused 3-D or
MLX switch_mlp), norm convention (zero-centred in HF files, 1 + w in MLX files), dtype and
quantization as the head it replaces (or as the backbone, for a new head); the encoding is the
checkpoint layer's own (`mtplx.checkpoint.synthetic`), so what we write is what it reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from mtplx.checkpoint.config import ModelConfig, load_config
from mtplx.checkpoint.encode import Encoder, encode_group, is_norm_name
from mtplx.checkpoint.layout import (EXPERTS_FUSED, EXPERTS_SWITCH, detect_format)
from mtplx.checkpoint.names import split_key
from mtplx.checkpoint.norms import ZERO_CENTERED, resolve_conventions
from mtplx.checkpoint.store import (DTYPES, HEAD_EMBEDDED, HEAD_MLX_SIDECAR, HEAD_SIDECAR_FILE,
                                    INDEX_NAME, open_store, save_safetensors)


def head_canonical(model) -> dict[str, np.ndarray]:
    """The torch head's tensors under canonical names (fp32; norms as multipliers)."""
    head = model.mtp
    t = lambda p: p.detach().float().cpu().numpy()  # noqa: E731
    out = {"mtp.fc.weight": t(head.fc), "mtp.pre_fc_norm_embedding.weight": t(head.norm_emb),
           "mtp.pre_fc_norm_hidden.weight": t(head.norm_hid), "mtp.norm.weight": t(head.norm)}
    for j, layer in enumerate(head.layers):
        p = f"mtp.layers.{j}."
        a = layer.mixer
        q, kv = a.q_rows, a.kv_rows
        qkv = t(a.qkv)
        out.update({p + "input_layernorm.weight": t(layer.input_norm),
                    p + "post_attention_layernorm.weight": t(layer.post_norm),
                    p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
                    p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": t(a.o_proj),
                    p + "self_attn.q_norm.weight": t(a.q_norm), p + "self_attn.k_norm.weight": t(a.k_norm)})
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            I, sI = mlp.I, mlp.shared.I
            gu, sgu = t(mlp.gate_up), t(mlp.shared.gate_up)
            out.update({p + "mlp.gate.weight": t(mlp.router),
                        p + "mlp.experts.gate_proj": gu[:, :I], p + "mlp.experts.up_proj": gu[:, I:],
                        p + "mlp.experts.down_proj": t(mlp.down),
                        p + "mlp.shared_expert.gate_proj.weight": sgu[:sI],
                        p + "mlp.shared_expert.up_proj.weight": sgu[sI:],
                        p + "mlp.shared_expert.down_proj.weight": t(mlp.shared.down),
                        p + "mlp.shared_expert_gate.weight": t(mlp.shared_gate)})
        else:
            I = mlp.I
            gu = t(mlp.gate_up)
            out.update({p + "mlp.gate_proj.weight": gu[:I], p + "mlp.up_proj.weight": gu[I:],
                        p + "mlp.down_proj.weight": t(mlp.down)})
    return out


def _zero_centred_source(canon: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The synthetic encoder takes norm weights as zero-centred w (it writes w or 1 + w)."""

    return {k: (v - np.float32(1.0) if is_norm_name(k) else v) for k, v in canon.items()}


def _backbone_dtype(store) -> np.dtype:
    for name in store:
        s = split_key(name)
        if s and s[0] == "backbone" and s[1] == "embed_tokens.weight":
            return DTYPES.get(store.dtype(name), np.dtype(np.float32))
    return np.dtype(np.float32)


def _head_dtype(store, keys) -> np.dtype:
    for k in keys:
        d = store.dtype(k)
        if d in ("BF16", "F16", "F32") and not k.endswith(("norm.weight", ".scales", ".biases")):
            return DTYPES[d]
    return _backbone_dtype(store)


def plan_target(model_dir: Path, cfg: ModelConfig, layout: str = "auto") -> dict:
    """Where and how the head will be written (without writing)."""
    store = open_store(model_dir)
    mtp_keys = [k for k in store if (s := split_key(k)) and s[0] == "mtp"]
    head = store.head
    plan: dict = {"dtype": None, "kind": None, "file": None, "prefix": "mtp.", "experts": None,
                  "norm": ZERO_CENTERED, "quant": None, "conv": "hf", "replaces": sorted(mtp_keys)}
    if head is not None and mtp_keys and layout in ("auto", head.kind):
        fmt = detect_format(mtp_keys, cfg, "mtp", quantization=cfg.quantization)
        plan["kind"] = head.kind
        plan["experts"] = fmt.experts
        conv = head.declared_norm_convention or resolve_conventions(store)["mtp"]
        plan["norm"] = conv
        plan["dtype"] = _head_dtype(store, mtp_keys)
        if fmt.quantization is not None:
            q = fmt.quantization
            if head.config and isinstance(head.config.get("quantization"), dict):
                q = head.config["quantization"]
                plan["quant"] = (int(q.get("bits", 4)), int(q.get("group_size", 64)))
            else:
                plan["quant"] = (q.bits, q.group_size)
        info = store.info(mtp_keys[0])
        plan["file"] = str(info.file)
        plan["prefix"] = "mtp." if info.file_key.startswith("mtp.") or head.kind == HEAD_EMBEDDED else ""
        if head.kind == HEAD_EMBEDDED:
            s = split_key(info.file_key)
            plan["prefix"] = info.file_key[: len(info.file_key) - len(s[1])]
        if head.kind == HEAD_MLX_SIDECAR:
            plan["conv"] = "mlx"
    else:
        single = (model_dir / "model.safetensors").is_file() and not (model_dir / INDEX_NAME).is_file()
        kind = layout if layout != "auto" else (HEAD_EMBEDDED if single else HEAD_SIDECAR_FILE)
        if kind not in (HEAD_EMBEDDED, HEAD_SIDECAR_FILE):
            raise ValueError(f"--layout {layout}: a checkpoint without a head can get it 'embedded' or as a "
                             f"'sidecar_file'")
        if kind == HEAD_EMBEDDED and not single:
            raise ValueError("--layout embedded needs a single model.safetensors; this checkpoint is sharded "
                             "(use --layout sidecar_file)")
        plan["kind"] = kind
        plan["experts"] = "per_expert" if cfg.is_moe else "dense"
        plan["norm"] = resolve_conventions(store)["backbone"] if any(
            (s := split_key(k)) and s[0] == "backbone" for k in store) else ZERO_CENTERED
        plan["dtype"] = _backbone_dtype(store)
        plan["file"] = str(model_dir / ("model.safetensors" if kind == HEAD_EMBEDDED else "mtp.safetensors"))
        plan["prefix"] = "mtp."
        if cfg.quantization is not None:
            plan["quant"] = (cfg.quantization.bits, cfg.quantization.group_size)
            plan["experts"] = EXPERTS_SWITCH if cfg.is_moe else "dense"
    return plan


def encode_head(canon: dict[str, np.ndarray], cfg: ModelConfig, plan: dict) -> tuple[dict[str, np.ndarray], dict]:
    """canonical head tensors -> file tensors for the plan (and any quant overrides)."""
    expert_layout = {EXPERTS_SWITCH: "mlx", EXPERTS_FUSED: "hf_fused"}.get(plan["experts"], "hf")
    overrides: dict = {}
    enc = Encoder(cfg, plan["conv"], plan["prefix"], plan["norm"], plan["dtype"], plan["quant"], overrides, "")
    src = _zero_centred_source(canon)
    encode_group(enc, src, sorted(src), "mtp.", "mtp.", expert_layout)
    return enc.file, overrides


def _copy_checkpoint(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name.startswith("."):
            continue
        target = dst / p.name
        if p.is_dir():
            shutil.copytree(p, target, dirs_exist_ok=True)
        else:
            shutil.copy2(p, target)


def _rewrite_file(path: Path, keep: dict[str, np.ndarray], new: dict[str, np.ndarray], metadata: dict) -> None:
    tmp = path.with_name(path.name + ".forge-tmp")
    save_safetensors(tmp, {**keep, **new}, metadata or None)
    os.replace(tmp, path)


def write_head(model, model_dir, out_dir=None, *, layout: str = "auto") -> dict:
    """Write `model.mtp` into a copy of `model_dir` at `out_dir` (or in place when out_dir is None
    or the same folder). Returns a description of what was written."""
    src = Path(model_dir).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else src
    cfg = load_config(src)
    plan = plan_target(src, cfg, layout)
    if out != src:
        _copy_checkpoint(src, out)
    file_tensors, overrides = encode_head(head_canonical(model), cfg, plan)
    target = out / Path(plan["file"]).relative_to(src)
    store = open_store(out)
    old = set(plan["replaces"])
    kind = plan["kind"]
    if kind == HEAD_EMBEDDED:
        # drop the old head from every shard that held it; put the new one in the target file
        files_with_old: dict[Path, list[str]] = {}
        for name in old:
            files_with_old.setdefault(store.info(name).file, []).append(name)
        for f, names in files_with_old.items():
            if f != target:
                keep = {store.info(k).file_key: np.array(store[k]) for k in store
                        if store.info(k).file == f and k not in old}
                _rewrite_file(f, keep, {}, store.headers[f].metadata)
        keep = {store.info(k).file_key: np.array(store[k]) for k in store
                if store.info(k).file == target and k not in old}
        meta = store.headers[target].metadata if target in store.headers else {"format": "pt"}
        _rewrite_file(target, keep, file_tensors, meta)
        index = out / INDEX_NAME
        if index.is_file():
            d = json.loads(index.read_text())
            wm = {k: v for k, v in d["weight_map"].items() if k not in old and not k.startswith(tuple(
                {store.info(n).file_key for n in old}))}
            for k in file_tensors:
                wm[k] = target.name
            d["weight_map"] = wm
            index.write_text(json.dumps(d, indent=1))
    elif kind in (HEAD_SIDECAR_FILE,):
        _rewrite_file(target, {}, file_tensors, {"format": "pt"})
    else:  # sidecar folder (HF or MLX): one weights file replaces the folder's
        folder = target.parent
        for f in folder.glob("*.safetensors"):
            if f != target:
                f.unlink()
        idx = folder / INDEX_NAME
        if idx.is_file():
            idx.unlink()
        _rewrite_file(target, {}, file_tensors, {"format": "mlx" if plan["conv"] == "mlx" else "pt"})
    # the config must declare the head
    cfg_path = out / "config.json"
    raw = json.loads(cfg_path.read_text())
    holder = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    if kind in (HEAD_EMBEDDED, HEAD_SIDECAR_FILE) and cfg.family == "qwen3_5" and not holder.get("mtp_num_hidden_layers"):
        holder["mtp_num_hidden_layers"] = len(model.mtp.layers)
        cfg_path.write_text(json.dumps(raw, indent=2))
    if overrides and kind == HEAD_MLX_SIDECAR:
        scfg = folder / "config.json"
        if scfg.is_file():
            d = json.loads(scfg.read_text())
            q = d.setdefault("quantization", {})
            q.update(overrides)
            scfg.write_text(json.dumps(d, indent=2))
    return {"kind": kind, "path": str(target), "tensors": len(file_tensors), "experts": plan["experts"],
            "norm_convention": plan["norm"], "dtype": str(np.dtype(plan["dtype"])),
            "quantization": plan["quant"], "replaced": len(old)}
