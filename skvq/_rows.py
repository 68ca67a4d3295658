"""Canonical handling of sets of weighted rows.

Initialisation, re-seeding and relocation look at the distinct rows of some
data, and must depend on those rows as a weighted set, never on their order,
their repetition or the chunks they arrived in.  This module gives them:

- exact grouping of equal rows (:func:`group_rows`), by a 64-bit hash of
  their bits, far cheaper than sorting rows;
- a canonical order of distinct rows: by their projection onto a fixed,
  generic direction (ties, which need an exact linear relation between
  distinct rows, by lexicographic order).  Unlike a hash order, it moves
  only where two rows project within rounding of each other, so rows that
  differ by rounding (the same residuals computed chunk by chunk, weights
  scaled by 1e-3) keep their order, and draws made along it (k-means++)
  stay the same;
- canonical subsets (:func:`canonical_sample`): the distinct rows of lowest
  *priority*, a pseudo-random number that each row draws from its own values
  alone, scale-free and only mildly sensitive to rounding.  A subset of a
  union is the subset of the parts' subsets (:func:`merge_samples`), so
  chunks can send their own.

Rows may be sparse (CSR in canonical form, :mod:`skvq._sparse`): priorities,
stage hashes and canonical orders are then the same numbers as for the
dense rows; equal rows are grouped by a hash of their stored entries.

Every quantity here is invariant under a power-of-two scaling of the rows:
projections scale exactly, priorities use each row's own binary exponent.
The projections are running sums along each row, so that a row's value never
depends on its position in the array (BLAS products may block rows by
alignment).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import _sparse

# Priorities are the fractional part of this multiple of a normalised
# projection: large enough to scatter nearby rows over [0, 1), small enough
# that rounding differences (1e-16 relative) move a priority by about 1e-10.
_PRIORITY_SPREAD = 2.0**20
# Rows per block of a projection (bounds its temporary).
_PROJECTION_ROWS = 4096
# A capped sample of many rows first keeps the rows of this many times the
# cap's lowest priorities (the rows it can keep, duplicates aside).
_PRESELECT_FACTOR = 4


@lru_cache(maxsize=16)
def _directions(n_features):
    """Two fixed generic directions: one orders rows, one gives priorities.

    Drawn once from a fixed seed: random float64 components make an exact
    tie between two distinct rows (an exact linear relation) practically
    impossible, also for integer data.
    """
    rng = np.random.default_rng(0x5C7A)
    return rng.uniform(0.5, 1.5, size=(2, n_features))


# Below this many values, a projection is one accumulation along the rows
# (one call) rather than a loop over the columns (one call per column).
_ACCUMULATE_VALUES = 2**14


def project(rows, direction):
    """``rows @ direction``, computed the same way for every row.

    The terms of each row are added in column order, one column at a time,
    so a row's value is the same sequence of roundings wherever the row
    sits, in whatever array (a BLAS product or a reduction may group the
    terms differently by alignment or shape).  Small arrays do it in one
    running sum along each row (``np.add.accumulate``, sequential by
    definition): the same roundings, the same bits (``+ 0.0`` turns the
    ``-0.0`` of an all-zero row into the loop's ``0.0``).
    """
    if rows.size <= _ACCUMULATE_VALUES:
        terms = rows * direction
        if terms.shape[1] == 0:
            return np.zeros(rows.shape[0])
        np.add.accumulate(terms, axis=1, out=terms)
        return terms[:, -1] + 0.0
    out = np.zeros(rows.shape[0])
    for start in range(0, rows.shape[0], _PROJECTION_ROWS):
        block = rows[start : start + _PROJECTION_ROWS] * direction
        total = out[start : start + _PROJECTION_ROWS]
        for j in range(block.shape[1]):
            total += block[:, j]
    return out


def row_priority(rows):
    """A pseudo-random number in [0, 1) per row, from the row's values alone.

    The fractional part of a large multiple of the row's projection, after
    the row is divided by a power of two that brings its largest entry into
    [0.5, 1): the same for a row at any scale, the same for equal rows.
    """
    if _sparse.is_sparse(rows):
        return _sparse.by_chunks(_row_priority, rows)
    return _row_priority(rows)


def _row_priority(rows):
    sparse_rows = _sparse.is_sparse(rows)
    if sparse_rows:
        largest = _sparse.row_abs_max(rows)
    else:
        largest = np.abs(rows).max(axis=1, initial=0.0)
    exponent = np.frexp(largest)[1]
    # Exponents are clipped where 2**-exponent would leave float64 (rows
    # beyond 2**+-1000, which internal units never produce).
    np.clip(exponent, -1000, 1000, out=exponent)
    direction = _directions(rows.shape[1])[1]
    if sparse_rows:
        terms = rows.data * np.ldexp(1.0, -exponent)[_sparse.row_ids(rows)]
        terms *= direction[rows.indices]
        priority = _sparse.running_row_sums(rows, terms)
    else:
        normalised = rows * np.ldexp(1.0, -exponent)[:, None]
        priority = project(normalised, direction)
    priority *= _PRIORITY_SPREAD
    priority -= np.floor(priority)
    return priority


# Odd multipliers of the stage hash, one per feature (cycled).
_STAGE_MULTIPLIERS = np.random.default_rng(0x57A6E).integers(
    0, 2**63, size=64, dtype=np.uint64
) | np.uint64(1)


def stage_priority(X, exponent):
    """A pseudo-random number in [0, 1) per row, for assigning rows to stages.

    A hash of the bits of the row divided by ``2**exponent`` (exact): with
    ``exponent`` that of the data's largest magnitude, the same for the data
    at any power-of-two scale; a function of the row alone, computed with
    integer arithmetic (exact, in any order), so the same row gets the same
    number in any array, chunk or backend.  Equal rows get equal numbers.
    """
    if _sparse.is_sparse(X):
        return _sparse.by_chunks(lambda rows: _stage_priority(rows, exponent), X)
    return _stage_priority(X, exponent)


def _stage_priority(X, exponent):
    n_rows, n_features = X.shape
    values = X.data if _sparse.is_sparse(X) else X
    scaled = values * X.dtype.type(np.ldexp(1.0, -int(exponent)))
    scaled += 0.0  # -0.0 + 0.0 == +0.0: equal values get equal bits
    bits = scaled.view(np.uint32 if X.dtype == np.float32 else np.uint64)
    if _sparse.is_sparse(X):
        # Zeros add nothing to the sum: the dense rows' numbers.
        multipliers = _STAGE_MULTIPLIERS[X.indices % _STAGE_MULTIPLIERS.shape[0]]
        key = _sparse.row_wrapping_sums(X, bits * multipliers.astype(bits.dtype))
        key = key.astype(np.uint64)
    else:
        multipliers = np.resize(_STAGE_MULTIPLIERS, n_features).astype(bits.dtype)
        key = (bits * multipliers).sum(axis=1, dtype=bits.dtype).astype(np.uint64)
    key = _mix64(key)
    return (key >> np.uint64(11)).astype(np.float64) * 2.0**-53


def canonical_order(rows):
    """Indices that sort distinct ``rows`` canonically (see the module)."""
    if rows.shape[0] < 2:
        return np.arange(rows.shape[0])
    direction = _directions(rows.shape[1])[0]
    if _sparse.is_sparse(rows):
        key = _sparse.running_row_sums(rows, rows.data * direction[rows.indices])
    else:
        key = project(rows, direction)
    order = np.argsort(key, kind="stable")
    if np.any(key[order[1:]] == key[order[:-1]]):
        if _sparse.is_sparse(rows):
            return np.lexsort((_sparse.tie_ranks(rows, key), key))
        # An exact tie between distinct rows: lexicographic among ties.
        columns = tuple(rows[:, j] for j in reversed(range(rows.shape[1])))
        order = np.lexsort(columns + (key,))
    return order


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
    """Group the equal rows of ``X``, groups in canonical order.

    Dense rows are sorted by their canonical key (:func:`canonical_order`'s
    projection), which equal rows share: when every run of equal keys holds
    equal rows (distinct rows tie only through an exact linear relation or
    a rounding coincidence), the runs are the groups, already in canonical
    order.  Otherwise, and for sparse rows, rows are grouped by a hash of
    their bits (:func:`_equal_rows`) and the groups put in canonical order.

    Returns
    -------
    rows : ndarray of shape (n_rows, n_features), float64
        ``X`` in float64, with ``-0.0`` turned into ``0.0``.
    first : ndarray of shape (n_groups,), dtype=intp
        Index of the first row of each group, groups in canonical order
        (:func:`canonical_order` of the distinct rows).
    inverse : ndarray of shape (n_rows,), dtype=intp
        The group of each row.
    """
    if _sparse.is_sparse(X):  # canonical: no stored zeros, nor -0.0
        rows = X.astype(np.float64)
        first, inverse = _equal_sparse_rows(rows)
    else:
        # -0.0 + 0.0 == +0.0: equal values get equal bits (one pass, a copy).
        rows = np.add(X, 0.0, dtype=np.float64)
        grouped = _groups_by_key(rows)
        if grouped is not None:
            return (rows, *grouped)
        first, inverse = _equal_rows(rows)
    order = canonical_order(rows[first])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return rows, first[order], rank[inverse]


def positions_in(rows, points):
    """For each of ``rows``, the index of the equal row of ``points`` (dense,
    distinct), or -1 where ``points`` holds none (``-0.0`` equals ``0.0``).

    Rows are matched by their canonical projection (:func:`project`: equal
    rows share it wherever they sit), then compared value by value: two
    distinct points that shared a projection would only leave the rows of
    the second unmatched.
    """
    position = np.full(rows.shape[0], -1, dtype=np.intp)
    if points.shape[0] == 0:
        return position
    direction = _directions(points.shape[1])[0]
    key = project(points, direction)
    order = np.argsort(key, kind="stable")
    key = key[order]
    row_key = project(rows, direction)
    at = np.minimum(np.searchsorted(key, row_key), key.shape[0] - 1)
    candidate = order[at]
    found = (key[at] == row_key) & np.all(points[candidate] == rows, axis=1)
    position[found] = candidate[found]
    return position


def _groups_by_key(rows):
    """:func:`group_rows`'s ``first`` and ``inverse`` from the canonical key
    of dense ``rows``, or None when some distinct rows share a key."""
    n_rows = rows.shape[0]
    if n_rows == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    key = project(rows, _directions(rows.shape[1])[0])
    order = np.argsort(key)  # the runs, not their inner order, matter
    key = key[order]
    same_key = key[1:] == key[:-1]
    if same_key.any():
        tied = np.flatnonzero(same_key)
        if np.any(rows[order[tied]] != rows[order[tied + 1]]):
            return None
    starts = np.flatnonzero(np.concatenate(([True], ~same_key)))
    # Each group's first row: the lowest index of its run.
    first = np.minimum.reduceat(order, starts)
    group = np.zeros(n_rows, dtype=np.intp)
    group[starts[1:]] = 1
    inverse = np.empty(n_rows, dtype=np.intp)
    inverse[order] = np.cumsum(group)
    return first, inverse


def _equal_rows(rows):
    """First index of each group of equal rows, and each row's group.

    Rows are grouped by a 64-bit hash of their bits (each value offset by a
    constant of its column, mixed, summed and mixed again); should two
    distinct rows share a hash, by ``np.unique`` instead.
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
            _, first, inverse = np.unique(
                rows, axis=0, return_index=True, return_inverse=True
            )
            return first, inverse.reshape(-1)
    return _groups_of_sorted_keys(order, same_key)


def _equal_sparse_rows(rows):
    """:func:`_equal_rows` of CSR rows: a hash of their stored (column,
    value) pairs."""
    n_rows = rows.shape[0]
    if n_rows == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    offsets = rows.indices.astype(np.uint64) + np.uint64(1)
    offsets *= np.uint64(0x9E3779B97F4A7C15)
    mixed = _mix64(rows.data.view(np.uint64) + offsets)
    key = _mix64(_sparse.row_wrapping_sums(rows, mixed))
    order = np.argsort(key, kind="stable")
    key = key[order]
    same_key = key[1:] == key[:-1]
    if same_key.any():
        tied = np.flatnonzero(same_key)
        for t in tied:
            a, b = order[t], order[t + 1]
            if _sparse.row_bytes(rows, a) != _sparse.row_bytes(rows, b):
                return _sparse.groups_by_bytes(rows)
    return _groups_of_sorted_keys(order, same_key)


def _groups_of_sorted_keys(order, same_key):
    """First row of each group and each row's group, from the stable order of
    the rows' keys and which sorted neighbours share a key."""
    starts = np.flatnonzero(np.concatenate(([True], ~same_key)))
    group = np.zeros(order.shape[0], dtype=np.intp)
    group[starts[1:]] = 1
    inverse = np.empty(order.shape[0], dtype=np.intp)
    inverse[order] = np.cumsum(group)
    # The stable sort lists equal rows in ascending order: the first is the
    # group's first row.
    return order[starts], inverse


@dataclass(frozen=True)
class WeightedRows:
    """Distinct rows with their summed weights, in canonical order.

    ``values`` carries one number per row that equal rows share (a squared
    distance, say).
    """

    points: np.ndarray  # (n, n_features), float64 (CSR for sparse rows)
    weights: np.ndarray  # (n,)
    values: np.ndarray | None = None  # (n,)

    @property
    def n_rows(self):
        return self.points.shape[0]


def canonical_sample(X, sample_weight, values=None, max_rows=None):
    """The distinct rows of positive weight, in canonical order.

    Duplicate rows are merged (weights summed) and rows of zero weight
    dropped, so the result depends only on the weighted empirical
    distribution of ``(X, sample_weight)``.  With ``max_rows``, only the
    ``max_rows`` distinct rows of lowest priority are kept (ties by
    canonical order): a pseudo-random subset that is a function of the set.

    Returns
    -------
    WeightedRows
    """
    keep = sample_weight > 0
    if not keep.all():
        X, sample_weight = X[keep], sample_weight[keep]
        values = None if values is None else values[keep]
    if max_rows is not None and X.shape[0] > _PRESELECT_FACTOR * max_rows:
        # Only rows among the lowest priorities can be kept: group those
        # alone when they hold enough distinct rows (the result is the same).
        priority = row_priority(X)
        cut = _PRESELECT_FACTOR * max_rows
        candidates = priority <= np.partition(priority, cut)[cut]
        sample = _grouped_sample(
            X[candidates],
            sample_weight[candidates],
            None if values is None else values[candidates],
            max_rows,
            priority=priority[candidates],
        )
        if sample.n_rows == max_rows:
            return sample
    return _grouped_sample(X, sample_weight, values, max_rows)


def _grouped_sample(X, sample_weight, values, max_rows, priority=None):
    """:func:`canonical_sample` of rows of positive weight, by grouping them
    all (``priority``: their :func:`row_priority`, when already known)."""
    rows, first, inverse = group_rows(X)
    points = rows[first]
    weights = np.bincount(inverse, weights=sample_weight, minlength=points.shape[0])
    point_values = None
    if values is not None:
        point_values = np.empty(points.shape[0], dtype=values.dtype)
        point_values[inverse] = values
    if max_rows is not None and points.shape[0] > max_rows:
        # A stable sort on priority keeps canonical order among equal ones.
        # (A row's priority is a function of its values: the first of each
        # group stands for the group.)
        priority = row_priority(points) if priority is None else priority[first]
        chosen = np.sort(np.argsort(priority, kind="stable")[:max_rows])
        points, weights = points[chosen], weights[chosen]
        if point_values is not None:
            point_values = point_values[chosen]
    return WeightedRows(points, weights, point_values)


def merge_samples(parts, max_rows=None):
    """The canonical sample of the union of the sets that ``parts`` sample.

    Exact when each part is the canonical sample (with the same
    ``max_rows``) of its own rows: a row among the lowest priorities of the
    union is among the lowest of every part that holds it.
    """
    parts = [p for p in parts if p is not None and p.n_rows]
    if not parts:
        return None
    if len(parts) == 1 and (max_rows is None or parts[0].n_rows <= max_rows):
        return parts[0]
    has_values = parts[0].values is not None
    if _sparse.is_sparse(parts[0].points):
        points = _sparse.vstack([p.points for p in parts])
    else:
        points = np.concatenate([p.points for p in parts])
    weights = np.concatenate([p.weights for p in parts])
    values = np.concatenate([p.values for p in parts]) if has_values else None
    return canonical_sample(points, weights, values, max_rows)
