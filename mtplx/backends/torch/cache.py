"""Per-session caches with rollback.

- `AttnCache`: K/V buffers [nkv, capacity, hd] grown by doubling up to max_len; rollback is
  just a shorter logical length (the owner's `length`), later writes overwrite.
- `GdnCache`: conv state (last K-1 pre-conv rows, model dtype) and recurrent state S [nv, dk, dv]
  fp32. The exact path records the pre-conv rows it consumed and S after every position it fed
  (the recurrence builds a fresh S per token, so keeping them costs no copy); `keep(m)` restores
  the state after the m-th fed position without re-running anything.
- `ModelCache`: one of the above per target layer, plus the committed length.
"""

from __future__ import annotations

import torch


class AttnCache:
    def __init__(self, nkv: int, hd: int, dtype: torch.dtype, device, max_len: int):
        self.nkv, self.hd, self.dtype, self.device, self.max_len = nkv, hd, dtype, device, max_len
        self.k = torch.empty(nkv, 0, hd, dtype=dtype, device=device)
        self.v = torch.empty(nkv, 0, hd, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        if n > self.max_len:
            raise ValueError(f"attention cache needs {n} positions, the context holds {self.max_len}")
        # a multiple of the exact path's key tile (model.ATTN_TILE), which reads up to the end of
        # the tile holding position n-1; zero-filled: masked slots must hold finite values
        cap = max(n, 2 * self.capacity, 256)
        cap = min(cap, self.max_len)
        cap += (-cap) % 64
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(self.nkv, cap, self.hd, dtype=self.dtype, device=self.device)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def write(self, pos0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, nkv, hd] for positions pos0..pos0+T-1."""
        T = k.shape[0]
        self.ensure(pos0 + T)
        self.k[:, pos0:pos0 + T] = k.transpose(0, 1)
        self.v[:, pos0:pos0 + T] = v.transpose(0, 1)

    def view(self, upto: int):  # -> K, V [nkv, upto, hd] (views)
        return self.k[:, :upto], self.v[:, :upto]

    def ensure_len(self, n: int) -> None:
        self.ensure(n)

    def keep(self, m: int) -> None:  # attention KV needs nothing: the owner's length moves
        pass


class GdnCache:
    def __init__(self, C: int, K: int, nv: int, dk: int, dv: int, dtype, device):
        self.conv = torch.zeros(K - 1, C, dtype=dtype, device=device)  # [K-1, C]
        self.state = torch.zeros(nv, dk, dv, dtype=torch.float32, device=device)  # [nv, dk, dv]
        self._rows: torch.Tensor | None = None  # [T, C] pre-conv rows fed by the last step
        self._states: list[torch.Tensor] = []  # S after each of those T positions
        self._convs: torch.Tensor | None = None  # or the conv window after each, [T, K-1, C]

    def record(self, rows: torch.Tensor | None, states, convs: torch.Tensor | None = None) -> None:
        """The last step's pre-conv rows (or, from the fused kernel, its conv windows) and states."""
        self._rows, self._states, self._convs = rows, states, convs

    def ensure_len(self, n: int) -> None:
        pass

    def keep(self, m: int) -> None:
        """Keep the first m positions of the last step (0 <= m <= T); drop the rest."""
        if self._rows is None and self._convs is None:
            if m:
                raise RuntimeError("GdnCache.keep: nothing was recorded")
            return
        if m > 0:
            K1 = self.conv.shape[0]
            if self._convs is not None:
                self.conv = self._convs[m - 1]
            elif m >= K1:  # the kept rows alone fill the conv window
                self.conv = self._rows[m - K1:m].to(self.conv.dtype).clone()
            else:
                self.conv = torch.cat([self.conv, self._rows[:m].to(self.conv.dtype)])[-K1:].clone()
            self.state = self._states[m - 1]
        self._rows, self._states, self._convs = None, [], None


class ModelCache:
    """All target-layer caches of one session. `length` = committed positions."""

    def __init__(self, model, max_len: int):
        cfg = model.cfg
        self.max_len = max_len
        self.length = 0
        self.pending = 0  # positions fed by the last exact step, not yet kept or dropped
        dt, dev = model.dtype, model.device
        self.layers = []
        for layer in model.layers:
            if layer.is_attn:
                self.layers.append(AttnCache(cfg.num_key_value_heads, cfg.head_dim, dt, dev, max_len))
            else:
                self.layers.append(GdnCache(cfg.linear_conv_dim, cfg.linear_conv_kernel_dim,
                                            cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                            cfg.linear_value_head_dim, dt, dev))

    def ensure(self, n: int) -> None:
        if n > self.max_len:
            raise ValueError(f"context limit: {n} positions requested, this session holds {self.max_len}")
        for c in self.layers:
            c.ensure_len(n)

    def keep(self, m: int) -> None:
        """After an exact step of T positions: keep the first m (0..T), roll back the rest."""
        for c in self.layers:
            c.keep(m)
        self.length += m
