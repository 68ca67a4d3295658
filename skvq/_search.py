"""Exact nearest-code search over a fixed code book.

Every function and method in this module assumes its inputs were validated by
the estimator: ``X`` is a finite, 2-D float32 or float64 array with as many
columns as the code book, and the code book is a finite, 2-D float array.

Two backends return the same codes:

- ``"brute"`` computes, block by block, ``||e||^2 - 2 x.e`` with a BLAS
  product on data and codes shifted by a common centre (which removes the
  cancellation that the plain expansion suffers far from the origin), takes
  the argmin, and re-checks in exact float64 arithmetic every row whose best
  and second-best codes are closer than a rigorous bound on the rounding
  error of the product.
- ``"kd_tree"`` queries a :class:`scipy.spatial.cKDTree` for the two nearest
  codes and sends near ties to the same exact re-check.

With one feature, ``"auto"`` searches the sorted codes instead
(:func:`numpy.searchsorted`): the nearest code is one of the two that
bracket the value, compared exactly, for ``log2(n_codes)`` steps a row
instead of ``n_codes`` (residual and product stages fit their first
principal dimension alone, see :mod:`skvq._stage_trainer`).

The answer is therefore the code that a direct float64 computation of
``sum((x - e) ** 2)`` returns, ties going to the lowest index, whatever the
block size or the number of threads.

Exact at every scale.  When the spread of the codes leaves a window in which
the working dtype can square it safely, the index works on the data and codes
multiplied by a power of two (exact: only the exponent changes) that brings
the spread to [1, 2).  Rows that lie so far from the codes that their shifted
squared norm could overflow the product skip it for the exact check, which
also rescales its operands by a power of two whenever their magnitude could
overflow or underflow float64.  A power of two commutes with every rounding,
so the codes are those of a float64 computation on data rescaled exactly, at
any finite magnitude, and every result (labels, bounds, squared distances)
scales exactly with the data.

Duplicate code vectors (possible after initialising from fewer distinct
samples than codes) are searched once: a sample always maps to the lowest
index among equal codes, so results never depend on how rows are grouped.
"""

import threading
from functools import cached_property, lru_cache
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from . import _sparse
from ._arrays import clamp_negatives, row_sq_norms
from ._rows import group_rows
from ._threads import (
    TASK_ELEMENTS,
    n_threads,
    run_tasks,
    task_threads,
    working_memory_rows,
)

# Elements of one block of the score matrix in the brute backend.  At 2**20
# (4 MiB of float32 scores) the product and the two argmin passes cost no
# more than at 2**18 on one thread, and four times fewer NumPy calls under
# the GIL let two threads scale at 3 features (docs/performance.rst).
_BLOCK_ELEMENTS = 2**20
# Code books of at most this many codes lay their scores out code by code
# (``(n_codes, n_rows)``) for the nearest-code search: NumPy's argmin pays
# about 40 ns a row whatever the row's length, which for short rows of
# scores costs more than the product itself, while a minimum over the code
# axis of that layout runs element-wise over whole rows of samples.  The
# search of 100,000 rows on one thread (AMD EPYC, 3 / 16 / 64 features)
# takes 0.44 / 0.55 / 0.76 times as long with 64 codes, 0.5-0.86 with 96,
# 0.7-0.9 with 128 and as long with 256: the rule keeps a margin for other
# machines.
BY_CODE_MAX_CODES = 64
# Bytes of temporaries per row of the one-feature sorted search (a few
# arrays of four candidates).
_LINE_ROW_BYTES = 256
# Elements of the temporary (rows, codes, features) array in the exact check.
_EXACT_ELEMENTS = 2**21
# Binary exponents of the code spread within which a dtype's products are
# safe without rescaling: float32 squares of up to 2**40 (times any realistic
# number of features) stay far below its overflow at 2**128, and down to
# 2**-40 the rounding margin (about 2**-20 of the spread squared) stays far
# above its subnormal range; float64 has room for 2**400 both ways.
_SAFE_EXPONENT = {np.dtype(np.float32): 40, np.dtype(np.float64): 400}
# A float32 code book whose rescaling factor would exceed this (codes in
# float32's subnormal range) is searched in float64 instead.
_FLOAT32_MAX_SCALE = 2.0**126


def power_of_two_scale(magnitude, safe_exponent):
    """A power of two that brings ``magnitude`` into [0.5, 1), or 1.0 when it
    already lies in ``[2**-safe_exponent, 2**safe_exponent]`` (or is 0).

    Multiplying by it is exact: it changes exponents only.
    """
    if not magnitude > 0 or not np.isfinite(magnitude):
        return 1.0
    if 2.0**-safe_exponent <= magnitude <= 2.0**safe_exponent:
        return 1.0
    # Clipped to normal powers of two: subnormal magnitudes then land near
    # 2**-50, well inside every window.
    shift = min(max(-int(np.frexp(magnitude)[1]), -1022), 1022)
    return float(np.ldexp(1.0, shift))


def unscaled_sq(values, scale):
    """Squared distances computed on data times ``scale``, in the data's own
    units (two divisions: ``scale ** 2`` itself may leave float64's range)."""
    if scale != 1.0:
        with np.errstate(over="ignore", under="ignore"):
            values /= scale
            values /= scale
    return values


def _exact_scale(*arrays):
    """The float64 power of two for an exact check of ``arrays`` (see above)."""
    magnitude = max((float(np.abs(a).max(initial=0.0)) for a in arrays), default=0.0)
    return power_of_two_scale(magnitude, _SAFE_EXPONENT[np.dtype(np.float64)])


@lru_cache(maxsize=8)
def _probe(n_features):
    return np.linspace(1.0, 2.0, n_features)


def _distinct_code_ids(codebook):
    """Return the ascending first indices of distinct codes, or None.

    ``None`` means every code is distinct (the common case, detected with one
    product: equal rows give equal keys, because every row is reduced the
    same way); only when two keys are equal are the rows compared exactly.
    """
    key = codebook @ _probe(codebook.shape[1])
    key.sort()
    if not (key[1:] == key[:-1]).any():
        return None
    _, first, _ = group_rows(codebook)
    if first.shape[0] == codebook.shape[0]:
        return None
    return np.sort(first)


