"""Step 3: train the trunk (the Qwen3.5-MoE backbone) from scratch with transformers' own
Qwen3_5MoeForCausalLM, the reference implementation (correct, with backward; no
flash-linear-attention needed: its torch fallbacks run on CPU).

    python recipes/default_model/trunk.py tokenize      # corpus -> uint16 token arrays
    python recipes/default_model/trunk.py bench         # tokens/s of a few train steps
    python recipes/default_model/trunk.py train         # the real run (step budget + time cap)

Writes runs/default_model/trunk/{config.json,model.safetensors} (HF layout, `model.*` keys,
fused 3-D experts as in the bf16 Qwen3.5 backbones) every --save-every steps and at the end,
plus train_log.jsonl. The MTP head is trained afterwards by `mtplx forge` (head.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# The architecture of the default model: the real Qwen3.5-MoE layout, scaled down.
# 12 layers (3 gated full-attention, 9 GatedDeltaNet), 8 experts top-2 + a shared expert,
# tied embeddings, one MTP layer. Deep relative to the 1-layer head: drafting is cheap.
# Sized for the budget: ~6.8M parameters (~14 MB bf16 with the head), ~2.5M active per token,
# ~600 training tokens/s on one contended CPU core.
MODEL_CONFIG = dict(
    vocab_size=common.VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=12,
    full_attention_interval=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    partial_rotary_factor=0.25,
    rope_theta=10_000_000.0,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    initializer_range=0.02,
    router_aux_loss_coef=0.001,
    mtp_num_hidden_layers=1,
    mtp_use_dedicated_embeddings=False,
    bos_token_id=None,
    eos_token_id=[2, 0],  # <|im_end|>, <|endoftext|>
    pad_token_id=0,
)


def hf_config(overrides: dict | None = None):
    from transformers import Qwen3_5MoeTextConfig

    d = dict(MODEL_CONFIG)
    d.update(overrides or {})
    interval = d.pop("full_attention_interval")
    d["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                        for i in range(d["num_hidden_layers"])]
    partial = d.pop("partial_rotary_factor")
    theta = d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": theta,
                            "partial_rotary_factor": partial}
    extra = {k: d.pop(k) for k in ("mtp_num_hidden_layers", "mtp_use_dedicated_embeddings")}
    cfg = Qwen3_5MoeTextConfig(**d)
    for k, v in extra.items():
        setattr(cfg, k, v)
    cfg.full_attention_interval = interval
    return cfg


def tokenize(work: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    out = {}
    for split in ("train", "heldout"):
        text = (work / f"{split}.txt").read_text(encoding="utf-8")
        docs = text.split(common.EOS)
        ids: list[int] = []
        eos = tok.token_to_id(common.EOS)
        for i in range(0, len(docs), 256):
            for enc in tok.encode_batch(docs[i:i + 256]):
                if enc.ids:
                    ids.extend(enc.ids)
                    ids.append(eos)
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(work / f"{split}_ids.npy", arr)
        out[split] = int(arr.size)
    return out


def batches(ids: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    n = ids.size - seq - 1
    while True:
        starts = rng.integers(0, n, size=batch)
        x = np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int64)
        yield x


def make_model(seed: int, overrides: dict | None = None):
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    import fast_gdn

    fast_gdn.install()
    torch.manual_seed(seed)
    cfg = hf_config(overrides)
    model = Qwen3_5MoeForCausalLM(cfg)
    model.float()
    return model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def save_trunk(model, out: Path, step: int, meta: dict) -> None:
    """HF layout, bf16, `model.*` keys, tied lm_head left out; config gains the MTP fields."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    # A_log and the gated-norm weight stay fp32, as in the released bf16 checkpoints
    for k in list(sd):
        if k.endswith(".A_log"):
            sd[k] = model.state_dict()[k].detach().float().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["mtp_num_hidden_layers"] = 1
    cfg["mtp_use_dedicated_embeddings"] = False
    cfg["full_attention_interval"] = MODEL_CONFIG["full_attention_interval"]
    cfg["torch_dtype"] = "bfloat16"
    cfg.pop("dtype", None)
    cfg["architectures"] = ["Qwen3_5MoeForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "trunk_meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))


def evaluate(model, ids: np.ndarray, seq: int, n_windows: int = 16) -> float:
    """Mean next-token loss over fixed, evenly spaced held-out windows."""
    import torch

    model.eval()
    starts = np.linspace(0, ids.size - seq - 2, n_windows).astype(np.int64)
    x = torch.from_numpy(np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int64))
    with torch.no_grad():
        losses = []
        for i in range(0, n_windows, 8):
            out = model(input_ids=x[i:i + 8, :-1], use_cache=False)
            logits = out.logits.float()
            losses.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[i:i + 8, 1:].reshape(-1)).item())
    model.train()
    return float(np.mean(losses))


