"""Shared settings of the default-model recipe: paths, seeds, the held-out split.

Every step of the recipe reads its constants from here, so one edit changes the whole run.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

SEED = 20260501
RECIPE_DIR = Path(__file__).resolve().parent
REPO_ROOT = RECIPE_DIR.parent.parent
# Intermediate products (corpus, tokenizer, trunk checkpoints, logs); git-ignored.
WORK_DIR = Path(os.environ.get("MTPLX_RECIPE_DIR", REPO_ROOT / "runs" / "default_model"))
ASSET_DIR = REPO_ROOT / "mtplx" / "assets" / "default_model"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
# v2: the tool and thinking markers as single added tokens (ids 4096..4101), and the model's
# embedding rows padded to a multiple of 8, as the released checkpoints pad theirs.
MARKER_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
MODEL_VOCAB_V2 = 4104
MAX_POSITIONS = 65536

# Held-out stdlib modules: never trained on (neither the module nor its test files).
# Evaluation prompts and teacher-forced acceptance use these files only.
HELD_OUT_MODULES = (
    "json", "csv", "textwrap", "fractions", "shlex", "heapq", "bisect", "statistics",
    "difflib", "configparser", "calendar", "getopt", "gettext", "netrc", "plistlib",
    "sched", "tabnanny", "uu", "zipapp", "colorsys", "graphlib", "string",
)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib/Icons", "lib2to3/tests/data"}
MAX_FILE_BYTES = 400_000  # a few generated tables are huge and teach nothing


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docs_dirs() -> list[Path]:
    """Python documentation sources when the machine has them (python3.X-doc packages ship
    reST under html/_sources). pydoc_data/topics.py (the docs' topic text) is in the stdlib
    walk anyway."""
    data = Path(sysconfig.get_paths()["data"])
    out = []
    for base in (data / "share" / "doc", Path("/usr/share/doc")):
        for d in sorted(base.glob("python3.*")) if base.is_dir() else []:
            src = d / "html" / "_sources"
            if src.is_dir():
                out.append(src)
    return out


def module_of(rel: str) -> str:
    """Top-level module a stdlib file belongs to: 'json/decoder.py' -> 'json',
    'test/test_json/test_fail.py' -> 'json', 'test/test_csv.py' -> 'csv'."""
    parts = rel.split("/")
    if parts[0] == "test" and len(parts) > 1:
        name = parts[1]
        if name.startswith("test_"):
            name = name[len("test_"):]
        return name.removesuffix(".py")
    return parts[0].removesuffix(".py")


def is_held_out(rel: str) -> bool:
    return module_of(rel) in HELD_OUT_MODULES


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