# Code books of at least this many values find their extremes without a
# temporary as large as the code book; smaller ones in two calls.
_COLUMN_EXTREMES_ELEMENTS = 2**16


def _largest_magnitude(codes):
    """The largest ``|code|`` entry."""
    if codes.size < _COLUMN_EXTREMES_ELEMENTS:
        return float(np.abs(codes).max(initial=0.0))
    return float(max(codes.max(), -codes.min()))


def _spread(codes, center):
    """The largest ``|code - center|`` entry (the same roundings either way:
    ``max(c) - center`` is the largest ``c - center``), or, when every code
    is the same, the largest ``|center|`` entry (the scale of the code)."""
    if codes.size < _COLUMN_EXTREMES_ELEMENTS:
        spread = float(np.abs(codes - center).max(initial=0.0))
    else:
        highest, lowest = codes.max(axis=0), codes.min(axis=0)
        spread = float(max((highest - center).max(), (center - lowest).max()))
    if not spread > 0:
        spread = float(np.abs(center).max(initial=0.0))
    return spread


# The spread test below keeps a factor of 2 from the edges of the narrowest
# safe window, so that its bounds need no rounding analysis.
_WINDOW_EXPONENT = min(_SAFE_EXPONENT.values()) - 1


def _spread_in_window(codes, largest):
    """Whether the spread of the codes (:func:`_spread`) surely lies inside
    every dtype's safe window, so that every scale is 1.0, from two cheap
    bounds: the spread is at most ``2 * largest`` (``largest``: a bound on
    every ``|entry|``) and at least half the largest difference of the
    first two codes (each is within the spread of the centre).  False when
    the bounds cannot tell: then the spread is computed."""
    bound = 2.0**_WINDOW_EXPONENT
    if codes.shape[0] < 2 or not 0 < 2.0 * largest <= bound:
        return False
    # No overflow: every entry is at most ``largest``.
    lowest = float(np.abs(codes[0] - codes[1]).max()) / 2
    return 1.0 / bound <= lowest


def kd_tree_pays_off(n_features, n_codes):
    """The ``algorithm="auto"`` rule, measured with ``benchmarks/auto_rule.py``.

    The k-d tree beats the blocked products by a margin on both machines
    measured (an Intel Skylake-X and an AMD EPYC, see the Performance page)
    only for large code books in few dimensions: ``n_codes >= 1024`` with
    at most 12 features, or ``n_codes >= 4096`` with at most 16.
    """
    if n_features > 16:
        return False
    return n_codes >= (1024 if n_features <= 12 else 4096)


def _exact_sq(X, codes64, rows, cols):
    """``||X[rows] - codes64[cols]||^2`` in float64, exactly rescaled when the
    operands could overflow or underflow; returned in their own units."""
    left = X[rows].astype(np.float64, copy=False)  # a fresh array either way
    right = codes64[cols]
    if 2 * rows.shape[0] <= X.shape[0] + codes64.shape[0]:
        # Few pairs (a handful of near ties in a batch): their own entries.
        magnitude = max(_largest_magnitude(left), _largest_magnitude(right))
    else:
        # The same values from per-row maxima, for a fraction of the passes.
        magnitude = max(
            float(np.abs(X).max(axis=1, initial=0.0)[rows].max(initial=0.0)),
            float(np.abs(codes64).max(axis=1, initial=0.0)[cols].max(initial=0.0)),
        )
    scale = power_of_two_scale(magnitude, _SAFE_EXPONENT[np.dtype(np.float64)])
    if scale != 1.0:
        left *= scale
        right *= scale
    left -= right
    return unscaled_sq(row_sq_norms(left), scale), scale


def _exact_nearest(X, codes64):
    """Nearest code by direct float64 differences; ties go to the lowest index."""
    n_codes, n_features = codes64.shape
    labels = np.empty(X.shape[0], dtype=np.intp)
    step = max(1, _EXACT_ELEMENTS // max(1, n_codes * n_features))
    scale = _exact_scale(X, codes64)
    codes = codes64 * scale if scale != 1.0 else codes64
    for start in range(0, X.shape[0], step):
        rows = X[start : start + step].astype(np.float64)
        if scale != 1.0:
            rows *= scale
        diff = rows[:, None, :] - codes[None, :, :]
        labels[start : start + step] = np.einsum("ijk,ijk->ij", diff, diff).argmin(1)
    return labels


def _exact_ranked(X, codes64, rows, cols, k):
    """The ``k`` nearest codes of each row of ``X`` among candidate pairs.

    ``rows`` and ``cols`` list the candidate (row, code) pairs, every row of
    ``X`` at least ``k`` times.  Ranked by exact float64 squared distance,
    ties to the lowest code index.

    Returns
    -------
    labels : ndarray of shape (n_rows, k), dtype=intp
    sq : ndarray of shape (n_rows, k), float64
    """
    sq, _ = _exact_sq(X, codes64, rows, cols)
    order = np.lexsort((cols, sq, rows))
    rows, cols, sq = rows[order], cols[order], sq[order]
    first = np.ones(rows.shape[0], dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    if k == 1:
        return cols[first][:, None], sq[first][:, None]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, rows.shape[0]))
    rank = np.arange(rows.shape[0]) - np.repeat(starts, counts)
    keep = rank < k
    n_rows = starts.shape[0]
    return cols[keep].reshape(n_rows, k), sq[keep].reshape(n_rows, k)


def _exact_ranked_rows(X, codes64, candidates, magnitude):
    """:func:`_exact_ranked` when every row has exactly its ``k`` candidates
    (``candidates`` of shape (n_rows, k)): a regular computation.

    ``magnitude`` bounds the entries of ``X`` and of the codes.  Returns the
    candidates ranked by exact float64 squared distance (ties to the lowest
    index) and those distances.
    """
    candidates = np.sort(candidates, axis=1)  # so that stable ties go lowest
    scale = power_of_two_scale(magnitude, _SAFE_EXPONENT[np.dtype(np.float64)])
    left = X.astype(np.float64, copy=scale != 1.0)
    if scale != 1.0:
        left *= scale
    sq = np.empty(candidates.shape)
    right = scratch("ranked-right", X.shape, np.float64)
    # One candidate at a time: (rows, features) arrays stay in cache, where
    # (rows, k, features) ones do not (2.5 times faster at k=5, d=192).
    for j in range(candidates.shape[1]):
        # mode="clip" (valid indices): the default buffers ``out`` anew.
        np.take(codes64, candidates[:, j], 0, right, "clip")
        if scale != 1.0:
            right *= scale
        right -= left
        sq[:, j] = np.einsum("ij,ij->i", right, right)
    sq = unscaled_sq(sq, scale)
    order = np.argsort(sq, axis=1, kind="stable")
    return (
        np.take_along_axis(candidates, order, axis=1),
        np.take_along_axis(sq, order, axis=1),
    )


