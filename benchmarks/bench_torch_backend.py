"""Torch backend benchmark (not a test): our exact decode/verify path vs transformers' eager
forward on the same random weights, in one process, side by side.

    python benchmarks/bench_torch_backend.py [--threads 2] [--models dense,moe] [--dtypes bf16,fp32]
                                             [--prompt 128] [--reps 3] [--json out.json]

Per (model, dtype): depth-0 decode ms/token and the weight bandwidth it implies (GB/s = bytes
of weights read per token / time), verify cost ratio r(k) = time(verify k tokens) / time(decode 1)
for k = 2..5, prefill tok/s, and the same numbers for transformers (its cached forward; its
multi-token forward runs the chunked GatedDeltaNet). Also checks that our verify rows are
bit-identical to decode on these shapes ("exact").

Models: "dense" = Qwen3.5-0.8B shapes (24 layers, H 1024, vocab 248320, tied); "moe" = a small
Qwen3.5-MoE (H 1024, 8 layers, 64 experts top-4, I 512, shared 512, vocab 32000).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import numpy as np
import torch

QWEN35_08B = {
    "model_type": "qwen3_5_text", "hidden_size": 1024, "num_hidden_layers": 24, "vocab_size": 248320,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 3584,
    "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "hidden_act": "silu", "attn_output_gate": True, "mtp_num_hidden_layers": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10]},
}
SMALL_MOE = {
    **QWEN35_08B, "model_type": "qwen3_5_moe_text", "num_hidden_layers": 8, "vocab_size": 32000,
    "num_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "tie_word_embeddings": False,
}
MODELS = {"dense": ("Qwen3_5ForCausalLM", QWEN35_08B), "moe": ("Qwen3_5MoeForCausalLM", SMALL_MOE)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def hf_and_ours(kind: str, dtype: torch.dtype):
    import transformers

    from mtplx.backends.torch.loader import load_torch_model
    from mtplx.checkpoint.config import ModelConfig

    cls_name, text = MODELS[kind]
    cls = getattr(transformers, cls_name)
    hcfg = cls.config_class(**{k: v for k, v in text.items() if k != "model_type"})
    hcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device("cpu"):
        hf = cls(hcfg).to(dtype).eval()
    with torch.no_grad():  # HF init leaves norms at 0 and A_log sane; give norms some spread
        for n, p in hf.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.normal_(0.0, 0.05)

    def to_np(t: torch.Tensor) -> np.ndarray:
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    raw = {k: to_np(v) for k, v in hf.state_dict().items()}
    cfg = ModelConfig.from_dict(dict(text))
    ours = load_torch_model(raw, dtype=dtype, config=cfg, progress=False, source_norm_convention="zero_centered")
    return hf, ours, cfg


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: everything except the embedding table (one row),
    plus the lm_head (= the embedding when tied); for MoE only top-k of the experts."""
    cfg = model.cfg
    total = 0
    for n, p in model.named_parameters():
        if n.startswith("mtp."):
            continue
        b = p.numel() * p.element_size()
        if n == "embed":
            b = b if model.lm_head is None else 0
        elif n.endswith("mlp.gate_up") and p.ndim == 3 or n.endswith("mlp.down") and p.ndim == 3:
            b = b * cfg.num_experts_per_tok // cfg.num_experts
        total += b
    return total


