"""`mtplx forge`: train (or refresh) a checkpoint's MTP head by self-distillation.

The backbone is frozen. On windows of a text corpus the target's own distributions are the
teacher: the head's depth-k draft from start t learns KL(softmax(L[t+k]) || head), with depth
k > 1 drafted from the head's own recursive outputs exactly as at inference (see
head_train.chain_forward). Target hiddens of a fixed pool of windows are computed once (the
trunk never changes), so each step costs only the head. Before and after training it reports
greedy teacher-forced acceptance by depth on held-out windows, then writes the head in the
checkpoint's own layout (write.py). With --steps the run is deterministic for a seed; with a
time budget the learning-rate schedule follows the clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .corpus import Corpus, even_windows, load_corpus, sample_windows, tokenize_docs


@dataclass
class ForgeOptions:
    steps: int | None = None  # step budget (deterministic); default 300 when no budget is given
    minutes: float | None = None  # time budget (the LR schedule follows the clock)
    depth: int = 3  # drafting depth trained (and evaluated)
    seed: int = 0
    batch: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    depth_decay: float = 0.7  # loss weight of depth k = depth_decay ** (k - 1)
    pool_windows: int = 256  # training windows whose target hiddens are precomputed
    eval_windows: int = 24
    init: str = "auto"  # auto (existing head if any, else trunk) | existing | random | trunk
    layout: str = "auto"  # where a new head goes: auto | embedded | sidecar_file
    heldout_fraction: float = 0.05
    threads: int | None = None
    progress: bool = True
    eval_every: int = 0  # 0 = before and after only
    chain_tokens: str = "text"  # token fed to depth k > 1 in training: "text" | "draft" (head_train)


@dataclass
class ForgeReport:
    model: str
    out: str
    corpus: str
    options: dict
    init: str
    train_tokens: int
    heldout_tokens: int
    steps: int
    seconds: float
    trunk_seconds: float
    final_loss: float
    final_kl_by_depth: list[float]
    before: dict
    after: dict
    written: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _init_head(head, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0)  # canonical norms are multipliers (file w = 0)


def _init_from_trunk(model) -> None:
    """Start the head's layer as a copy of the target's last full-attention layer (same shapes:
    attention + the same MLP kind), fc as the mean of its two inputs: the head starts as "one more
    target layer on top of h[t]" instead of from noise."""
    import torch

    src = next((l for l in reversed(model.layers) if l.is_attn), None)
    head = model.mtp
    if src is None:
        return
    with torch.no_grad():
        for dst_l in head.layers:
            sd = src.state_dict()
            dst_sd = dst_l.state_dict()
            if all(k in sd and sd[k].shape == v.shape for k, v in dst_sd.items()):
                dst_l.load_state_dict({k: sd[k].to(v.dtype) for k, v in dst_sd.items()})
        H = head.fc.shape[0]
        eye = torch.eye(H, dtype=head.fc.dtype)
        head.fc.copy_(0.5 * torch.cat([eye, eye], dim=1) + 0.01 * torch.randn(head.fc.shape, generator=torch.Generator().manual_seed(0)))


def _ensure_head(model, cfg, init: str, seed: int) -> str:
    import torch

    from mtplx.backends.torch.mtp import MtpHead

    have = model.mtp is not None
    if init == "existing" and not have:
        raise ValueError("--init existing: this checkpoint has no MTP head to refresh (use --init random)")
    if have and init in ("auto", "existing"):
        return "existing"
    if init == "auto":
        init = "trunk"
    n_layers = len(model.mtp.layers) if have else (int(cfg.num_mtp_layers) if cfg.num_mtp_layers else 1)
    head = MtpHead(cfg, n_layers).to(dtype=torch.float32)
    for m in head.modules():  # norms stay fp32 multipliers, everything else the model dtype
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.data.to(torch.float32))
    _init_head(head, seed)
    head.attach(model)
    model.mtp = head
    if init == "trunk":
        _init_from_trunk(model)
    return init


def _tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    p = model_dir / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json: forge tokenizes the corpus with the "
                                f"checkpoint's own tokenizer")
    tok = Tokenizer.from_file(str(p))
    return tok


def _eos_id(tok, cfg) -> int | None:
    for t in ("<|endoftext|>", "</s>", "<|im_end|>"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return cfg.eos_token_id[0] if cfg.eos_token_id else None


def _trunk_hidden(model, windows: np.ndarray, batch: int):
    """Frozen target over windows [N, T] -> (head input hidden, teacher hidden (post)) fp32."""
    import torch

    ins, posts = [], []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = torch.from_numpy(windows[i:i + batch])
            post, pre, _ = model.forward_hidden(ids, logits="none")
            posts.append(post.float())
            ins.append((pre if getattr(model, "mtp_hidden", "post") == "pre" else post).float())
    post = torch.cat(posts)
    return (torch.cat(ins) if getattr(model, "mtp_hidden", "post") == "pre" else post), post


def evaluate(model, ids, hid_in, hid_post, depth: int, batch: int = 8) -> dict:
    import torch

    from .head_train import acceptance_counts, acceptance_rates, chain_forward

    acc, elig = [0] * depth, [0] * depth
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch]
            teacher = model.logits(hid_post[i:i + batch])
            lg = chain_forward(model, hid_in[i:i + batch], x, depth, tokens="draft")
            a, e = acceptance_counts(lg, teacher, x)
            acc = [p + q for p, q in zip(acc, a)]
            elig = [p + q for p, q in zip(elig, e)]
    return acceptance_rates(acc, elig)


