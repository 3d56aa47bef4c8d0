"""Shared helpers for the torch-backend tests (no tests here).

Tiny synthetic checkpoints written by mtplx.checkpoint.synthetic (real key names, HF layout),
loaded by our loader and, for parity, by transformers' own classes from the same files.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

from mtplx.checkpoint.store import open_store
from mtplx.checkpoint.synthetic import preset_config, write_synthetic_checkpoint

torch.set_num_threads(1)

_TMP = Path(tempfile.mkdtemp(prefix="mtplx_torch_tests_"))

# our name -> (preset, transformers class name, layout)
KINDS = {
    "dense": ("qwen3.5-0.8b", "Qwen3_5ForCausalLM", "hf"),
    "dense_untied": ("qwen3.5-9b", "Qwen3_5ForCausalLM", "hf"),
    "moe": ("qwen3.5-35b-a3b", "Qwen3_5MoeForCausalLM", "hf_fused"),
    "next": ("qwen3-next-80b-a3b", "Qwen3NextForCausalLM", "hf_fused"),
}


@functools.lru_cache(maxsize=None)
def checkpoint(kind: str, seed: int = 0, router_near_ties: float | None = None, layout: str | None = None,
               dtype: str = "float32"):
    preset, _, default_layout = KINDS[kind]
    layout = layout or default_layout
    name = f"{kind}-{seed}-{router_near_ties}-{layout}-{dtype}"
    return write_synthetic_checkpoint(_TMP / name, preset, layout=layout, seed=seed,
                                      router_near_ties=router_near_ties, dtype=dtype)


@functools.lru_cache(maxsize=None)
def our_model(kind: str, dtype=torch.float32, seed: int = 0, router_near_ties: float | None = None,
              layout: str | None = None, kernel: str = "torch"):
    from mtplx.backends.torch.loader import load_torch_model

    ck = checkpoint(kind, seed, router_near_ties, layout)
    return load_torch_model(ck.path, dtype=dtype, progress=False, kernel=kernel)


def fused_available() -> bool:
    """The compiled whole-step kernel (fused.py; the default where the CPU has AVX-512 or AVX2)."""
    from mtplx.backends.torch.kernels import get_fused

    return rowmm_available() and hasattr(get_fused(), "Step")


def rowmm_available() -> bool:
    """The compiled kernel (the default exact-path kernel where the CPU has AVX-512 or AVX2: built
    on first use, so the suite builds it once per machine)."""
    from mtplx.backends.torch.kernels import get_rowmm

    return get_rowmm() is not None


KERNEL_PARAMS = ["torch", "rowmm"]


def hf_model(kind: str, seed: int = 0):
    """transformers' model on the same files (fp32, eager attention)."""
    import transformers

    preset, cls_name, _ = KINDS[kind]
    ck = checkpoint(kind, seed)
    raw = preset_config(preset)
    text = dict(raw.get("text_config", raw))
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{k: v for k, v in text.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    store = open_store(ck.path)
    sd = {}
    for key in store.keys():
        if key.startswith(("mtp.", "model.visual.")):
            continue
        k = key.replace("model.language_model.", "model.")
        a = np.asarray(store[key])
        sd[k] = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32)))
    if cfg.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if m != "lm_head.weight"], missing
    return model


def prompt(n: int, vocab: int = 512, seed: int = 0) -> list[int]:
    g = np.random.default_rng(seed)
    return [int(x) for x in g.integers(3, vocab, n)]
