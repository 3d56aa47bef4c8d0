"""A lazy tensor store over a checkpoint folder: safetensors headers only, data on demand.

`open_store(path)` reads the 8-byte header length and the JSON header of every weight file
(a single `model.safetensors`, the shards of `model.safetensors.index.json`, or the bare
`*.safetensors` files of the folder) and of the MTP head when it lives beside the model:

    embedded      `mtp.*` keys inside the model's own files
    sidecar_file  `mtp.safetensors` or `model-mtp.safetensors` next to config.json
    sidecar_dir   `mtp/weights.safetensors` (or any safetensors in `mtp/`)
    mlx_sidecar   a folder whose config.json says `model_type: qwen3_5_mtp`; its keys lack the
                  `mtp.` prefix (the store adds it) and its norms are already `1 + w`

A folder that is itself an MLX MTP sidecar opens as a head-only store (`store.head_only`).

The store is a `Mapping[str, np.ndarray]`: keys are the file's names (sidecar keys carry the
`mtp.` prefix), values are read-only `np.memmap`s at the tensor's data offset (BF16 as
`ml_dtypes.bfloat16`). Nothing is read until a value is asked for.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import MTP_SIDECAR_MODEL_TYPE
from .errors import CheckpointError

# safetensors dtype -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NUMPY_TO_ST = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 512 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SIDECAR_FILES = ("mtp.safetensors", "model-mtp.safetensors")
SIDECAR_DIR = "mtp"

# Head locations (HeadSource.kind)
HEAD_EMBEDDED = "embedded"
HEAD_SIDECAR_FILE = "sidecar_file"
HEAD_SIDECAR_DIR = "sidecar_dir"
HEAD_MLX_SIDECAR = "mlx_sidecar"


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the store's key (sidecar keys with the `mtp.` prefix added)
    file_key: str  # the name as written in the file
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    data_start: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


@dataclass
class SafetensorsHeader:
    path: Path
    metadata: dict
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype, shape, abs start, nbytes)


@dataclass
class HeadSource:
    """Where the MTP head lives."""

    kind: str  # embedded | sidecar_file | sidecar_dir | mlx_sidecar
    path: Path  # the file or folder holding it
    files: list[Path] = field(default_factory=list)
    config: dict | None = None  # the sidecar folder's own config.json, when it has one
    declared_norm_convention: str | None = None  # "one_plus_w" for MLX heads, else None
    ignored: list[str] = field(default_factory=list)  # other head locations not used

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "declared_norm_convention": self.declared_norm_convention,
            "ignored": list(self.ignored),
        }


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse one safetensors header and validate every entry against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size}); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: garbage safetensors header (not JSON); re-download or re-convert this file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: garbage safetensors header (JSON {type(header).__name__}, expected an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    base = 8 + n
    data_len = size - base
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if any(s < 0 for s in shape) or start < 0 or end < start:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {list(shape)} or offsets [{start}, {end}]")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} {dtype}{list(shape)} needs {nbytes} bytes, header gives {end - start}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size} bytes; re-download it"
            )
        tensors[name] = (dtype, shape, base + start, nbytes)
    return SafetensorsHeader(path=path, metadata={str(k): str(v) for k, v in metadata.items()}, tensors=tensors)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None


def _folder_weight_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Weight files of a folder: its index's shards, else model.safetensors, else every *.safetensors."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = _read_json(index, "the shard index")
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object; the index is damaged")
        shards = sorted(set(map(str, wm.values())))
        for s in shards:
            if not (folder / s).is_file():
                raise CheckpointError(f"{index} names shard {s!r}, which is missing from {folder}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(p for p in folder.glob("*.safetensors") if p.name not in exclude)


def _is_mlx_sidecar_dir(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and data.get("model_type") == MTP_SIDECAR_MODEL_TYPE:
        return data
    return None


class TensorStore(Mapping):
    """Read-only Mapping[name -> np.ndarray] over the safetensors files of a checkpoint."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.infos: dict[str, TensorInfo] = {}
        self.headers: dict[Path, SafetensorsHeader] = {}
        self.head: HeadSource | None = None
        self.head_only = False
        self.index_weight_map: dict[str, str] | None = None
        self.unlisted: list[str] = []  # shard tensors the index does not list (ignored, as HF loaders do)

    # ---- Mapping ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        info = self.infos[name]
        return self.load(info)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    # ---- metadata ---------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> str:
        return self.infos[name].dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.infos.items()}

    @property
    def files(self) -> list[Path]:
        return list(self.headers)

    def file_metadata(self, name: str) -> dict:
        return self.headers[self.infos[name].file].metadata

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @staticmethod
    def load(info: TensorInfo) -> np.ndarray:
        dt = info.np_dtype
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=dt)
        try:
            return np.memmap(info.file, dtype=dt, mode="r", offset=info.data_start, shape=info.shape)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot map tensor {info.file_key!r}: {e}") from None

    # ---- building ---------------------------------------------------------------------
    def _add_file(self, path: Path, prefix: str = "", only_missing_prefix: bool = False,
                  only: set[str] | None = None) -> list[str]:
        header = read_safetensors_header(path)
        self.headers[path] = header
        added = []
        for key, (dtype, shape, start, nbytes) in header.tensors.items():
            if only is not None and key not in only:
                self.unlisted.append(key)
                continue
            name = key
            if prefix and not (only_missing_prefix and key.startswith(prefix)):
                name = prefix + key
            if name in self.infos:
                other = self.infos[name].file
                raise CheckpointError(f"tensor {name!r} appears twice: in {other.name} and in {path.name}")
            self.infos[name] = TensorInfo(name, key, dtype, shape, path, start, nbytes)
            added.append(name)
        return added


