"""The prefix cache's disk tier: blocks as safetensors files that outlive the process.

    DIR/manifest.json              {"format": "mtplx-prefix-cache", "version": 1, "identity": {...}}
    DIR/blocks/<key hex>.safetensors   the payload + "__tokens__" (int32 [B]); metadata key, parent,
                                       identity hash

The identity says which computation produced the blocks (config, a fingerprint of the weight
files, backend, dtype, device, framework version, threads, head hidden, block size, load
options): a folder made for another one is refused at start, a block file from another one (or a
corrupt, truncated one) is skipped with a warning and removed. Never pickle. Writes go through a
background thread (blocks are immutable) to a temp file renamed into place; the folder is kept
under its byte budget by removing the least recently used files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable

from .cache import Block

log = logging.getLogger("mtplx.prefix")

FORMAT = "mtplx-prefix-cache"
VERSION = 1
TOKENS = "__tokens__"


class ForeignCacheError(ValueError):
    """The cache folder belongs to another model or configuration."""


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(folder: Path | None) -> str:
    """A fingerprint of a checkpoint's weight files: names, sizes, safetensors headers and 16
    sampled 64 KiB windows of each file (reading a 60 GB checkpoint in full would take a minute)."""
    if folder is None:
        return "none"
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            h.update(head)
            if len(head) == 8:
                h.update(fh.read(min(int.from_bytes(head, "little"), 1 << 24)))
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()


class DiskTier:
    def __init__(self, folder: str | Path, identity: dict, block_size: int, max_bytes: int,
                 save_payload: Callable[[Path, dict, dict, list], None],
                 load_payload: Callable[[Path], tuple[dict, dict]]):
        self.folder = Path(folder).expanduser()
        self.identity = dict(identity)
        self.id_hash = identity_hash(self.identity)
        self.block_size = block_size
        self.max_bytes = max_bytes
        self._save_payload, self._load_payload = save_payload, load_payload
        self.blocks_dir = self.folder / "blocks"
        self._open_manifest()
        self._sizes: dict[Path, int] = {}
        for f in self.blocks_dir.glob("*.safetensors"):
            self._sizes[f] = f.stat().st_size
        self.bytes = sum(self._sizes.values())
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=4096)
        self._pending: set[bytes] = set()
        self._writer = threading.Thread(target=self._write_loop, name="mtplx-prefix-disk", daemon=True)
        self._writer.start()

    # -- setup
    def _open_manifest(self) -> None:
        man = self.folder / "manifest.json"
        try:
            self.blocks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the prefix cache folder {self.folder}: {e}") from None
        if man.exists():
            try:
                data = json.loads(man.read_text())
            except (OSError, ValueError) as e:
                raise ForeignCacheError(f"{man} is not a readable mtplx prefix cache manifest ({e}); "
                                        f"delete the folder or choose another --cache-dir") from None
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ForeignCacheError(f"{self.folder} is not an mtplx prefix cache (format {data.get('format')!r}, "
                                        f"version {data.get('version')!r}); choose another --cache-dir")
            theirs = data.get("identity", {})
            if identity_hash(theirs) != self.id_hash:
                diff = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
                raise ForeignCacheError(
                    f"{self.folder} holds the prefix cache of another model or setup (differs in: "
                    f"{', '.join(diff)}); its blocks would not reproduce this model's output. Use another "
                    f"--cache-dir per model, or delete the folder to start over")
        else:
            tmp = man.with_suffix(".tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "identity": self.identity}, indent=1))
            os.replace(tmp, man)

    def _path(self, key: bytes) -> Path:
        return self.blocks_dir / f"{key.hex()}.safetensors"

    # -- reads (engine thread)
    def load(self, key: bytes, nbytes: Callable[[dict], int]) -> Block | None:
        path = self._path(key)
        if key in self._pending or not path.exists():
            return None
        try:
            payload, meta = self._load_payload(path)
            tokens = payload.pop(TOKENS)
            if meta.get("identity") != self.id_hash or meta.get("key") != key.hex():
                raise ValueError("written by another model or for another key")
            toks = tuple(int(t) for t in tokens.tolist())
            if len(toks) != self.block_size:
                raise ValueError(f"{len(toks)} tokens, the cache's blocks hold {self.block_size}")
            parent = bytes.fromhex(meta["parent"]) if meta.get("parent") else None
        except Exception as e:  # noqa: BLE001 - any unreadable file: skip it, say so, drop it
            log.warning("prefix cache: skipping %s (%s: %s); removing it", path.name, type(e).__name__, e)
            self._unlink(path)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return Block(key, parent, toks, payload, int(nbytes(payload)))

    # -- writes (background thread)
    def save(self, blk: Block) -> None:
        if self._path(blk.key).exists() or blk.key in self._pending:
            return
        self._pending.add(blk.key)
        try:
            self._queue.put_nowait(blk)
        except queue.Full:
            self._pending.discard(blk.key)
            log.warning("prefix cache: disk writer is behind; block not written")

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued block is on disk (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._write(item)
            except Exception as e:  # noqa: BLE001 - a full disk must not stop the server
                log.warning("prefix cache: could not write a block to %s (%s)", self.folder, e)
            finally:
                self._pending.discard(item.key)

    def _write(self, blk: Block) -> None:
        path = self._path(blk.key)
        tmp = self.folder / "tmp" / path.name
        tmp.parent.mkdir(exist_ok=True)
        meta = {"key": blk.key.hex(), "parent": blk.parent.hex() if blk.parent else "", "identity": self.id_hash}
        self._save_payload(tmp, dict(blk.payload), meta, list(blk.tokens))
        os.replace(tmp, path)
        size = path.stat().st_size
        with self._lock:
            self._sizes[path] = size
            self.bytes += size
        self._trim()

    def _trim(self) -> None:
        with self._lock:
            if self.bytes <= self.max_bytes:
                return
            by_age = sorted(self._sizes, key=lambda f: f.stat().st_mtime if f.exists() else 0)
        for f in by_age:
            if self.bytes <= self.max_bytes:
                break
            self._unlink(f)

    def _unlink(self, path: Path) -> None:
        with self._lock:
            self.bytes -= self._sizes.pop(path, 0)
        try:
            path.unlink()
        except OSError:
            pass


__all__ = ["DiskTier", "ForeignCacheError", "weights_fingerprint", "identity_hash"]