def _ranked(X, codes64, rows, cols, k):
    """:func:`_exact_ranked` of dense or sparse rows (sparse ones densified a
    few at a time)."""
    if _sparse.is_sparse(X):
        return _sparse.exact_ranked(X, codes64, rows, cols, k, _exact_ranked)
    return _exact_ranked(X, codes64, rows, cols, k)


def _nearest_of_rows(X, codes64):
    """:func:`_exact_nearest` of dense or sparse rows."""
    if _sparse.is_sparse(X):
        return _sparse.map_dense_rows(X, lambda rows: _exact_nearest(rows, codes64))
    return _exact_nearest(X, codes64)


class _BestTwo(NamedTuple):
    """Per row of a block of scores: the computed best code, its score and
    the smallest score of the other codes."""

    labels: np.ndarray
    best: np.ndarray
    second: np.ndarray


def _best_two_by_row(scores):
    """:class:`_BestTwo` of scores ``(n_rows, n_codes)``: two argmin passes
    (ties to the lowest code); each row's best score is set to inf."""
    n_rows, n_codes = scores.shape
    labels = scores.argmin(axis=1)
    # Flat positions of each row's best code: take/put on the flat scores
    # cost far less than 2-D fancy indexing.
    flat = scores.reshape(-1)
    offsets = np.arange(0, n_rows * n_codes, n_codes)
    best = flat.take(labels + offsets)
    flat.put(labels + offsets, np.inf)
    second = flat.take(scores.argmin(axis=1) + offsets)
    return _BestTwo(labels, best, second)


def _best_two_by_code(scores):
    """:class:`_BestTwo` of scores laid out code by code ``(n_codes,
    n_rows)``, by element-wise minima over the codes (see
    ``BY_CODE_MAX_CODES``); each row's best score is set to inf.

    A row's label is the number of the code whose score equals the row's
    minimum, summed by one product with the indicator of those scores: the
    code itself when it is the only one.  Where several codes tie (the
    label is then meaningless, clipped to a valid code), one of them is
    left after the best is set to inf, so the second score equals the best
    and the caller settles the row exactly.
    """
    n_codes, n_rows = scores.shape
    best = np.minimum.reduce(scores, axis=0)
    at_best = scratch("at-best", (n_codes, n_rows), bool)
    np.equal(scores, best, out=at_best)
    indicator = scratch("indicator", (n_codes, n_rows), scores.dtype)
    np.copyto(indicator, at_best)
    numbers = np.arange(n_codes, dtype=scores.dtype)
    labels = (numbers @ indicator).astype(np.intp)
    np.minimum(labels, n_codes - 1, out=labels)
    scores.reshape(-1).put(labels * n_rows + np.arange(n_rows), np.inf)
    second = np.minimum.reduce(scores, axis=0)
    return _BestTwo(labels, best, second)


_SCRATCH = threading.local()