def _has_mtp(names) -> bool:
    return any(n.startswith(("mtp.", "model.mtp.", "language_model.mtp.", "model.language_model.mtp.")) for n in names)


def open_store(path: str | Path) -> TensorStore:
    """Open the checkpoint folder `path` lazily (headers only). Raises CheckpointError."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_file():
        raise CheckpointError(f"{root} is a file; pass the checkpoint folder that holds config.json")
    store = TensorStore(root)

    sidecar_cfg = _is_mlx_sidecar_dir(root)
    if sidecar_cfg is not None:  # the folder IS an MLX MTP head
        files = _folder_weight_files(root)
        if not files:
            raise CheckpointError(f"{root}: MLX MTP sidecar folder holds no *.safetensors file")
        for f in files:
            store._add_file(f, prefix="mtp.", only_missing_prefix=True)
        store.head_only = True
        store.head = HeadSource(HEAD_MLX_SIDECAR, root, files, sidecar_cfg, "one_plus_w")
        return store

    index = root / INDEX_NAME
    files = _folder_weight_files(root, exclude=SIDECAR_FILES)
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors weights (and no {INDEX_NAME}) in this folder")
    # the index is authoritative: a shard's tensors it does not list are not part of this checkpoint
    # (as for HF loaders; a graft links the base's shards and leaves the base's own mtp.* out)
    listed: dict[Path, set[str]] | None = None
    if index.is_file():
        listed = {}
        for k, shard in _read_json(index, "the shard index")["weight_map"].items():
            listed.setdefault(root / str(shard), set()).add(str(k))
    for f in files:
        store._add_file(f, only=None if listed is None else listed.get(f, set()))
    if index.is_file():
        wm = _read_json(index, "the shard index")["weight_map"]
        store.index_weight_map = {str(k): str(v) for k, v in wm.items()}
        for k, shard in store.index_weight_map.items():
            info = store.infos.get(k)
            if info is None or info.file.name != Path(shard).name:
                raise CheckpointError(f"{index} maps tensor {k!r} to {shard}, but that shard does not hold it")

    # where is the MTP head?
    candidates: list[HeadSource] = []
    for name in SIDECAR_FILES:
        p = root / name
        if p.is_file() and p not in store.headers:
            candidates.append(HeadSource(HEAD_SIDECAR_FILE, p, [p]))
    d = root / SIDECAR_DIR
    if d.is_dir():
        cfg = _is_mlx_sidecar_dir(d)
        if cfg is not None:
            fs = _folder_weight_files(d)
            if fs:
                candidates.append(HeadSource(HEAD_MLX_SIDECAR, d, fs, cfg, "one_plus_w"))
        else:
            fs = _folder_weight_files(d)
            if fs:
                candidates.append(HeadSource(HEAD_SIDECAR_DIR, d, fs))
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != SIDECAR_DIR):
        cfg = _is_mlx_sidecar_dir(sub)
        if cfg is not None:
            fs = _folder_weight_files(sub)
            if fs:
                candidates.append(HeadSource(HEAD_MLX_SIDECAR, sub, fs, cfg, "one_plus_w"))

    if _has_mtp(store.infos):
        mtp_files = sorted({i.file for i in store.infos.values() if _has_mtp([i.name])})
        store.head = HeadSource(HEAD_EMBEDDED, root, mtp_files, ignored=[str(c.path) for c in candidates])
    elif candidates:
        chosen = candidates[0]
        chosen.ignored = [str(c.path) for c in candidates[1:]]
        for f in chosen.files:
            store._add_file(f, prefix="mtp.", only_missing_prefix=True)
        store.head = chosen
    return store


def save_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write numpy arrays (bf16 as ml_dtypes.bfloat16 included) to one safetensors file."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        st = NUMPY_TO_ST.get(a.dtype)
        if st is None:
            raise ValueError(f"cannot write tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((8 - len(blob) % 8) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
