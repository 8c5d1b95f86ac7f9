"""UMAP of CLIP embeddings: one seeded 2-D layout (umap-learn, cosine metric).

Seeded, so a report is reproducible; umap-learn then runs its optimisation on one thread. Under
``MIN_POINTS`` points there is no neighbourhood to learn: the layout is the first two principal axes
(or the origin), and ``method`` says so.
"""

from __future__ import annotations

import warnings

import numpy as np

MIN_POINTS = 5
NEIGHBOURS = 15


def project(points: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(N, D) embeddings -> (N, 2) float32 layout, and how it was made (method, parameters)."""
    n = len(points)
    if n < MIN_POINTS:
        layout = np.zeros((n, 2), np.float32)
        if n >= 2:
            centred = points - points.mean(axis=0)
            _, _, axes = np.linalg.svd(centred, full_matrices=False)
            layout[:, : min(2, len(axes))] = centred @ axes[:2].T
        return layout, {"method": f"PCA (UMAP needs at least {MIN_POINTS} points)", "n": n}
    import umap

    neighbours = min(NEIGHBOURS, n - 1)
    # Spectral initialisation needs a connected graph of some size; a small set starts from random.
    init = "spectral" if n > 4 * neighbours else "random"
    model = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, metric="cosine", random_state=seed, init=init)
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": the price of a seed
        warnings.simplefilter("ignore")
        layout = model.fit_transform(points.astype(np.float32))
    return layout.astype(np.float32), {"method": "UMAP", "n": n, "n_neighbors": neighbours, "min_dist": 0.1,
                                       "metric": "cosine", "init": init, "seed": seed}