def scratch(name, shape, dtype):
    """A per-thread reusable buffer: fresh large temporaries page-fault (all
    the more where the allocator returns freed memory to the system at once,
    as Dask's workers are configured to)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, np.dtype(dtype))
    buf = buffers.get(key)
    size = shape[0] * shape[1]
    if buf is None or buf.size < size:
        buf = buffers[key] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def _sq_dist_to(X, codes, labels, scale=1.0):
    """Squared Euclidean distance of each row to its code, as float64.

    Differences are taken in the working dtype (exact for nearby values), on
    data and codes multiplied by ``scale`` (a power of two, with ``codes``
    already multiplied), so float32 data get float32 relative accuracy
    without cancellation, overflow or underflow.  A row whose difference
    still overflows the working dtype is computed again in float64.  The
    result is in the units of ``X``: infinite only when it exceeds float64.
    """
    if codes.dtype != X.dtype:  # a float64-only index
        X = X.astype(codes.dtype)
    diff = scratch("difference", X.shape, X.dtype)
    # mode="clip" (labels are valid): with the default mode, NumPy buffers
    # ``out`` in a fresh temporary on every call.
    np.take(codes, labels, axis=0, out=diff, mode="clip")
    with np.errstate(over="ignore", invalid="ignore"):
        if scale != 1.0:
            np.subtract(X * X.dtype.type(scale), diff, out=diff)
        else:
            np.subtract(X, diff, out=diff)
        sq = row_sq_norms(diff).astype(np.float64, copy=False)
    unscaled_sq(sq, scale)
    if X.dtype != np.float64 and not np.isfinite(sq).all():
        bad = np.flatnonzero(~np.isfinite(sq))
        if bad.size:
            rows = np.arange(bad.size)
            original = codes[labels[bad]].astype(np.float64) / scale
            sq[bad] = _exact_sq(X[bad], original, rows, rows)[0]
    return sq


def sq_dist_to_codes(X, codes, labels, n_jobs=None, scale=1.0):
    """``_sq_dist_to`` in blocks of fixed size, on ``n_jobs`` threads."""
    out = np.empty(X.shape[0], dtype=np.float64)
    # Blocks of 2**16 values stay in cache through the gather, the
    # difference and the sum.
    block = max(1, 2**16 // max(1, X.shape[1]))

    def work(start, stop):
        for lo in range(start, stop, block):
            hi = min(lo + block, stop)
            out[lo:hi] = _sq_dist_to(X[lo:hi], codes, labels[lo:hi], scale)

    run_tasks(
        work, X.shape[0], block, task_threads(n_jobs, X.shape[0], 4 * block), 4 * block
    )
    return out


class _ProductBounds:
    """Rigorous rounding bounds of the scores ``||e||^2 - 2 x.e`` that a
    product of ``n_features`` terms in ``dtype`` computes, for codes of
    squared norms ``e_sq`` (the layouts below share them)."""

    def __init__(self, dtype, n_features, e_sq, scale):
        self.dtype = np.dtype(dtype)
        self.scale = scale
        self.e_max = float(np.sqrt(e_sq.max(initial=0.0)))
        info = np.finfo(self.dtype)
        # Rigorous bound factor on the error of one entry of ||e||^2 - 2 x.e,
        # and of the difference of two entries: the product contributes
        # gamma_C ||x|| ||e||, the centring, the casts and the sums a few unit
        # roundoffs of (||x|| + max ||e||)^2 more.  Products that fall into
        # the subnormal range add at most half a subnormal spacing each.
        self.kappa = (2 * n_features + 16) * (info.eps / 2)
        self.absolute = 4 * (n_features + 2) * float(info.smallest_subnormal)
        # Rows whose shifted squared norm exceeds this could overflow the
        # product or the margin: they go to the exact check instead.
        self.limit = float(info.max) / 16

    def margin_of(self, x_sq):
        """Per row, from ``||x - center||^2`` (rescaled): a bound on the
        rounding error of a difference of two scores."""
        margin = np.sqrt(x_sq)
        margin += self.e_max
        margin *= margin
        margin *= 2.0 * self.kappa
        margin += self.absolute
        return margin

    def far_rows(self, x_sq):
        """Rows whose shifted squared norm exceeds ``limit`` or overflowed: their
        scores may have overflowed too (the rows are independent, so no other
        row's scores did).  None when there are none."""
        far = ~(x_sq <= self.limit)
        return far if far.any() else None


class _BrutePrep(_ProductBounds):
    """Centred (and rescaled) codes for one working dtype, laid out for one
    BLAS product.

    ``product`` has shape ``(n_codes, n_features + 1)``: row ``k`` holds
    ``-2 e_k`` then ``||e_k||^2`` (codes centred and multiplied by
    ``scale``), so that ``[(x - center) * scale, 1] @ product.T`` is
    ``||e||^2 - 2 x.e`` in a single call (BLAS reads the transposed operand
    in place; written row by row, the layout costs about half as much to
    build as its transpose: 14 against 24 us for 256 codes of 64 features).
    Writing ``[x - center, 1]`` costs no more than the copy that the ones
    column needs anyway, and it removes the cancellation of the expansion
    far from the origin.
    """

    def __init__(self, codes64, dtype, scale, center):
        n_codes, n_features = codes64.shape
        self.center = center.astype(dtype)
        centred = codes64 - self.center
        if scale != 1.0:
            centred *= scale
        e_sq = np.einsum("ij,ij->i", centred, centred)
        super().__init__(dtype, n_features, e_sq, scale)
        # -2 * e is exact in floating point.
        self.product = np.empty((n_codes, n_features + 1), dtype=self.dtype)
        np.multiply(
            centred, -2.0, out=self.product[:, :n_features], casting="same_kind"
        )
        self.product[:, n_features] = e_sq

    def scores(self, X, *, reuse=True, by_code=False):
        """``(||e||^2 - 2 (x - center).e, x - center)``, rescaled, for a block
        of rows (those of :meth:`far_rows` may hold inf or NaN): the scores
        of shape ``(n_rows, n_codes)``, or ``(n_codes, n_rows)`` ``by_code``.

        With ``reuse``, both live in per-thread buffers that the next call
        overwrites.
        """
        n_rows, n_features = X.shape
        n_codes = self.product.shape[0]
        shape_a = (n_rows, n_features + 1)
        shape_s = (n_codes, n_rows) if by_code else (n_rows, n_codes)
        if reuse:
            augmented = scratch("augmented", shape_a, self.dtype)
            scores = scratch("scores", shape_s, self.dtype)
        else:
            augmented = np.empty(shape_a, dtype=self.dtype)
            scores = np.empty(shape_s, dtype=self.dtype)
        centred = augmented[:, :n_features]
        np.subtract(X, self.center, out=centred)
        if self.scale != 1.0:
            centred *= self.dtype.type(self.scale)
        augmented[:, n_features] = 1.0
        if by_code:  # BLAS reads the rows transposed, without a copy
            return np.matmul(self.product, augmented.T, out=scores), centred
        return np.matmul(augmented, self.product.T, out=scores), centred

    def margin(self, centred):
        """Per row: a bound on the rounding error of a difference of two scores,
        and ``||x - center||^2`` (both rescaled)."""
        x_sq = row_sq_norms(centred)
        return self.margin_of(x_sq), x_sq


class _SparsePrep(_ProductBounds):
    """The codes laid out for sparse rows: float64, not centred (centring
    would fill the rows), rescaled by ``scale``.

    ``codes_t`` is the transposed code book, ``(n_features, n_codes)`` and
    C-contiguous as SciPy's sparse-times-dense product wants it: a view,
    without a copy, of a code book stored column by column (Fortran order,
    as sparse streams keep theirs, see :func:`skvq._kernels.ema_update`), a
    copy of any other.  ``code_sq`` holds ``||e||^2`` (given before
    rescaling, recomputed when ``scale`` is not 1);
    :func:`skvq._sparse.scores` forms ``||e||^2 - 2 x.e`` from the product
    ``x.e`` (times -2, exact).
    """

    def __init__(self, codes64, scale, code_sq):
        n_features = codes64.shape[1]
        codes = codes64
        if scale != 1.0:
            codes = codes64 * scale
            code_sq = np.einsum("ij,ij->i", codes, codes)
        self.code_sq = code_sq
        super().__init__(np.float64, n_features, self.code_sq, scale)
        self.codes_t = np.ascontiguousarray(codes.T)


class KNearest(NamedTuple):
    """``k`` codes of each row, their squared distances, a bound on the
    error of those distances, and what is known of the codes left out.

    Where ``floor`` is infinite, ``labels`` are the row's ``k`` nearest
    codes for certain: every code left out ranks after all of them by
    (squared distance, index).  Where it is finite, they are the ``k`` of
    smallest computed distance, and a code left out may be nearer than
    some of them; its squared distance is at least ``floor``.  Labels are
    nearest first where ``slack`` is 0 (distances exact), else in no
    particular order.
    """

    labels: np.ndarray  # (n_rows, k), dtype=intp
    sq_dist: np.ndarray  # (n_rows, k), float64
    slack: np.ndarray  # (n_rows,), float64
    floor: np.ndarray  # (n_rows,), float64


def _exactly(labels, sq_dist):
    """:class:`KNearest` of ranked codes with exact distances."""
    n_rows = labels.shape[0]
    return KNearest(labels, sq_dist, np.zeros(n_rows), np.full(n_rows, np.inf))


class CodebookIndex:
    """Search structure for one code book, rebuilt whenever the code book changes.

    Parameters
    ----------
    codebook : ndarray of shape (n_codes, n_features)
        The code vectors, float32 or float64.
    algorithm : {"auto", "kd_tree", "brute"}
        The backend; ``"auto"`` applies :func:`kd_tree_pays_off`.

    Attributes
    ----------
    scale : float
        The power of two that searches multiply data and codes by (see the
        module docstring); 1.0 unless the codes' spread is extreme.
    """

    def __init__(self, codebook, algorithm):
        self.codebook = codebook
        self.algorithm = algorithm
        # Shared with the code book when it is float64 without duplicates
        # (nothing here writes to it).
        every64 = codebook.astype(np.float64, copy=False)
        self.ids = _distinct_code_ids(every64)
        self.codes64 = every64 if self.ids is None else every64[self.ids]
        # max ||e|| bounds every |entry|: one pass that the sparse layout and
        # squared distances share, instead of two for the extremes.
        norm_bound = float(np.sqrt(self._code_sq.max(initial=0.0)))
        if _spread_in_window(self.codes64, norm_bound):
            # The common case, without the centre and the column extremes.
            spread = 1.0
        else:
            spread = _spread(self.codes64, self._center)
        self.tree_scale = power_of_two_scale(
            spread, _SAFE_EXPONENT[np.dtype(np.float64)]
        )
        self.scale = power_of_two_scale(spread, _SAFE_EXPONENT[codebook.dtype])
        # Whether searches and distances run in float64 whatever the dtypes.
        self.float64_only = not (
            1.0 / _FLOAT32_MAX_SCALE <= self.scale <= _FLOAT32_MAX_SCALE
        )
        if self.float64_only:
            self.scale = self.tree_scale
        self._preps = {}

    @cached_property
    def _code_sq(self):
        """``||e||^2`` of the distinct codes (float64, unscaled)."""
        return np.einsum("ij,ij->i", self.codes64, self.codes64)

    @cached_property
    def _codes_max(self):
        """The largest ``|entry|`` of the distinct codes."""
        return _largest_magnitude(self.codes64)

    @cached_property
    def _center(self):
        """The mean of the distinct codes (the dense search's common shift)."""
        n_distinct = max(1, self.codes64.shape[0])
        return np.einsum("ij->j", self.codes64) / n_distinct

    def __getstate__(self):
        # The k-d tree and the preparations are rebuilt where the index lands.
        state = self.__dict__.copy()
        for cached in (
            "_code_sq",
            "_codes_max",
            "_center",
            "tree",
            "codebook64",
            "_line",
            "_scaled_code_sq",
        ):
            state.pop(cached, None)
        state["_preps"] = {}
        return state

    def _working_dtype(self, dtype):
        """float32 products when the data or the codes are float32: float64
        rows (residuals) are cast once, an error the margin covers, and the
        exact check still sees them in float64."""
        if not self.float64_only and np.float32 in (
            np.dtype(dtype),
            self.codebook.dtype,
        ):
            return np.dtype(np.float32)
        return np.dtype(np.float64)

    def _prep(self, dtype):
        prep = self._preps.get(dtype)
        if prep is None:
            prep = self._preps[dtype] = _BrutePrep(
                self.codes64, dtype, self.scale, self._center
            )
        return prep

    @cached_property
    def tree(self):
        """The k-d tree over the (rescaled) distinct codes, built on first use."""
        scale = self.tree_scale
        return cKDTree(self.codes64 * scale if scale != 1.0 else self.codes64)

    @cached_property
    def scaled_codebook(self):
        """The code book times ``scale`` (exact), in float64 when the index
        searches in float64 only."""
        if self.float64_only:
            return self.codebook.astype(np.float64) * self.scale
        return self.codebook * self.codebook.dtype.type(self.scale)

    def _uses_line(self):
        """Whether nearest-code queries search the sorted codes (one
        feature, ``algorithm="auto"``)."""
        return self.algorithm == "auto" and self.codes64.shape[1] == 1

    @cached_property
    def _line(self):
        """The indices of the distinct codes of a one-feature code book in
        ascending order, and the codes in that order (times ``tree_scale``)."""
        order = np.argsort(self.codes64[:, 0], kind="stable")
        return order, self.codes64[order, 0] * self.tree_scale

    def _uses_tree(self):
        """Whether queries go to the k-d tree."""
        if self.algorithm == "brute":
            return False
        n_distinct, n_features = self.codes64.shape
        return self.algorithm == "kd_tree" or kd_tree_pays_off(n_features, n_distinct)

    # -- nearest code -----------------------------------------------------
    def nearest(self, X, *, n_jobs=None, return_sq_dist=False, return_second=False):
        """Index of the nearest code of every row (and its squared distance).

        With ``return_second``, also a lower bound on the squared distance of
        each row to every code but its own (0 where none is known: near
        ties, duplicate codes, rows far from every code), which
        :class:`~skvq._kernels.LloydBounds` uses to skip rows.

        Returns
        -------
        labels : ndarray of shape (n_samples,), dtype=intp
        sq_dist : ndarray of shape (n_samples,), float64, or None
        second : ndarray of shape (n_samples,), float64 (only with
            ``return_second``)
        """
        n_rows, n_distinct = X.shape[0], self.codes64.shape[0]
        labels = np.empty(n_rows, dtype=np.intp)
        sq_dist = np.empty(n_rows) if return_sq_dist else None
        second = np.zeros(n_rows) if return_second else None
        codes = self._codes_for(X.dtype)
        min_task_rows = TASK_ELEMENTS // n_distinct
        if _sparse.is_sparse(X):
            # Products with the stored entries only; never a tree.
            prep = self._sparse_layout()
            threads = task_threads(n_jobs, n_rows, min_task_rows)
            block = min(n_rows, max(16, _BLOCK_ELEMENTS // n_distinct))

            def search(rows):
                return self._brute_block(rows, prep)

        elif self._uses_line():
            min_task_rows = TASK_ELEMENTS // 8
            threads = task_threads(n_jobs, n_rows, min_task_rows)
            block = working_memory_rows(_LINE_ROW_BYTES, n_rows, threads)
            search = self._line_block
        elif self._uses_tree():
            threads = 1  # one task: the tree has its own workers
            block = working_memory_rows(8 * X.shape[1] + 64, n_rows)
            tree_threads = n_threads(n_jobs)

            def search(rows):
                return self._kd_block(rows, tree_threads)

        else:
            prep = self._prep(self._working_dtype(X.dtype))
            row_bytes = prep.dtype.itemsize * (n_distinct + X.shape[1] + 1)
            if n_distinct <= BY_CODE_MAX_CODES:  # the indicator of the minima
                row_bytes += n_distinct * (prep.dtype.itemsize + 1)
            threads = task_threads(n_jobs, n_rows, min_task_rows)
            block = working_memory_rows(row_bytes, n_rows, threads)
            block = min(block, max(16, _BLOCK_ELEMENTS // n_distinct))

            def search(rows):
                return self._brute_block(rows, prep)

        def work(start, stop):
            for lo in range(start, stop, block):
                hi = min(lo + block, stop)
                found, lower = search(X[lo:hi])
                if self.ids is None:
                    labels[lo:hi] = found
                    if second is not None:
                        second[lo:hi] = lower
                else:  # duplicate codes tie with the winner: no bound
                    labels[lo:hi] = self.ids[found]
                if sq_dist is not None:
                    sq_dist[lo:hi] = self._sq_dist_block(X[lo:hi], codes, labels[lo:hi])

        run_tasks(work, n_rows, block, threads, min_task_rows)
        if return_second:
            return labels, sq_dist, second
        return labels, sq_dist

    def sq_dist(self, X, labels, *, n_jobs=None):
        """Squared distance of each row of ``X`` to the code ``labels`` names."""
        if _sparse.is_sparse(X):
            return _sparse.by_chunks(
                lambda rows, codes: self._sq_dist_block(rows, None, codes), X, labels
            )
        return sq_dist_to_codes(X, self._codes_for(X.dtype), labels, n_jobs, self.scale)

    def _sq_dist_block(self, X, codes, labels):
        """Squared distances of a block of rows to their codes: dense rows
        against ``codes`` (:meth:`_codes_for`), sparse rows from their stored
        entries (:func:`skvq._sparse.sq_dist_to`)."""
        if _sparse.is_sparse(X):
            return _sparse.sq_dist_to(
                X, self.codebook64, labels, self.scale, self._scaled_code_sq
            )
        return _sq_dist_to(X, codes, labels, self.scale)

    @cached_property
    def _scaled_code_sq(self):
        """``||e * scale||^2`` of every code (float64)."""
        if self.scale == 1.0:
            return self._every_code_sq()
        codes = self.codebook64 * self.scale
        return np.einsum("ij,ij->i", codes, codes)

    def _every_code_sq(self):
        """``||e||^2`` of every code, duplicates included (float64, unscaled)."""
        if self.ids is None:
            return self._code_sq
        return np.einsum("ij,ij->i", self.codebook64, self.codebook64)

    @cached_property
    def codebook64(self):
        """The code book in float64 (every code, duplicates included)."""
        if self.ids is None:
            return self.codes64
        return self.codebook.astype(np.float64, copy=False)

    def _sparse_layout(self):
        """The :class:`_SparsePrep` of the distinct codes.  Built for each
        search and not kept: with many features its transposed codes may be
        a copy as large as the code book, and every state that a fit keeps
        would otherwise hold one."""
        return _SparsePrep(self.codes64, self.scale, self._code_sq)

    def _codes_for(self, dtype):
        """The code book (times ``scale``) for squared distances of rows of
        ``dtype`` (float64 when the index searches in float64 only)."""
        if self.float64_only:
            dtype = np.float64
        codes = self.codebook if self.scale == 1.0 else self.scaled_codebook
        return codes.astype(dtype, copy=False)

    def _brute_block(self, X, prep):
        """Nearest codes of a block, and lower bounds on the second distances."""
        n_rows, n_codes = X.shape[0], self.codes64.shape[0]
        if n_codes == 1:
            return np.zeros(n_rows, dtype=np.intp), np.full(n_rows, np.inf)
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            if _sparse.is_sparse(X):  # codes not centred (prep's center is 0)
                scores, x_sq = _sparse.scores(X, prep.codes_t, prep.code_sq, prep.scale)
                margin = prep.margin_of(x_sq)
                top = _best_two_by_row(scores)
            else:
                by_code = n_codes <= BY_CODE_MAX_CODES
                scores, centred = prep.scores(X, by_code=by_code)
                margin, x_sq = prep.margin(centred)
                if by_code:
                    top = _best_two_by_code(scores)
                    scores = scores.T  # a view, row by row
                else:
                    top = _best_two_by_row(scores)
            labels, best, second = top
            far = prep.far_rows(x_sq)
            # ||x - e||^2 = score + ||x - center||^2, each within margin / 2.
            lower = second.astype(np.float64)
            lower += x_sq
            lower -= 2.0 * margin
            # Exact ties and NaN (never outside the far rows) are unsure too.
            unsure = ~(second - best > margin)
            if far is not None:
                unsure &= ~far
            unsure = np.flatnonzero(unsure)
        if unsure.size:
            # The exact winner is among the codes within the error margin of
            # the computed best (the best itself was set to inf above).
            near = scores[unsure] <= (best[unsure] + margin[unsure])[:, None]
            near[np.arange(unsure.size), labels[unsure]] = True
            cand_rows, cand_cols = np.nonzero(near)
            found, _ = _ranked(X[unsure], self.codes64, cand_rows, cand_cols, 1)
            labels[unsure] = found[:, 0]
            lower[unsure] = 0.0
        if far is not None:
            labels[far] = _nearest_of_rows(X[far], self.codes64)
            lower[far] = 0.0
        clamp_negatives(lower)
        return labels, unscaled_sq(lower, prep.scale)

    def _line_block(self, X):
        """Nearest codes of a block of one-feature rows, and the exact
        squared distances to the second nearest (lower bounds)."""
        order, line = self._line
        n_codes = line.shape[0]
        with np.errstate(over="ignore", invalid="ignore"):
            # Rows beyond float64 at this scale tie at inf and go to the
            # exact check below.
            x = X[:, 0].astype(np.float64) * self.tree_scale
            # line[above - 1] < x <= line[above]: the nearest code is one of
            # these two, the second nearest one of the four from above - 2
            # to above + 1.
            above = np.searchsorted(line, x)
            near = above[:, None] + np.arange(-2, 2)
            valid = (near >= 0) & (near < n_codes)
            np.clip(near, 0, n_codes - 1, out=near)
            diff = line[near] - x[:, None]
            sq = diff * diff
        sq[~valid] = np.inf
        # The closer of the bracketing two, ties to the lower index.
        ids = order[near]
        take_above = (sq[:, 2] < sq[:, 1]) | (
            (sq[:, 2] == sq[:, 1]) & (ids[:, 2] < ids[:, 1])
        )
        labels = np.where(take_above, ids[:, 2], ids[:, 1])
        best = np.where(take_above, sq[:, 2], sq[:, 1])
        other = np.where(take_above, sq[:, 1], sq[:, 2])
        second = np.minimum(np.minimum(sq[:, 0], sq[:, 3]), other)
        # Rounded distances grow (weakly) away from x on either side, so the
        # minimum is bracketing; codes beyond may tie with it only where a
        # rounded distance equals it, and those rows are checked on all codes.
        ties = np.flatnonzero(second == best)
        if ties.size:
            labels[ties] = _exact_nearest(X[ties], self.codes64)
        return labels, unscaled_sq(second, self.tree_scale)

    def _kd_block(self, X, n_threads):
        """Nearest codes of a block, and lower bounds on the second distances."""
        if self.codes64.shape[0] == 1:
            return np.zeros(X.shape[0], dtype=np.intp), np.full(X.shape[0], np.inf)
        query = self._tree_query(X)
        dist, idx = self.tree.query(query, k=2, workers=n_threads)
        with np.errstate(over="ignore", invalid="ignore"):
            d1, d2 = dist[:, 0] ** 2, dist[:, 1] ** 2
            labels = idx[:, 0].astype(np.intp, copy=False)
            # cKDTree sums squared differences in float64: a relative gap
            # above this bound is a certain winner; anything closer is
            # re-checked.
            rel = self._tree_rel(X.shape[1])
            unsure = ~(d2 - d1 > rel * d2)
            lower = unscaled_sq(d2 * (1.0 - 2.0 * rel), self.tree_scale)
        if unsure.any():
            labels[unsure] = _exact_nearest(X[unsure], self.codes64)
            lower[unsure] = 0.0
        return labels, lower

    def _tree_query(self, X):
        if self.tree_scale == 1.0:
            return X
        return X.astype(np.float64) * self.tree_scale

    @staticmethod
    def _tree_rel(n_features):
        return 4 * (n_features + 4) * (np.finfo(np.float64).eps / 2)

    # -- k nearest codes ----------------------------------------------------
    def nearest_k(self, X, k, *, n_jobs=None):
        """The ``k`` nearest distinct codes of every row, nearest first.

        Exact: ranked by a direct float64 computation of the squared
        distance, ties to the lowest index; equal codes count once (the
        lowest index).  ``k`` is capped by the number of distinct codes.

        Returns
        -------
        labels : ndarray of shape (n_samples, k), dtype=intp
        sq_dist : ndarray of shape (n_samples, k), float64
        """
        found = self._k_nearest(X, k, n_jobs, bounded=False)
        return found.labels, found.sq_dist

    def nearest_k_bounded(self, X, k, *, n_jobs=None):
        """``k`` nearest distinct codes of every row by computed distance,
        with their squared distances known within a bound rather than
        computed exactly.

        The exact distances of ``k`` codes cost ``k`` float64 passes over
        the features; a caller that keeps only some of them (beam search)
        computes those alone.  Where the float32 product cannot tell the
        ``k``-th nearest code from the next (a few per cent of rows), the
        codes are left as computed and ``floor`` bounds the distance of
        those left out: the caller decides whether that can matter to it,
        and asks :meth:`nearest_k` for the rows where it does.

        Returns
        -------
        KNearest
        """
        return self._k_nearest(X, k, n_jobs, bounded=True)

    def _k_nearest(self, X, k, n_jobs, *, bounded):
        n_rows, n_distinct = X.shape[0], self.codes64.shape[0]
        k = min(k, n_distinct)
        labels = np.empty((n_rows, k), dtype=np.intp)
        sq_dist = np.empty((n_rows, k))
        slack = np.empty(n_rows)
        floor = np.empty(n_rows)
        threads = n_threads(n_jobs)
        if self._uses_tree():
            block = working_memory_rows(16 * (k + 1) + 8 * X.shape[1], n_rows)

            def search(rows):
                return self._kd_ranked(rows, k, threads)

            tasks = dict(n_threads=1, min_task_rows=n_rows)
        else:
            prep = self._prep(self._working_dtype(X.dtype))
            row_bytes = 2 * prep.dtype.itemsize * (n_distinct + X.shape[1] + 1)
            block = working_memory_rows(row_bytes, n_rows, threads)
            block = min(block, max(16, _BLOCK_ELEMENTS // n_distinct))

            def search(rows):
                return self._brute_ranked(rows, k, prep, bounded)

            tasks = dict(n_threads=threads, min_task_rows=TASK_ELEMENTS // n_distinct)

        def work(start, stop):
            for lo in range(start, stop, block):
                hi = min(lo + block, stop)
                found = search(X[lo:hi])
                labels[lo:hi], sq_dist[lo:hi] = found.labels, found.sq_dist
                slack[lo:hi], floor[lo:hi] = found.slack, found.floor

        run_tasks(work, n_rows, block, **tasks)
        if self.ids is not None:
            labels = self.ids[labels]
        return KNearest(labels, sq_dist, slack, floor)

    def _brute_ranked(self, X, k, prep, bounded=False):
        """The :class:`KNearest` of a block (:meth:`_k_nearest`): exact, or
        with ``bounded`` the codes of smallest computed distance, their
        bounds and the floors of the codes left out (0 and inf where they
        were computed exactly)."""
        n_rows, n_codes = X.shape[0], self.codes64.shape[0]
        if k == n_codes:
            rows = np.repeat(np.arange(n_rows), n_codes)
            cols = np.tile(np.arange(n_codes), n_rows)
            return _exactly(*_exact_ranked(X, self.codes64, rows, cols, k))
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            scores, centred = prep.scores(X)
            margin, x_sq = prep.margin(centred)
            far = prep.far_rows(x_sq)
            # The k best scores, one argmin pass each (the winners are then
            # masked): for a few codes of many, cheaper than a partition.
            flat = scores.reshape(-1)
            offsets = np.arange(0, n_rows * n_codes, n_codes)
            best = np.empty((n_rows, k), dtype=np.intp)
            best_scores = np.empty((n_rows, k), dtype=np.float64)
            for j in range(k):
                best[:, j] = scores.argmin(axis=1)
                best_scores[:, j] = flat.take(best[:, j] + offsets)
                flat.put(best[:, j] + offsets, np.inf)
            kth = best_scores[:, k - 1].astype(scores.dtype)
            # Every true k-th nearest code scores within the margin of the
            # computed k-th smallest score: a row whose other codes all lie
            # beyond it (its next smallest score, one more argmin pass: less
            # than half the time of counting the scores below it) has its k
            # nearest among ``best``.
            threshold = kth + margin
            following = flat.take(scores.argmin(axis=1) + offsets)
        unsure = following <= threshold
        labels = np.empty((n_rows, k), dtype=np.intp)
        sq_dist = np.empty((n_rows, k))
        slack = np.zeros(n_rows)
        floor = np.full(n_rows, np.inf)
        check = far if far is not None else np.zeros(n_rows, dtype=bool)
        if bounded:
            # ||x - e||^2 = score + ||x - center||^2, each within margin / 2
            # (rescaled units); twice that, for safety.  Where the k-th and
            # the next score lie within the margin, the codes left out score
            # at least ``following``: that bounds their distances.
            # (Far rows hold inf or NaN here: computed exactly below.)
            labels[...] = best
            with np.errstate(over="ignore", invalid="ignore"):
                np.add(best_scores, x_sq[:, None], out=sq_dist)
                np.multiply(margin, 2.0, out=slack)
                floor[unsure] = following[unsure] + x_sq[unsure] - slack[unsure]
            for bound in (sq_dist, slack, floor):
                unscaled_sq(bound, prep.scale)
        else:
            check = check | unsure  # a new array: ``far`` stays as it is
            sure = np.flatnonzero(~check)
            # Entries of these rows are bounded by their centred norms plus
            # the centre (working units: divided by the index's scale).
            magnitude = float(np.sqrt(x_sq[sure].max(initial=0.0))) / prep.scale
            magnitude += float(np.abs(self._center).max(initial=0.0))
            magnitude = max(magnitude, self._codes_max)
            labels[sure], sq_dist[sure] = _exact_ranked_rows(
                X[sure], self.codes64, best[sure], magnitude
            )
        exact = np.flatnonzero(check)
        if exact.size:
            # The masked winners and the codes within the margin.
            near = scores[exact] <= threshold[exact, None]
            near[np.arange(exact.size)[:, None], best[exact]] = True
            if far is not None:
                near[far[exact]] = True
            rows, cols = np.nonzero(near)
            labels[exact], sq_dist[exact] = _exact_ranked(
                X[exact], self.codes64, rows, cols, k
            )
            slack[exact], floor[exact] = 0.0, np.inf
        return KNearest(labels, sq_dist, slack, floor)

    def _kd_ranked(self, X, k, n_threads):
        n_rows, n_codes = X.shape[0], self.codes64.shape[0]
        n_query = min(k + 1, n_codes)
        dist, idx = self.tree.query(self._tree_query(X), k=n_query, workers=n_threads)
        dist, idx = dist.reshape(n_rows, n_query), idx.reshape(n_rows, n_query)
        sure = np.ones(n_rows, dtype=bool)
        if n_query > k:
            with np.errstate(over="ignore", invalid="ignore"):
                inner, outer = dist[:, k - 1] ** 2, dist[:, k] ** 2
                rel = self._tree_rel(X.shape[1])
                sure = outer - inner > rel * outer
        rows = np.repeat(np.flatnonzero(sure), k)
        cols = idx[sure, :k].reshape(-1).astype(np.intp)
        unsure = np.flatnonzero(~sure)
        if unsure.size:  # near ties at the k-th place: every code is a candidate
            rows = np.concatenate([rows, np.repeat(unsure, n_codes)])
            cols = np.concatenate([cols, np.tile(np.arange(n_codes), unsure.size)])
        return _exactly(*_exact_ranked(X, self.codes64, rows, cols, k))

    # -- all distances ----------------------------------------------------
    def distances(self, X, *, n_jobs=None):
        """Euclidean distances of every row to every code (all n_codes columns).

        Computed in float64 on centred (and, at extreme scales, rescaled)
        data and returned in ``X.dtype``.
        """
        n_rows, n_codes = X.shape[0], self.codebook.shape[0]
        out = np.empty((n_rows, n_codes), dtype=X.dtype)
        codes64 = self.codebook64
        if _sparse.is_sparse(X):
            prep = _SparsePrep(codes64, self.tree_scale, self._every_code_sq())
        else:
            prep = _BrutePrep(
                codes64, np.float64, self.tree_scale, codes64.mean(axis=0)
            )
        threads = n_threads(n_jobs)
        block = working_memory_rows(24 * n_codes, n_rows, threads)
        block = min(block, max(16, _BLOCK_ELEMENTS // n_codes))

        def work(start, stop):
            for lo in range(start, stop, block):
                hi = min(lo + block, stop)
                with np.errstate(over="ignore", invalid="ignore"):
                    if _sparse.is_sparse(X):
                        sq, x_sq = _sparse.scores(
                            X[lo:hi], prep.codes_t, prep.code_sq, prep.scale
                        )
                    else:
                        sq, centred = prep.scores(X[lo:hi], reuse=False)
                        x_sq = row_sq_norms(centred)
                    sq += x_sq[:, None]
                    clamp_negatives(sq)
                    np.sqrt(sq, out=sq)
                    if prep.scale != 1.0:
                        sq /= prep.scale
                    out[lo:hi] = sq

        run_tasks(work, n_rows, block, threads, TASK_ELEMENTS // n_codes)
        return out
