"""Text corpora for `mtplx forge`: a folder or file of text, or the CPython standard library.

Documents are split deterministically into train and held-out by a hash of their name, so the
held-out text is never trained on and every run with the same corpus sees the same split.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst", ".json", ".toml", ".yaml", ".yml", ".c", ".h",
                 ".js", ".ts", ".rs", ".go", ".java", ".sh", ".html", ".css")
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", ".git", "node_modules"}
MAX_DOC_BYTES = 400_000


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def n_docs(self) -> tuple[int, int]:
        return len(self.train), len(self.heldout)


def _stable(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


def _read_docs(root: Path) -> list[tuple[str, str]]:
    if root.is_file():
        text = root.read_text(encoding="utf-8", errors="replace")
        docs = [d for d in text.split("<|endoftext|>") if d.strip()]
        return [(f"{root.name}#{i}", d) for i, d in enumerate(docs)]
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix not in TEXT_SUFFIXES or SKIP_PARTS & set(p.parts):
            continue
        try:
            if p.stat().st_size == 0 or p.stat().st_size > MAX_DOC_BYTES:
                continue
            out.append((p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def load_corpus(spec: str, heldout_fraction: float = 0.05) -> Corpus:
    """spec: a file (documents separated by <|endoftext|>), a folder (text/code files), or
    "stdlib" (the .py files of this interpreter's standard library)."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [(n, t) for n, t in _read_docs(root) if n.endswith(".py")]
    else:
        root = Path(spec).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"corpus {spec!r}: no such file or folder (pass a path or 'stdlib')")
        docs = _read_docs(root)
    if len(docs) == 0:
        raise ValueError(f"corpus {spec!r} holds no readable text files ({', '.join(TEXT_SUFFIXES[:6])}, ...)")
    c = Corpus(source=spec)
    cut = int(heldout_fraction * 10_000)
    for name, text in docs:
        (c.heldout if _stable(name) % 10_000 < cut else c.train).append(text)
    if not c.heldout:  # tiny corpora: hold out the last document, or split the only one
        if len(c.train) > 1:
            c.heldout.append(c.train.pop())
        else:
            t = c.train[0]
            k = int(len(t) * (1 - max(heldout_fraction, 0.1)))
            c.train, c.heldout = [t[:k]], [t[k:]]
    return c


def tokenize_docs(tokenizer, docs: list[str], eos_id: int | None) -> np.ndarray:
    """One token stream (int64), documents joined by eos (when known)."""
    ids: list[int] = []
    for i in range(0, len(docs), 128):
        for enc in tokenizer.encode_batch(docs[i:i + 128]):
            ids.extend(enc.ids)
            if eos_id is not None:
                ids.append(eos_id)
    return np.asarray(ids, dtype=np.int64)


def sample_windows(stream: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """n random windows [n, length] (seeded); a short stream is tiled."""
    if stream.size < length + 1:
        reps = (length + 1) // max(stream.size, 1) + 1
        stream = np.tile(stream, reps)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.size - length, size=n)
    return np.stack([stream[s:s + length] for s in starts])


def even_windows(stream: np.ndarray, n: int, length: int) -> np.ndarray:
    """n evenly spaced windows [n, length] (deterministic, for evaluation)."""
    if stream.size < length + 1:
        reps = (length + 1) // max(stream.size, 1) + 1
        stream = np.tile(stream, reps)
    starts = np.linspace(0, stream.size - length - 1, n).astype(np.int64)
    return np.stack([stream[s:s + length] for s in starts])
