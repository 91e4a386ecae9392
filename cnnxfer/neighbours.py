"""Nearest neighbours by cosine similarity, blockwise: memory flat in the number of images.

The audit's duplicates, leakage and outliers all come from `nearest`: the k most similar keys of
every query, computed `block` queries x `block` keys at a time (a 2048 x 2048 float32 block is
16 MiB), the running top k merged after each block, so a folder of any size needs
O(block^2 + N k) memory, never the N x N matrix.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 2048


def normalise(features) -> torch.Tensor:
    """Rows scaled to unit length (float32): their dot products are cosine similarities."""
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: features may be read-only (Parquet)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, *, same: bool = False,
            block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (Nq, k'), of the k' = min(k, available) most similar keys of
    every query, most similar first. Rows must be normalised. `same`: queries and keys are the same
    images, so an image is not its own neighbour."""
    k = min(k, len(keys) - (1 if same else 0))
    if k <= 0 or not len(queries):
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    sims, idx = [], []
    for q0 in range(0, len(queries), block):
        q = queries[q0:q0 + block]
        best_s = torch.full((len(q), k), -float("inf"))
        best_i = torch.full((len(q), k), -1, dtype=torch.int64)
        for k0 in range(0, len(keys), block):
            s = q @ keys[k0:k0 + block].T
            if same:
                rows = torch.arange(len(q))
                cols = rows + q0 - k0
                inside = (cols >= 0) & (cols < s.shape[1])
                s[rows[inside], cols[inside]] = -float("inf")
            cand_i = torch.arange(k0, k0 + s.shape[1]).expand(len(q), -1)
            merged_s, pick = torch.cat([best_s, s], 1).topk(k, dim=1)
            best_i = torch.cat([best_i, cand_i], 1).gather(1, pick)
            best_s = merged_s
        sims.append(best_s.numpy())
        idx.append(best_i.numpy())
    return np.concatenate(sims), np.concatenate(idx)


def pairs_above(sims: np.ndarray, idx: np.ndarray, threshold: float, same: bool = True) -> list[tuple[int, int, float]]:
    """(i, j, similarity) for every neighbour pair at or above `threshold`, each unordered pair once
    when queries and keys are the same images (i < j)."""
    out = {}
    for i, j in zip(*np.nonzero(sims >= threshold)):
        a, b = int(i), int(idx[i, j])
        key = (min(a, b), max(a, b)) if same else (a, b)
        out[key] = max(out.get(key, -1.0), float(sims[i, j]))
    return [(a, b, s) for (a, b), s in sorted(out.items())]
