"""Exact grouping of equal rows by a 64-bit hash of their bits.

Sorting ``n`` hashes is far cheaper than sorting ``n`` rows (what
``np.unique(..., axis=0)`` does), and the order it gives depends only on the
set of distinct rows, which is what canonical orders need.
"""

import numpy as np


def _mix64(z):
    """The SplitMix64 finaliser, in place on a uint64 array: a bijection that
    spreads every input bit over all output bits."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def group_rows(X):
    """Group the equal rows of ``X``, in a canonical order of the groups.

    Returns
    -------
    rows : ndarray of shape (n_rows, n_features), float64
        ``X`` in float64, with ``-0.0`` turned into ``0.0``.
    first : ndarray of shape (n_groups,), dtype=intp
        Index of the first row of each group, groups in canonical order: by
        row hash, or lexicographic should two distinct rows share a hash
        (either way a property of the set of distinct rows alone).
    inverse : ndarray of shape (n_rows,), dtype=intp
        The group of each row.
    """
    rows = X.astype(np.float64)
    rows += 0.0  # -0.0 + 0.0 == +0.0: equal values get equal bits
    order, starts = _hash_groups(rows)
    if order is None:
        _, first, inverse = np.unique(
            rows, axis=0, return_index=True, return_inverse=True
        )
        return rows, first, inverse.reshape(-1)
    inverse = np.empty(rows.shape[0], dtype=np.intp)
    group = np.zeros(rows.shape[0], dtype=np.intp)
    group[starts[1:]] = 1
    inverse[order] = np.cumsum(group)
    # The stable sort lists equal rows in ascending order.
    return rows, order[starts], inverse


def _hash_groups(rows):
    """Rows sorted by hash, and the start of each group of equal rows.

    ``rows`` is a float64 array without ``-0.0``.  Each value's bits, offset
    by a constant of its column, go through a 64-bit mixer; the row hash is
    the mixed sum.  Equal rows share a hash; the stable sort keeps them in
    ascending row order.  Returns ``(None, None)`` when two distinct rows
    share a hash.
    """
    n_rows, n_features = rows.shape
    if n_rows == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    offsets = np.arange(1, n_features + 1, dtype=np.uint64)
    offsets *= np.uint64(0x9E3779B97F4A7C15)
    mixed = _mix64(rows.view(np.uint64) + offsets)
    key = _mix64(mixed.sum(axis=1, dtype=np.uint64))
    order = np.argsort(key, kind="stable")
    key = key[order]
    same_key = key[1:] == key[:-1]
    if same_key.any():
        tied = np.flatnonzero(same_key)
        if np.any(rows[order[tied]] != rows[order[tied + 1]]):
            return None, None
    starts = np.flatnonzero(np.concatenate(([True], ~same_key)))
    return order, starts
