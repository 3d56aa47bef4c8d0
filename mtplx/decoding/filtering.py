"""Logit filtering, the numpy reference (every backend's native filtering is tested against it).

    filter_probs(logits [..., V], params) -> probs [..., V]   float64, rows sum to 1

Order: temperature -> top_k -> top_p -> min_p -> renormalise (the order of transformers'
logits warpers). Temperature 0 (greedy) gives the one-hot row of the argmax (first index on
ties). The kept sets are defined by value thresholds, so they do not depend on how a sort
breaks ties and every backend keeps exactly the same tokens:
- top_k: keep z >= the k-th largest scaled logit (ties with the k-th are kept).
- top_p: on the top_k-renormalised probs sorted descending, keep the shortest prefix whose
  mass reaches top_p; every token whose prob is >= the smallest kept prob is kept.
- min_p: keep p >= min_p * max(p).
"""

from __future__ import annotations

import numpy as np

from .params import SamplingParams


def softmax(z: np.ndarray) -> np.ndarray:  # [..., V] -> [..., V]
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def filter_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """[..., V] logits -> [..., V] float64 probabilities after temperature/top-k/top-p/min-p."""
    x = np.asarray(logits, dtype=np.float64)
    V = x.shape[-1]
    if params.greedy:
        out = np.zeros_like(x)
        np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
        return out
    z = x / params.temperature
    if 0 < params.top_k < V:
        kth = -np.partition(-z, params.top_k - 1, axis=-1)[..., params.top_k - 1 : params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = softmax(z)
    if params.top_p < 1.0:
        s = -np.sort(-p, axis=-1)  # descending
        before = np.cumsum(s, axis=-1) - s  # mass strictly before each sorted entry
        n_keep = np.maximum((before < params.top_p).sum(axis=-1, keepdims=True), 1)
        thresh = np.take_along_axis(s, n_keep - 1, axis=-1)
        p = np.where(p >= thresh, p, 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
    if params.min_p > 0.0:
        p = np.where(p >= params.min_p * p.max(axis=-1, keepdims=True), p, 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
    return p
