"""Code relocation: move codes from where they cost least to where they help most.

A local minimum of the distortion can still waste codes: several crowd a
region that one would serve almost as well, while a single code serves a
region that two would serve much better.  Lloyd steps and EMA updates never
leave such a minimum, because each only moves a code within its own cell.
Relocation, after the enhanced LBG algorithm of Patanè and Russo [1]_, moves
a code across the space: the code whose removal costs least (merging its
cell into its nearest neighbour's, a cost known exactly from the counts,
Ward's formula) takes half of the cell whose split gains most (a cell split
in two along its principal axis, refined by a few 2-means steps).

Every function here assumes validated input and never modifies its inputs.

References
----------
.. [1] G. Patanè and M. Russo, "The enhanced LBG algorithm", Neural Networks
   14(9), 2001.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _sparse
from ._rows import WeightedRows, canonical_sample, merge_samples, row_priority

# A cell is split only when it holds at least this many rows: the gain is
# estimated by cross-fitting two halves, and each needs a few rows per child.
MIN_SPLIT_ROWS = 8
# Distinct rows of a cell that a split looks at, at most (those of lowest
# priority: a pseudo-random subset that is a function of the cell's rows).
MAX_SPLIT_ROWS = 4096
# Power iterations for a cell's principal axis, then 2-means steps.
_AXIS_ITER = 4
_TWO_MEANS_ITER = 3


@dataclass(frozen=True)
class Relocation:
    """One move: ``code`` leaves its cell to its nearest code ``into`` and
    takes one half of the cell of ``split``, which keeps the other half."""

    code: int
    into: int
    split: int
    kept: np.ndarray  # new vector of `split`
    moved: np.ndarray  # new vector of `code`
    moved_share: float  # share of the split cell's weight that `code` takes
    remaining: float  # share of the split cell's distortion that remains
    gain: float  # estimated distortion saved by the split
    cost: float  # distortion added by the merge (Ward's formula)
    certain: bool = False  # gain and cost exact, and the gain the larger


class Split(NamedTuple):
    """Two children of a cell (see :func:`split_cell`)."""

    kept: np.ndarray  # the child that keeps the cell's code
    moved: np.ndarray  # the child that a relocated code becomes
    moved_share: float  # share of the cell's weight nearer ``moved``
    remaining: float  # share of the cell's distortion left after the split


def merge_costs(codebook, counts, candidates):
    """Nearest other code of each candidate, and the cost of merging into it.

    Merging cell ``i`` into cell ``l`` (both at their centroids) adds exactly
    ``n_i n_l / (n_i + n_l) ||c_i - c_l||^2`` to the distortion.

    Returns
    -------
    into : ndarray of shape (n_candidates,), dtype=intp
    cost : ndarray of shape (n_candidates,), float64
    """
    codebook = codebook.astype(np.float64, copy=False)
    sq_norms = np.einsum("ij,ij->i", codebook, codebook)
    d2 = sq_norms[candidates, None] - 2.0 * (codebook[candidates] @ codebook.T)
    d2 += sq_norms
    np.maximum(d2, 0.0, out=d2)
    d2[np.arange(candidates.shape[0]), candidates] = np.inf
    into = np.argmin(d2, axis=1)
    # The distance again, directly: exactly symmetric, so that two mutual
    # neighbours get exactly the same cost.
    diff = codebook[candidates] - codebook[into]
    n_i, n_l = counts[candidates], counts[into]
    total = n_i + n_l
    safe_total = np.where(total > 0, total, 1.0)
    cost = n_i * n_l / safe_total * np.einsum("ij,ij->i", diff, diff)
    return into, cost


def _two_means(Y, v):
    """Two children of the rows ``Y`` (weights ``v``), or None if they coincide.

    The rows are cut by the hyperplane through their mean normal to their
    principal axis (found by power iteration from the row farthest from the
    mean), then refined by a few 2-means steps.

    Returns
    -------
    a, b : ndarray of shape (n_features,)
    b_share : float
        Share of the weight nearer ``b``.
    """
    total = v.sum()
    weighted_sum = v @ Y
    centred = Y - weighted_sum / total
    sq = np.einsum("ij,ij->i", centred, centred)
    axis = centred[np.argmax(sq)]
    for _ in range(_AXIS_ITER):
        axis = (v * (centred @ axis)) @ centred
        norm = np.sqrt(axis @ axis)
        if not norm > 0:
            return None
        axis /= norm
    near_b = centred @ axis > 0
    for _ in range(_TWO_MEANS_ITER + 1):
        in_b = v * near_b
        w_b = in_b.sum()
        if not 0 < w_b < total:
            return None
        b_sum = in_b @ Y
        b = b_sum / w_b
        a = (weighted_sum - b_sum) / (total - w_b)
        was_b = near_b
        near_b = Y @ (b - a) > 0.5 * (b @ b - a @ a)
        if np.array_equal(near_b, was_b):
            break  # a fixed point: more steps would repeat this one
    return a, b, float(w_b / total)


def _sparse_two_means(Y, v):
    """:func:`_two_means` of CSR rows: the same steps with the centring left
    implicit (``(y - m).a = y.a - m.a``), which keeps the rows sparse."""
    total = v.sum()
    weighted_sum = Y.T @ v
    mean = weighted_sum / total
    sq = _sparse.sq_dist_to_vectors(Y, mean[None, :])[:, 0]
    axis = Y[[int(np.argmax(sq))]].toarray()[0] - mean
    for _ in range(_AXIS_ITER):
        along = v * (Y @ axis - mean @ axis)
        axis = Y.T @ along - mean * along.sum()
        norm = np.sqrt(axis @ axis)
        if not norm > 0:
            return None
        axis /= norm
    near_b = Y @ axis - mean @ axis > 0
    for _ in range(_TWO_MEANS_ITER + 1):
        in_b = v * near_b
        w_b = in_b.sum()
        if not 0 < w_b < total:
            return None
        b_sum = Y.T @ in_b
        b = b_sum / w_b
        a = (weighted_sum - b_sum) / (total - w_b)
        was_b = near_b
        near_b = Y @ (b - a) > 0.5 * (b @ b - a @ a)
        if np.array_equal(near_b, was_b):
            break  # a fixed point, as in _two_means
    return a, b, float(w_b / total)


def _sq_dist(Y, c):
    if _sparse.is_sparse(Y):
        return _sparse.sq_dist_to_vectors(Y, c[None, :])[:, 0]
    diff = Y - c
    return np.einsum("ij,ij->i", diff, diff)


def _children(Y, v):
    """:func:`_two_means` of dense or sparse rows."""
    return _sparse_two_means(Y, v) if _sparse.is_sparse(Y) else _two_means(Y, v)


def split_cell(Y, v, code, min_gain=0.0, *, cross_fit=True):
    """Gain of replacing ``code`` by two children of its cell.

    The children are fitted on all rows.  Their gain on those rows, the
    fitted gain, is exact for the rows given, but as an estimate of the gain
    on the rows they stand for it is biased upwards.  With ``cross_fit``,
    when the fitted gain exceeds ``min_gain`` (else the cell is passed over,
    at the cost of one 2-means fit), the gain is estimated again by two-fold
    cross-fitting: children fitted on one fold are measured on the other and
    the other way round, an honest estimate even from a few rows.  The folds
    alternate along the rows' priorities (:func:`~skvq._rows.row_priority`):
    pseudo-random, yet a function of the rows as a set, so the estimate does
    not depend on their order and barely moves when they change by
    rounding.  Without ``cross_fit`` (the rows are the whole cell), the
    fitted gain is returned.

    Returns
    -------
    gain : float
        Estimated (or, without ``cross_fit``, the exact) decrease of
        ``sum v_i ||y_i - c||^2`` (may be negative).
    split : Split or None
        None when the rows cannot be split or gain too little.
    """
    return CellSplits(code[None, :], {0: (Y, v)}).split(
        0, min_gain, cross_fit=cross_fit
    )


class FittedSplit(NamedTuple):
    """Children fitted on all the rows of a cell, and their gain there."""

    gain: float  # the fitted gain (0 when the rows cannot be split)
    split: Split | None  # None when the rows cannot be split


class CrossFit(NamedTuple):
    """The two-fold cross-fitted gain of a cell (see :func:`split_cell`)."""

    gain: float
    splittable: bool  # False when a fold's rows cannot be split


class CellSplits:
    """The split candidates of one planning round: each cell's rows, the
    children fitted on them and their cross-fitted gain, each computed at
    most once (a round that finds no certain move plans a trial from the
    same cells, see :func:`plan_relocations`).

    Parameters
    ----------
    codebook : ndarray of shape (n_codes, n_features)
        The code book the cells belong to.
    rows : dict
        ``cell -> (Y, v)``: the rows of each candidate cell and their
        weights (see :func:`split_rows`).
    """

    def __init__(self, codebook, rows):
        self.codebook = codebook
        self.rows = rows
        self._fitted = {}
        self._cross_fitted = {}

    def __len__(self):
        return len(self.rows)

    def split(self, p, min_gain=0.0, *, cross_fit=True):
        """:func:`split_cell` of cell ``p``."""
        gain, split = self._fitted_split(p)
        if split is None or not gain > min_gain:
            return 0.0, None
        if not cross_fit:
            return gain, split
        cross = self._cross_fit(p)
        if not cross.splittable:
            return 0.0, None
        return cross.gain, split

    def _cell(self, p):
        """Rows, weights and code of cell ``p``, in float64."""
        Y, v = self.rows[p]
        return Y.astype(np.float64, copy=False), v, self.codebook[p].astype(np.float64)

    def _fitted_split(self, p):
        return self._once(self._fitted, p, _fit_children)

    def _cross_fit(self, p):
        return self._once(self._cross_fitted, p, _cross_fit)

    def _once(self, found, p, compute):
        """``compute`` of cell ``p``'s rows, weights and code, kept in
        ``found``."""
        if p not in found:
            found[p] = compute(*self._cell(p))
        return found[p]


def _fit_children(Y, v, code):
    """:class:`FittedSplit` of float64 rows ``Y`` around ``code``."""
    children = _children(Y, v)
    if children is None:
        return FittedSplit(0.0, None)
    a, b, b_share = children
    before = float(v @ _sq_dist(Y, code))
    after = float(v @ np.minimum(_sq_dist(Y, a), _sq_dist(Y, b)))
    remaining = min(after / before, 1.0) if before > 0 else 1.0
    return FittedSplit(before - after, Split(a, b, b_share, remaining))


def _cross_fit(Y, v, code):
    """:class:`CrossFit` of float64 rows ``Y`` around ``code``."""
    rank = np.argsort(row_priority(Y), kind="stable")
    folds = (np.sort(rank[0::2]), np.sort(rank[1::2]))
    gain = 0.0
    for fit_rows, test_rows in (folds, folds[::-1]):
        fold = _children(Y[fit_rows], v[fit_rows])
        if fold is None:
            return CrossFit(0.0, False)
        test = Y[test_rows]
        kept = _sq_dist(test, code)
        split_sq = np.minimum(_sq_dist(test, fold[0]), _sq_dist(test, fold[1]))
        gain += float(v[test_rows] @ (kept - split_sq))
    return CrossFit(gain, True)


def cell_members(X, sample_weight, labels, cells, min_rows=1):
    """Distinct rows of each of ``cells``, in canonical order, at most
    ``MAX_SPLIT_ROWS`` of them (those of lowest priority), with their summed
    weights.

    Like initialisation, relocation then depends only on the weighted
    distribution of the rows (not on their order or repetition), and the
    members of a batch's parts merge into those of the whole batch
    (:func:`merge_members`).

    Cells with fewer than ``min_rows`` rows are left out.

    Returns
    -------
    members : dict
        ``cell -> (Y, v)`` for the cells that hold rows of positive weight.
    """
    members = {}
    for p in cells:
        found = np.flatnonzero(labels == p)
        if found.shape[0] >= max(min_rows, 1):
            sample = canonical_sample(
                X[found], sample_weight[found], max_rows=MAX_SPLIT_ROWS
            )
            if sample.n_rows:
                members[int(p)] = (sample.points, sample.weights)
    return members


def merge_members(parts):
    """The members of a batch from the :func:`cell_members` of its parts."""
    if len(parts) == 1:
        return parts[0]
    merged = {}
    for part in parts:
        # Each part is already a canonical sample (see cell_members).
        for p, (Y, v) in part.items():
            merged.setdefault(p, []).append(WeightedRows(Y, v))
    return {
        p: _pair(merge_samples(samples, MAX_SPLIT_ROWS))
        for p, samples in merged.items()
    }


def _pair(sample):
    return sample.points, sample.weights


def split_rows(members, cell_weights):
    """The members of the cells that may be split, weighted up to the whole cell.

    Cells with fewer than ``MIN_SPLIT_ROWS`` rows are dropped; the weights of
    the others are scaled to sum to the cell's weight in ``cell_weights``
    (the rows may be a prefix of the cell).
    """
    rows = {}
    for p, (Y, v) in members.items():
        total = v.sum()
        if Y.shape[0] >= MIN_SPLIT_ROWS and total > 0:
            rows[p] = (Y, v * (cell_weights[p] / total))
    return rows


def whole_cells(members):
    """The cells of :func:`cell_members`'s ``members`` that hold all their
    distinct rows (fewer than the ``MAX_SPLIT_ROWS`` cap)."""
    return frozenset(p for p, (Y, _) in members.items() if Y.shape[0] < MAX_SPLIT_ROWS)


def plan_relocations(
    cells, counts, merge_candidates, max_moves, min_ratio, *, whole=()
):
    """Moves that each split a cell whose gain exceeds ``min_ratio`` times the cost.

    ``cells`` (:class:`CellSplits`) holds the code book and each split
    candidate's rows and weights (in the units of ``counts``);
    ``merge_candidates`` lists the codes that may move.
    Candidates move in order of increasing merge cost, each to the remaining
    cell of largest gain; the cells of a move (the moved code, its merge
    partner, the split cell) are left out of later moves, so the moves are
    independent.

    The cells in ``whole`` are given with all their rows (at their
    centroids, as after a full step): their gain is the fitted one, exact,
    and a move into one of them is planned only when that gain exceeds the
    cost (exact too, by Ward's formula).  Such a move is *certain*: the
    partition it makes has a lower distortion than the one before, whatever
    the rows of the other cells, so it needs no trial steps.

    Returns
    -------
    moves : list of Relocation
    """
    if not len(cells) or not merge_candidates.shape[0] or cells.codebook.shape[0] < 3:
        return []  # a move involves three distinct codes
    into, cost = merge_costs(cells.codebook, counts, merge_candidates)
    min_gain = min_ratio * cost.min()
    splits = []
    for p in cells.rows:
        exact = p in whole
        gain, split = cells.split(
            p, cost.min() if exact else min_gain, cross_fit=not exact
        )
        if split is not None and gain > 0:
            splits.append((gain, p, split, exact))
    splits.sort(key=lambda s: (-s[0], s[1]))
    moves, used = [], set()
    # Ward's cost is symmetric: of two mutual neighbours, the lower index
    # moves, whatever the rounding of the statistics that listed them.
    for j in np.lexsort((merge_candidates, cost)):
        i, partner = int(merge_candidates[j]), int(into[j])
        if len(moves) == max_moves or not splits:
            break
        if i in used or partner in used:
            continue
        choice = next((s for s in splits if s[1] not in (i, partner)), None)
        if choice is None:
            break
        gain, p, split, exact = choice
        if not gain > (1.0 if exact else min_ratio) * cost[j]:
            break
        splits.remove(choice)
        used.update((i, partner, p))
        moves.append(
            Relocation(i, partner, p, *split, gain=gain, cost=cost[j], certain=exact)
        )
    return moves


def apply_relocations(state, moves):
    """The code book state after ``moves``.

    ``state`` is ``(codebook, counts, sums, distortions)``.  The code that
    moves hands its count, sum and distortion (plus the merge cost) to its
    partner; the split cell's count and remaining distortion are shared by
    its two codes in proportion to their weight, each sum being the count
    times its new vector, as if the cell had always been split.

    Returns
    -------
    state : tuple of ndarray
        New arrays; the inputs are untouched.
    """
    # Copies in the arrays' own layout (a sparse stream's are transposed).
    codebook, counts, sums, distortions = (a.copy(order="K") for a in state)
    for move in moves:
        i, partner, p = move.code, move.into, move.split
        diff = codebook[i].astype(np.float64) - codebook[partner]
        total = counts[i] + counts[partner]
        ward = counts[i] * counts[partner] / total * (diff @ diff)
        distortions[partner] += distortions[i] + ward
        counts[partner] = total
        sums[partner] += sums[i]
        codebook[partner] = sums[partner] / total
        left, n_p = distortions[p] * move.remaining, counts[p]
        for k, vector, share in (
            (p, move.kept, 1.0 - move.moved_share),
            (i, move.moved, move.moved_share),
        ):
            codebook[k] = vector
            counts[k] = n_p * share
            sums[k] = counts[k] * codebook[k].astype(np.float64)
            distortions[k] = left * share
    return codebook, counts, sums, distortions