def timeit(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_ours(model, prompt: list[int], reps: int) -> dict:
    from mtplx.backends.torch import model as M

    out: dict = {}
    s = model.new_session()
    t = time.perf_counter()
    s.prefill(prompt)
    out["prefill_tok_s"] = len(prompt) / (time.perf_counter() - t)
    s.last = 11
    toks = [11, 12, 13, 14, 15, 16]

    def verify(k):
        def f():
            s.verify(toks[1:k])
            s.cache.keep(0)  # roll back (nothing kept)
            s._verified = None
        return f

    verify(1)()  # warm-up
    out["decode_ms"] = timeit(verify(1), reps + 2) * 1e3
    for k in (2, 3, 4, 5):
        out[f"r{k}"] = timeit(verify(k), reps) * 1e3 / out["decode_ms"]
    # exactness on these shapes: verify 5 rows vs 5 decodes
    rows = s.verify(toks[1:5])
    s.cache.keep(0)
    s._verified = None
    ok = True
    for i in range(5):
        s.last = toks[i]
        r = s.verify([])[0]
        s.commit(0, toks[i + 1] if i + 1 < 5 else 0)
        ok &= bool(torch.equal(r, rows[i]))
    out["exact"] = ok
    out["row_invariance_failures"] = len(M.check_row_invariance(model, 6))
    return out


def bench_hf(hf, prompt: list[int], reps: int) -> dict:
    from transformers import DynamicCache

    out: dict = {}
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cache = DynamicCache(config=hf.config)
        t = time.perf_counter()
        hf(ids, cache=cache, use_cache=True)
        out["prefill_tok_s"] = len(prompt) / (time.perf_counter() - t)

        def verify(k):
            snap = copy.deepcopy(cache)
            x = torch.tensor([[11, 12, 13, 14, 15][:k]])

            def f():
                c = copy.deepcopy(snap) if k > 1 else snap
                hf(x, cache=c, use_cache=True)
                if k == 1:
                    c.crop(len(prompt))
            return f

        def run(k, n):
            snap = copy.deepcopy(cache)
            x = torch.tensor([[11, 12, 13, 14, 15][:k]])
            ts = []
            for _ in range(n):
                c = copy.deepcopy(snap)
                t = time.perf_counter()
                hf(x, cache=c, use_cache=True)
                ts.append(time.perf_counter() - t)
            return min(ts)

        run(1, 1)
        out["decode_ms"] = run(1, reps + 2) * 1e3
        for k in (2, 3, 4, 5):
            out[f"r{k}"] = run(k, reps) * 1e3 / out["decode_ms"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--kernels", default="torch,rowmm", help="exact-path kernels to measure")
    ap.add_argument("--json", default="bench_torch_backend.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    results = {"threads": a.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "prompt_tokens": a.prompt, "runs": []}
    rows = []
    for kind in a.models.split(","):
        for dn in a.dtypes.split(","):
            dtype = DTYPES[dn]
            t0 = time.time()
            hf, ours, cfg = hf_and_ours(kind, dtype)
            prompt = [int(x) for x in rng.integers(3, cfg.vocab_size, a.prompt)]
            wb = weight_bytes_per_token(ours)
            run = {"model": kind, "dtype": dn, "weight_bytes_per_token": wb}
            for kern in a.kernels.split(","):
                ours.set_kernel(kern)
                with torch.inference_mode():
                    o = bench_ours(ours, prompt, a.reps)
                o["GB_s"] = wb / (o["decode_ms"] / 1e3) / 1e9
                run[f"ours-{kern}"] = o
            if not a.no_hf:
                h = bench_hf(hf, prompt, a.reps)
                h["GB_s"] = wb / (h["decode_ms"] / 1e3) / 1e9
                run["transformers"] = h
            results["runs"].append(run)
            for who in [f"ours-{k}" for k in a.kernels.split(",")] + ["transformers"]:
                if who in run:
                    r = run[who]
                    rows.append((kind, dn, who, r["decode_ms"], r["GB_s"], r["r2"], r["r3"], r["r4"], r["r5"],
                                 r["prefill_tok_s"], r.get("exact", "")))
                    print("  " + json.dumps({"impl": who, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                              for k, v in r.items()}}), flush=True)
            del hf, ours
            print(f"[{kind} {dn}] done in {time.time() - t0:.0f}s", flush=True)
    hdr = ("model", "dtype", "impl", "decode ms", "GB/s", "r2", "r3", "r4", "r5", "prefill tok/s", "exact")
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join([r[0], r[1], r[2], f"{r[3]:.1f}", f"{r[4]:.2f}", *(f"{x:.2f}" for x in r[5:9]),
                          f"{r[9]:.0f}", str(r[10])]))
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