def train_step(model, opt, x, lr: float, weights=None, loop_tokens=None, loop_weight: float = 1.0):
    """One optimizer step on token rows x [B, T+1]; weights [B, T] scale each target's loss.
    loop_tokens [B, T] (-1 where none): per target, the token a loop would repeat there but the
    text does not; its probability gets an unlikelihood loss -log(1 - p), weighted loop_weight.
    Returns the (weighted) mean cross-entropy and the router aux loss."""
    import torch

    for g in opt.param_groups:
        g["lr"] = lr
    inp, tgt = x[:, :-1], x[:, 1:]
    out = model(input_ids=inp, use_cache=False, output_router_logits=True)
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                           reduction="none" if weights is not None else "mean")
    if weights is not None:
        w = weights.reshape(-1)
        ce = (ce * w).sum() / w.sum()
    loss = ce + model.config.router_aux_loss_coef * out.aux_loss
    if loop_tokens is not None and bool((loop_tokens >= 0).any()):
        at = loop_tokens >= 0                                            # [B, T]
        logp = torch.log_softmax(logits[at], dim=-1)                     # [n, V]
        p_loop = logp.gather(1, loop_tokens[at][:, None]).squeeze(1).exp()
        unlikely = -torch.log1p(-p_loop.clamp(max=1 - 1e-5))
        loss = loss + loop_weight * unlikely.sum() / at.numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(ce.item()), float(out.aux_loss.item())


def make_opt(model, lr: float, wd: float = 0.1):
    import torch

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n or "A_log" in n or "dt_bias" in n else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def cmd_bench(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    ids = np.load(args.work / "train_ids.npy")
    model = make_model(args.seed)
    n = param_count(model)
    opt = make_opt(model, args.lr)
    it = batches(ids, args.batch, args.seq, args.seed)
    times = []
    for step in range(args.bench_steps):
        x = torch.from_numpy(next(it))
        t0 = time.perf_counter()
        ce, aux = train_step(model, opt, x, args.lr)
        times.append(time.perf_counter() - t0)
        print(f"step {step} ce {ce:.3f} aux {aux:.3f} {times[-1]:.2f}s", flush=True)
    dt = float(np.median(times[1:])) if len(times) > 1 else times[0]
    print(json.dumps({"params": n, "bf16_mb": round(n * 2 / 2**20, 2), "s_per_step": round(dt, 3),
                      "tokens_per_s": round(args.batch * args.seq / dt)}))


def cmd_train(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    ids = np.load(work / "train_ids.npy")
    held = np.load(work / "heldout_ids.npy")
    model = make_model(args.seed)
    opt = make_opt(model, args.lr)
    it = batches(ids, args.batch, args.seq, args.seed)
    out = work / "trunk"
    log = (work / "train_log.jsonl").open("w")
    t_start = time.time()
    meta = {"seed": args.seed, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "planned_steps": args.steps, "minutes": args.minutes, "params": param_count(model)}
    step = 0
    ema = None
    budget = args.minutes * 60 if args.minutes else None
    for step in range(args.steps):
        x = torch.from_numpy(next(it))
        if budget is not None:  # time budget: the cosine follows the clock (not bit-reproducible)
            frac = (time.time() - t_start) / budget
            if frac >= 1.0:
                step -= 1
                break
            lr = lr_at(int(frac * 10_000), 10_000, args.lr, 300)  # 3% warmup
        else:
            lr = lr_at(step, args.steps, args.lr, args.warmup)
        ce, aux = train_step(model, opt, x, lr)
        ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        elapsed = time.time() - t_start
        if step % 10 == 0:
            rec = {"step": step, "ce": round(ce, 4), "ema": round(ema, 4), "aux": round(aux, 4),
                   "lr": round(lr, 6), "elapsed_s": round(elapsed, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if (step + 1) % args.save_every == 0:
            hl = evaluate(model, held, args.seq)
            log.write(json.dumps({"step": step, "heldout_ce": round(hl, 4)}) + "\n")
            log.flush()
            save_trunk(model, out, step + 1, {**meta, "heldout_ce": hl, "train_ema": ema,
                                              "elapsed_s": elapsed})
        if args.max_minutes and elapsed > args.max_minutes * 60:
            print(f"time cap reached at step {step + 1}", flush=True)
            break
    hl = evaluate(model, held, args.seq)
    elapsed = time.time() - t_start
    save_trunk(model, out, step + 1, {**meta, "heldout_ce": hl, "train_ema": ema, "elapsed_s": elapsed})
    log.write(json.dumps({"step": step + 1, "final": True, "heldout_ce": round(hl, 4),
                          "train_ema": round(ema, 4), "elapsed_s": round(elapsed, 1)}) + "\n")
    log.close()
    print(json.dumps({"steps": step + 1, "heldout_ce": hl, "train_ema": ema, "elapsed_s": elapsed}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["tokenize", "bench", "train"])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--seed", type=int, default=common.SEED)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--max-minutes", type=float, default=None, help="safety cap on wall clock (step schedule)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget: the LR schedule follows the clock and training stops at the budget")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a shared 2-core machine (no spin-waiting)")
    ap.add_argument("--bench-steps", type=int, default=4)
    args = ap.parse_args()
    if args.cmd == "tokenize":
        print(json.dumps(tokenize(args.work)))
    elif args.cmd == "bench":
        cmd_bench(args)
    else:
        cmd_train(args)


if __name__ == "__main__":
    main()
