"""The MTP head: predicts x[t+2] from (h[t], x[t+1]) at RoPE position t.

    e  = norm_emb(embed(x[t+1]))                 # mtp.pre_fc_norm_embedding
    hh = norm_hid(h[t])                          # mtp.pre_fc_norm_hidden
    u  = fc(concat([e, hh]))                     # mtp.fc [H, 2H], embedding first
    u  = layer(u, position t, own KV cache)      # mtp.layers.0: full-attention decoder layer
    g  = norm(u)                                 # mtp.norm
    logits = lm_head(g)                          # shared with the target (or tied embedding)

Depth > 1 applies the same layer again with hidden = g (the head's own output after mtp.norm;
with `hidden_source="pre"` the pre-norm u instead), token = the token just drafted, position + 1.
Only `mtp.layers.0` drafts; further MTP layers (none in released Qwen checkpoints) are loaded
but unused.

The head borrows the target's embedding, lm_head and RoPE without registering the target as a
submodule, so `head.state_dict()` / `head.parameters()` hold only the head's own tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtplx.checkpoint.config import FULL_ATTENTION, ModelConfig

from . import fused
from .model import EXACT_ROWMM, FEW_ROWS, PLAIN, DecoderLayer, rms_norm


# Up to this many rows (the draft steps and the verified pairs of one cycle) the head's MLP
# runs the drafting kernels (model.FEW_ROWS); longer runs (the prompt's pairs) the plain ones.
FEW_ROWS_MAX = 16


class MtpHead(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int = 1):
        super().__init__()
        H = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.norm_emb = nn.Parameter(torch.ones(H, dtype=torch.float32))
        self.norm_hid = nn.Parameter(torch.ones(H, dtype=torch.float32))
        self.fc = nn.Parameter(torch.empty(H, 2 * H))
        self.layers = nn.ModuleList(DecoderLayer(cfg, FULL_ATTENTION, cfg.mtp_is_moe) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(H, dtype=torch.float32))
        self.__dict__["_target"] = None
        self.__dict__["_draft_lm"] = None  # Int8Weight copy of the target's lm_head, or None

    def attach(self, target) -> None:
        """Share `target`'s embedding, lm_head and RoPE (not registered as a submodule)."""
        self.__dict__["_target"] = target

    @property
    def target(self):
        if self._target is None:
            raise RuntimeError("MtpHead is not attached to a target model (call head.attach(model))")
        return self._target

    def set_draft_lm_head(self, mode: str) -> str:
        """Precision of the lm_head when drafting: "full" (the target's own matrix) or "int8" (a
        per-row int8 copy: a quarter of the bytes to stream per draft step, where a CPU is
        memory-bound). "auto": int8 on CPU, full elsewhere. Drafts only: verify and every emitted
        token keep the target's exact logits, so this can change acceptance, never the output.
        Returns the mode in use."""
        if mode not in ("auto", "int8", "full"):
            raise ValueError(f"draft_lm_head must be 'auto', 'int8' or 'full', got {mode!r}")
        from .int8 import Int8Weight

        w = self.target.head_weight()
        if mode == "auto":
            mode = "int8" if self.target.device.type == "cpu" else "full"
        if mode == "int8":  # an int8-quantized model (--quantize int8) drafts with its own lm_head
            self.__dict__["_draft_lm"] = w if isinstance(w, Int8Weight) else Int8Weight.from_float(w)
        else:
            self.__dict__["_draft_lm"] = None
        return mode

    @property
    def draft_lm_head(self) -> str:
        return "full" if self._draft_lm is None else "int8"

    def _draft_logits(self, g: torch.Tensor, ops=None) -> torch.Tensor:  # g [n, H] -> [n, V]
        if self._draft_lm is None:
            return self.target.logits(g) if ops is None else self.target.logits(g, ops.lin)
        out = self._draft_lm.linear(g) if ops is None else ops.lin(g, self._draft_lm)
        tp = self.target.tp  # tensor parallel: this rank's vocab slice -> all of it on rank 0
        return out if tp is None else tp.gather_vocab(out, self.target.cfg.vocab_size)

    def _compiled(self, n_rows: int):
        """The compiled kernels (model.EXACT_ROWMM) for a few rows when the target uses them, else
        None. Drafting needs speed, not bits: a draft only proposes, verify decides; every kernel
        there is row-invariant anyway, so a session's drafts do not depend on its batch."""
        if n_rows > FEW_ROWS_MAX or getattr(self.target, "kernel", "torch") == "torch" or EXACT_ROWMM.fused is None:
            return None
        return EXACT_ROWMM

    def _fc_in(self, hidden: torch.Tensor, next_ids: torch.Tensor, ops=None) -> torch.Tensor:
        """hidden [..., H], next_ids [...] -> u [..., H]."""
        norm = rms_norm if ops is None else ops.norm
        e = norm(F.embedding(next_ids, self.target.embed), self.norm_emb, self.eps)
        hh = norm(hidden.to(e.dtype), self.norm_hid, self.eps)
        x = torch.cat([e, hh], dim=-1)
        return F.linear(x, self.fc) if ops is None else ops.lin(x, self.fc)

    def forward_train(self, hidden: torch.Tensor, next_ids: torch.Tensor, return_hidden: bool = False):
        """Teacher-forced head over whole sequences (autograd-safe).
        hidden [B, T, H] = h[0..T-1], next_ids [B, T] = x[1..T] -> logits [B, T, V] for x[2..T+1]
        (and the post-norm head output g [B, T, H] when return_hidden)."""
        u = self._fc_in(hidden, next_ids)
        u = self.layers[0](u, self.target.rope, 0, None)
        g = rms_norm(u, self.norm, self.eps)
        logits = self.target.logits(g)
        return (logits, g) if return_hidden else logits

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return self.forward_train(hidden, next_ids)

    def rows(self, hidden: torch.Tensor, next_ids: torch.Tensor, pos0: int, cache, drafting: bool = False):
        """Inference: pairs (hidden [T, H], next_ids [T]) at head positions pos0..pos0+T-1, with
        the head's KV cache (`AttnCache`) holding positions < pos0. Writes T entries.
        -> (g [T, H] post mtp.norm, u [T, H] pre mtp.norm, logits [T, V]). drafting: logits of the
        last row only ([1, V], the one a draft reads), through the draft lm_head."""
        ops = self._compiled(hidden.shape[0])
        if ops is not None and self.target.kernel == "fused":
            T = hidden.shape[0]
            return fused.head_rows(self, hidden, next_ids, [(pos0, T)], [cache], [T - 1] if drafting else [], drafting)
        if ops is not None:
            u = self.layers[0].step(self._fc_in(hidden, next_ids, ops), self.target.rope, pos0, cache, ops)
            g = ops.norm(u, self.norm, self.eps)
            return g, u, (self._draft_logits(g[-1:], ops) if drafting else self.target.logits(g, ops.lin))
        mlp_ops = FEW_ROWS if hidden.shape[0] <= FEW_ROWS_MAX else PLAIN
        u = self._fc_in(hidden, next_ids)[None]
        u = self.layers[0](u, self.target.rope, pos0, cache, mlp_ops)[0]
        g = rms_norm(u, self.norm, self.eps)
        return g, u, (self._draft_logits(g[-1:]) if drafting else self.target.logits(g))


    def draft_chain(self, hidden: torch.Tensor, next_ids: torch.Tensor, pos0: int, cache, depth: int,
                    use_post: bool) -> list[int] | None:
        """`depth` greedy drafts from the pending pairs in one compiled call (fused kernel), the
        drafts `rows(drafting=True)` and an argmax per step give; None where the head does not
        run on the fused kernel (the caller drafts step by step)."""
        if self._compiled(hidden.shape[0]) is None or self.target.kernel != "fused":
            return None
        return fused.draft_chain(self, hidden, next_ids, pos0, cache, depth, use_post)

    def rows_many(self, hidden: torch.Tensor, next_ids: torch.Tensor, spans, caches):
        """Drafting rows of several sequences in one head forward (greedy drafting, where the
        draft's bits do not decide any token): hidden [N, H], next_ids [N], sequence i's rows at
        head positions spans[i] = (pos0_i, T_i) with its own cache. -> (g [N, H], u [N, H], the
        draft logits of each sequence's last row [n_seq, V])."""
        N = hidden.shape[0]
        last = torch.tensor([sum(T for _, T in spans[:i + 1]) - 1 for i in range(len(spans))], device=hidden.device)
        ops = self._compiled(N)
        if ops is not None and self.target.kernel == "fused":
            return fused.head_rows(self, hidden, next_ids, spans, caches, last.tolist(), True)
        if ops is not None:
            u = self.layers[0].step_many(self._fc_in(hidden, next_ids, ops), self.target.rope, spans, caches, ops)
            g = ops.norm(u, self.norm, self.eps)
            return g, u, self._draft_logits(g[last], ops)
        mlp_ops = FEW_ROWS if N <= FEW_ROWS_MAX else PLAIN
        u = self._fc_in(hidden, next_ids)
        u = self.layers[0].forward_many(u, self.target.rope, spans, caches, mlp_ops)
        g = rms_norm(u, self.norm, self.eps)
        return g, u, self._draft_logits(g[last])


__all__ = ["MtpHead"]
