"""Remembered best depths from `mtplx tune`, per (model, backend, dtype, device, threads).

Stored as JSON in $MTPLX_CACHE_DIR (default ~/.cache/mtplx)/tune.json. A depth is recorded only
when it beat plain decoding in the tuning run; otherwise depth 0 is recorded, so an MTP head that
does not pay off on this machine is not used by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_file() -> Path:
    base = os.environ.get("MTPLX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mtplx")
    return Path(base) / "tune.json"


def tune_key(model) -> str:
    threads = ""
    if model.backend == "torch":
        import torch

        threads = f"/threads={torch.get_num_threads()}"
    path = str(Path(model.path).resolve()) if model.path else "?"
    return f"{path}|{model.backend}|{model.dtype}|{model.device}{threads}"


def _read() -> dict:
    f = cache_file()
    try:
        data = json.loads(f.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def tuned_depth(model) -> int | None:
    entry = _read().get(tune_key(model))
    if isinstance(entry, dict) and isinstance(entry.get("depth"), int):
        return entry["depth"]
    return None


def save_tuned(model, depth: int, summary: dict) -> Path:
    data = _read()
    data[tune_key(model)] = {"depth": int(depth), **summary}
    f = cache_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(f)
    return f
