"""Numeric kernels of the EMA code book: initialisation, statistics, update.

Every function here assumes that its inputs were validated by the estimator:
finite float arrays of consistent shapes, non-negative sample weights with a
positive sum, and a NumPy ``RandomState`` for the random draws.  They never
modify their inputs.
"""

from dataclasses import dataclass

import numpy as np
from scipy import sparse

# A code whose EMA count falls below this value (after about 35,000 unused
# steps at momentum 0.99, or one at momentum 0) has its count and sum rescaled
# together, so that the count never underflows to 0 and the vector is kept.
COUNT_FLOOR = float(np.sqrt(np.finfo(np.float64).tiny))


def canonical_sample(X, sample_weight, values=None):
    """Collapse duplicate rows and drop zero weights, in lexicographic order.

    The result depends only on the weighted empirical distribution of
    ``(X, sample_weight)``: not on row order, not on whether a row is repeated
    ``r`` times or weighted ``r``, not on rows of weight zero.

    Returns
    -------
    points : ndarray of shape (n_distinct, n_features), float64
    weights : ndarray of shape (n_distinct,), float64
    point_values : ndarray of shape (n_distinct,)
        Only when ``values`` (one per row, equal for equal rows) is given:
        the value of each distinct row.
    """
    keep = sample_weight > 0
    points, inverse = np.unique(X[keep].astype(np.float64), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    weights = np.bincount(
        inverse, weights=sample_weight[keep], minlength=points.shape[0]
    )
    if values is None:
        return points, weights
    point_values = np.empty(points.shape[0], dtype=values.dtype)
    point_values[inverse] = values[keep]
    return points, weights, point_values


def weighted_draw(weights, size, rng):
    """Draw ``size`` indices with probability proportional to ``weights``."""
    cumulative = np.cumsum(weights)
    targets = rng.uniform(size=size) * cumulative[-1]
    idx = np.searchsorted(cumulative, targets, side="right")
    return np.minimum(idx, weights.shape[0] - 1)


def kmeans_plusplus(points, weights, n_codes, rng):
    """Greedy weighted k-means++ seeding on distinct points.

    Each new seed is the best, by weighted potential, of ``2 + log(n_codes)``
    candidates drawn with probability proportional to weight times squared
    distance to the seeds so far.  Stops early when every point is a seed.

    Returns
    -------
    seeds : ndarray of shape (n_seeds,), dtype=intp
        Indices into ``points``, ``n_seeds = min(n_codes, n_points)``.
    """
    n_points = points.shape[0]
    n_seeds = min(n_codes, n_points)
    n_trials = 2 + int(np.log(n_codes))
    center = points.mean(axis=0)
    centred = points - center
    sq_norms = np.einsum("ij,ij->i", centred, centred)

    def sq_dist(idx):
        cand = centred[idx]
        d = sq_norms[None, :] - 2.0 * (cand @ centred.T)
        d += sq_norms[idx][:, None]
        np.maximum(d, 0.0, out=d)
        d[np.arange(idx.shape[0]), idx] = 0.0
        return d

    seeds = np.empty(n_seeds, dtype=np.intp)
    seeds[0] = weighted_draw(weights, 1, rng)[0]
    closest = sq_dist(seeds[:1])[0]
    for c in range(1, n_seeds):
        potential = weights * closest
        candidates = weighted_draw(potential, n_trials, rng)
        dist = np.minimum(sq_dist(candidates), closest[None, :])
        best = np.argmin(dist @ weights)
        seeds[c] = candidates[best]
        closest = dist[best]
    return seeds


def random_seeds(points, weights, n_codes, rng):
    """``min(n_codes, n_points)`` distinct points drawn with probability ~ weight."""
    n_seeds = min(n_codes, points.shape[0])
    return rng.choice(
        points.shape[0], size=n_seeds, replace=False, p=weights / weights.sum()
    )


def init_codebook(X, sample_weight, n_codes, method, rng):
    """Initial code vectors drawn from ``X`` by ``method``.

    When ``X`` has fewer distinct rows (of positive weight) than ``n_codes``,
    every distinct row becomes a code and the remaining codes repeat rows drawn
    with probability proportional to their weight.

    Returns
    -------
    codebook : ndarray of shape (n_codes, n_features), float64
    n_distinct : int
        Number of distinct rows of positive weight in ``X``.
    """
    points, weights = canonical_sample(X, sample_weight)
    seeding = kmeans_plusplus if method == "k-means++" else random_seeds
    seeds = seeding(points, weights, n_codes, rng)
    if seeds.shape[0] < n_codes:
        extra = weighted_draw(weights, n_codes - seeds.shape[0], rng)
        seeds = np.concatenate([seeds, extra])
    return points[seeds], points.shape[0]


def code_statistics(X, labels, sample_weight, n_codes):
    """Per-code weighted counts and sums of a batch, in float64.

    Returns
    -------
    counts : ndarray of shape (n_codes,)
        ``sum of w_i over the rows assigned to each code``.
    sums : ndarray of shape (n_codes, n_features)
        ``sum of w_i x_i over the rows assigned to each code``.
    """
    n_samples = X.shape[0]
    counts = np.bincount(labels, weights=sample_weight, minlength=n_codes)
    # Column i of this (n_codes, n_samples) matrix holds w_i at row labels[i]:
    # its product with X scatters the weighted rows onto their codes in one
    # pass, in sample order, with no sort.
    assign = sparse.csc_matrix(
        (sample_weight, labels, np.arange(n_samples + 1)), shape=(n_codes, n_samples)
    )
    sums = np.asarray(assign @ X.astype(np.float64, copy=False))
    return counts, sums


@dataclass(frozen=True)
class BatchStatistics:
    """Additive sufficient statistics of one EMA step over (part of) a batch.

    Statistics of disjoint parts of a batch add up to those of the batch,
    which is what lets a step run as a reduction over chunks.
    """

    counts: np.ndarray  # (n_codes,): sum of w_i per code
    sums: np.ndarray  # (n_codes, n_features): sum of w_i x_i per code
    loss: float  # sum of w_i ||x_i - c(x_i)||^2
    weight: float  # sum of w_i

    def __add__(self, other):
        return BatchStatistics(
            self.counts + other.counts,
            self.sums + other.sums,
            self.loss + other.loss,
            self.weight + other.weight,
        )


def batch_statistics(index, X, sample_weight, n_codes, n_jobs=None):
    """Assign the rows of ``X`` to their nearest codes and sum them up.

    Returns
    -------
    stats : BatchStatistics
    sq_dist : ndarray of shape (n_samples,)
        Squared distance of each row to its code.
    """
    labels, sq_dist = index.nearest(X, n_jobs=n_jobs, return_sq_dist=True)
    counts, sums = code_statistics(X, labels, sample_weight, n_codes)
    loss = float(np.dot(sample_weight, sq_dist))
    return BatchStatistics(counts, sums, loss, float(sample_weight.sum())), sq_dist


def ema_update(counts, sums, codebook, batch_counts, batch_sums, momentum):
    """One EMA step of the code book; returns new arrays, inputs untouched.

    ``n_k <- m n_k + (1 - m) batch_counts_k``,
    ``s_k <- m s_k + (1 - m) batch_sums_k`` and ``c_k <- s_k / n_k`` for every
    code that received weight.  A code that received none keeps its vector
    exactly (in exact arithmetic ``s_k / n_k`` does not change); its sum is
    re-expressed as ``c_k n_k`` so that rounding cannot make ``s_k / n_k``
    drift from ``c_k`` over a long wait, and its count is kept above
    ``COUNT_FLOOR`` so that it never underflows to 0.
    """
    new_counts = momentum * counts
    new_counts += (1.0 - momentum) * batch_counts
    new_sums = momentum * sums
    new_sums += (1.0 - momentum) * batch_sums
    won = (batch_counts > 0)[:, None]
    new_codebook = codebook.copy()
    np.divide(new_sums, new_counts[:, None], out=new_codebook, where=won)
    kept = ~won | (new_counts < COUNT_FLOOR)[:, None]
    np.maximum(new_counts, COUNT_FLOOR, out=new_counts)
    np.multiply(new_codebook, new_counts[:, None], out=new_sums, where=kept)
    return new_counts, new_sums, new_codebook


def reseed_dead_codes(codebook, counts, sums, dead, X, sample_weight, sq_dist, rng):
    """Move dead codes onto batch samples, k-means++ style.

    ``(X, sample_weight, sq_dist)`` is the batch, or a weighted sample of it.
    Dead codes, in ascending order, each take a distinct row of ``X`` drawn
    with probability proportional to its weight times its squared distance
    to the code book (``sq_dist``, updated after every pick), from the
    distinct rows of positive weight in canonical order; a re-seeded code
    restarts like a freshly initialised one (``n_k = 1``, ``s_k = c_k``).
    Codes stay where they are once every row coincides with a code.

    Returns
    -------
    codebook, counts, sums : ndarray
        New arrays; the inputs are untouched.
    reseeded : ndarray of int
        Indices of the codes that moved.
    """
    points, weights, d2 = canonical_sample(X, sample_weight, sq_dist)
    codebook, counts, sums = codebook.copy(), counts.copy(), sums.copy()
    reseeded = []
    for k in np.flatnonzero(dead):
        potential = weights * d2
        if not potential.sum() > 0:
            break
        pick = points[weighted_draw(potential, 1, rng)[0]]
        codebook[k] = pick
        counts[k] = 1.0
        sums[k] = codebook[k]
        np.minimum(d2, np.einsum("ij,ij->i", points - pick, points - pick), out=d2)
        reseeded.append(k)
    return codebook, counts, sums, np.asarray(reseeded, dtype=np.intp)


def perplexity(counts):
    """``exp`` of the entropy of the usage distribution ``counts / counts.sum()``."""
    p = counts / counts.sum()
    p = p[p > 0]
    return float(np.exp(-np.dot(p, np.log(p))))


def weighted_mean(values, sample_weight):
    """Weighted mean of ``values`` (float64)."""
    return float(np.dot(sample_weight, values) / sample_weight.sum())


def weighted_mean_variance(X, sample_weight):
    """Mean over features of the weighted variance of each feature."""
    mean = np.average(X, axis=0, weights=sample_weight)
    return float(np.mean(np.average((X - mean) ** 2, axis=0, weights=sample_weight)))