def forge(model_dir, corpus: str | Corpus = "stdlib", out_dir=None, opts: ForgeOptions | None = None,
          on_event=None) -> ForgeReport:
    """Train the MTP head of the checkpoint at `model_dir` on `corpus` and write it to `out_dir`
    (default: in place). `on_event(dict)` receives progress events when given."""
    import torch

    opts = opts or ForgeOptions()
    if opts.steps is None and opts.minutes is None:
        opts.steps = 300
    if opts.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {opts.depth}")
    prev_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _forge(model_dir, corpus, out_dir, opts, on_event)
    finally:
        torch.set_num_threads(prev_threads)


def _forge(model_dir, corpus, out_dir, opts: ForgeOptions, on_event) -> ForgeReport:
    import torch

    from mtplx.backends.torch.loader import load_torch_model
    from mtplx.checkpoint.config import load_config

    from .head_train import chain_forward, distill_loss
    from .write import write_head

    model_dir = Path(model_dir)
    emit = on_event or (lambda e: None)
    t_start = time.time()
    torch.manual_seed(opts.seed)
    cfg = load_config(model_dir)
    model = load_torch_model(model_dir, dtype=torch.float32, include_mtp=True)
    init = _ensure_head(model, cfg, opts.init, opts.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    head_params = list(model.mtp.parameters())
    for p in head_params:
        p.requires_grad_(True)

    corp = corpus if isinstance(corpus, Corpus) else load_corpus(corpus, opts.heldout_fraction)
    tok = _tokenizer(model_dir)
    eos = _eos_id(tok, cfg)
    train_stream = tokenize_docs(tok, corp.train, eos)
    held_stream = tokenize_docs(tok, corp.heldout, eos)
    if train_stream.max(initial=0) >= cfg.vocab_size:
        raise ValueError(f"the tokenizer yields id {int(train_stream.max())} >= vocab_size {cfg.vocab_size}")
    T = opts.seq_len
    pool = sample_windows(train_stream, opts.pool_windows, T, opts.seed)
    evw = even_windows(held_stream, opts.eval_windows, T)
    emit({"event": "trunk", "windows": int(pool.shape[0] + evw.shape[0]), "seq_len": T})
    t0 = time.time()
    pool_ids, ev_ids = torch.from_numpy(pool), torch.from_numpy(evw)
    pool_in, pool_post = _trunk_hidden(model, pool, opts.batch)
    ev_in, ev_post = _trunk_hidden(model, evw, opts.batch)
    trunk_s = time.time() - t0

    model.mtp.train()
    before = evaluate(model, ev_ids, ev_in, ev_post, opts.depth)
    emit({"event": "before", **before})

    opt = torch.optim.AdamW(head_params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
    weights = [opts.depth_decay ** k for k in range(opts.depth)]
    rng = np.random.default_rng(opts.seed + 1)
    order = np.concatenate([rng.permutation(pool.shape[0]) for _ in range(4)])
    oi = 0
    budget_s = opts.minutes * 60 if opts.minutes else None
    total_steps = opts.steps
    t_train = time.time()
    history, step, loss_v, per = [], 0, float("nan"), []
    while True:
        elapsed = time.time() - t_train
        if total_steps is not None and step >= total_steps:
            break
        if budget_s is not None and elapsed >= budget_s:
            break
        frac = step / total_steps if total_steps is not None else elapsed / budget_s
        lr = opts.lr * min(1.0, (step + 1) / opts.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for gph in opt.param_groups:
            gph["lr"] = lr
        if oi + opts.batch > order.size:
            order = np.concatenate([order, rng.permutation(pool.shape[0])])
        idx = torch.from_numpy(order[oi:oi + opts.batch])
        oi += opts.batch
        ids = pool_ids[idx]
        with torch.no_grad():
            teacher = model.logits(pool_post[idx])
        logits = chain_forward(model, pool_in[idx], ids, opts.depth, tokens=opts.chain_tokens)
        loss, per = distill_loss(logits, teacher, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head_params, 1.0)
        opt.step()
        loss_v = float(loss.detach())
        step += 1
        rec = {"event": "step", "step": step, "loss": round(loss_v, 4), "kl": [round(x, 4) for x in per],
               "lr": lr, "elapsed_s": round(time.time() - t_train, 2),
               "frac": min(1.0, step / total_steps if total_steps else (time.time() - t_train) / budget_s)}
        if opts.eval_every and step % opts.eval_every == 0:
            rec["acceptance"] = evaluate(model, ev_ids, ev_in, ev_post, opts.depth)["by_depth"]
        if step % 10 == 0 or step == 1:
            history.append({k: v for k, v in rec.items() if k != "event"})
        emit(rec)
    model.mtp.eval()
    after = evaluate(model, ev_ids, ev_in, ev_post, opts.depth)
    emit({"event": "after", **after})
    for p in head_params:
        p.requires_grad_(False)
    written = write_head(model, model_dir, out_dir, layout=opts.layout)
    emit({"event": "written", **written})
    return ForgeReport(
        model=str(model_dir), out=str(Path(out_dir) if out_dir else model_dir), corpus=corp.source,
        options=asdict(opts), init=init, train_tokens=int(train_stream.size), heldout_tokens=int(held_stream.size),
        steps=step, seconds=round(time.time() - t_start, 2), trunk_seconds=round(trunk_s, 2),
        final_loss=round(loss_v, 4), final_kl_by_depth=[round(x, 4) for x in per], before=before, after=after,
        written=written, history=history)
