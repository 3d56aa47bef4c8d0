"""Array backends and how one is chosen.

    default_backend()      -> "mlx" on Apple Silicon when mlx + mlx-lm import, else "torch"
    require_backend(name)  -> name, or BackendUnavailable saying what to install
    available_backends()   -> the installed ones
"""

from __future__ import annotations

import importlib.util
import platform

BACKENDS = ("torch", "mlx")
_NEEDS = {"torch": ("torch",), "mlx": ("mlx", "mlx_lm")}
_INSTALL = {"torch": "pip install 'mtplx[torch]'", "mlx": "pip install 'mtplx[mlx]'"}


class BackendUnavailable(ImportError, ValueError):
    """The chosen backend's packages are not installed (a ValueError too, so the CLI prints it as a user error)."""


class RankLost(RuntimeError):
    """A tensor-parallel rank went away: the model is stopped (the CLI reports it in one line)."""


def _missing(name: str) -> list[str]:
    out = []
    for mod in _NEEDS[name]:
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):
            out.append(mod)
    return out


def is_available(name: str) -> bool:
    return name in _NEEDS and not _missing(name)


def available_backends() -> list[str]:
    return [b for b in BACKENDS if is_available(b)]


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def default_backend() -> str:
    """mlx on Apple Silicon when mlx and mlx-lm are installed; torch otherwise."""
    if is_apple_silicon() and is_available("mlx"):
        return "mlx"
    return "torch"


def require_backend(name: str) -> str:
    """Check that `name` is a known, installed backend; raise a message saying what to do."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    missing = _missing(name)
    if missing:
        others = [b for b in available_backends() if b != name]
        alt = f", or use --backend {others[0]}" if others else ""
        verb = "is" if len(missing) == 1 else "are"
        raise BackendUnavailable(f"the {name} backend needs {' and '.join(missing)}, which {verb} not installed: "
                                 f"{_INSTALL[name]}{alt}")
    return name


__all__ = ["BACKENDS", "BackendUnavailable", "RankLost", "available_backends", "default_backend", "is_available",
           "is_apple_silicon", "require_backend"]
