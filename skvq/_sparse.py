"""Sparse rows: the CSR counterparts of the kernels that read rows.

:class:`~skvq.VQCodebookTransformer` accepts SciPy sparse matrices and
arrays.  They are converted once to CSR in canonical form (sorted column
indices, no duplicates, no stored zeros: :func:`canonical_csr`) and never
densified whole.  The kernels that read rows call the functions here when
their rows are sparse; each says below how it differs from its dense
counterpart:

- Search: scores ``||e||^2 - 2 x.e`` are a sparse-times-dense product in
  float64, without centring (which would fill the rows), with the same
  rigorous error margin as the dense search (a sum of at most
  ``n_features`` products).  Rows whose best and second-best scores fall
  within the margin are densified, a few at a time, for the same exact
  float64 check: the codes are those of the dense search.
- Squared distances to given codes: ``||e||^2 - sum over the stored
  columns of e_j^2 + sum over them of (x_j - e_j)^2``, an O(nnz) sum whose
  absolute error is a few units of roundoff of ``||e||^2`` (the dense one
  is a direct sum of squared differences).
- Statistics: per-code sums by scattering the stored values onto their
  (code, column) cells in row order, stored column by column; a batch of
  few values keeps them scattered (:class:`ScatteredSums`) for its EMA
  step; feature moments from the stored values and the zeros' share.
- Row hashes and priorities (:mod:`skvq._rows`): the same numbers as for the
  dense rows (zeros add nothing to the stage hash, nor to a running sum in
  column order); equal rows are grouped (:func:`skvq._rows.group_rows`) by a
  hash of the stored (column, value) pairs.
- Seeding and splits: distances by products (``||x||^2 + ||c||^2 - 2 x.c``)
  rather than differences of centred rows.

All inputs are assumed validated: CSR in canonical form, finite values.
"""

import threading

import numpy as np
from scipy import sparse

from ._arrays import clamp_negatives

# Dense float64 values that an exact check densifies at once, at most.
_DENSE_ELEMENTS = 2**22
# Rows of a chunk of the passes over stored entries: their temporaries (a
# few arrays of one number per entry) stay bounded whatever the data.
CHUNK_ROWS = 2**14
# Stored values of a chunk of the per-code sums, about (their scatter makes
# a few temporaries of one number per value).
SUMS_CHUNK_VALUES = 2**18


def is_sparse(X):
    """Whether ``X`` is a SciPy sparse matrix or array (a NumPy array is
    told apart without the slower abstract-class check)."""
    return type(X) is not np.ndarray and sparse.issparse(X)


def canonical_csr(X):
    """``X`` as CSR with sorted indices, no duplicate entries and no stored
    zeros (equal rows then store equal entries); a copy only when ``X`` is
    not such a matrix already."""
    if X.format != "csr":
        X = X.tocsr()
    elif not X.has_canonical_format or np.any(X.data == 0):
        X = X.copy()
    X.sum_duplicates()
    X.eliminate_zeros()
    return X


def head(X, rows):
    """The first ``rows`` rows of ``X``: a view of its arrays for CSR."""
    if rows == X.shape[0]:
        return X
    if not is_sparse(X):
        return X[:rows]
    end = X.indptr[rows]
    return _csr_view(X, X.data[:end], X.indices[:end], X.indptr[: rows + 1])


def row_range(X, start, stop):
    """Rows ``start:stop`` of CSR ``X``, a view of its value arrays."""
    lo, hi = X.indptr[start], X.indptr[stop]
    return _csr_view(
        X, X.data[lo:hi], X.indices[lo:hi], X.indptr[start : stop + 1] - lo
    )


def _csr_view(X, data, indices, indptr):
    """A CSR matrix of ``X``'s type on the given parts of its arrays.

    Its arrays are set on an empty matrix of the right shape: given to the
    constructor, slices of less than half their array are copied (SciPy
    prunes views of much larger arrays), which for the rows of an early
    stage of ``fit`` meant a copy of them at every step.  The rows of
    canonical ``X`` are canonical.
    """
    view = type(X)((indptr.shape[0] - 1, X.shape[1]), dtype=X.dtype)
    view.data, view.indices, view.indptr = data, indices, indptr
    return view


_ZEROED = threading.local()


def _zeroed(name, size):
    """A per-thread float64 buffer of zeros that its users leave zero."""
    buffers = _ZEROED.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.shape[0] < size:
        buffer = buffers[name] = np.zeros(size)
    return buffer


def row_chunks(n_rows, chunk_rows=CHUNK_ROWS):
    """``(start, stop)`` of consecutive chunks of ``chunk_rows`` rows."""
    return [(lo, min(lo + chunk_rows, n_rows)) for lo in range(0, n_rows, chunk_rows)]


def by_chunks(func, X, *per_row):
    """``func(rows, *per_row slices)`` on chunks of rows of ``X``, the
    results (one number per row) concatenated."""
    n_rows = X.shape[0]
    if n_rows <= CHUNK_ROWS:
        return func(X, *per_row)
    return np.concatenate(
        [
            func(row_range(X, lo, hi), *(a[lo:hi] for a in per_row))
            for lo, hi in row_chunks(n_rows)
        ]
    )


def scaled(X, factor):
    """``X * factor`` (a new CSR sharing the index arrays)."""
    if factor == 1.0:
        return X
    with np.errstate(over="ignore", under="ignore"):
        cast = X.dtype.type(factor)
        if cast == factor:
            data = X.data * cast
        else:  # the factor leaves float32's range: through float64
            data = (X.data.astype(np.float64) * factor).astype(X.dtype)
    return type(X)((data, X.indices, X.indptr), shape=X.shape, copy=False)


def row_ids(X):
    """The row of each stored value."""
    return np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))


def row_sums(X, values, ids=None):
    """Per-row sums of ``values`` (one per stored entry), in column order
    (``ids``: :func:`row_ids`, when already known)."""
    ids = row_ids(X) if ids is None else ids
    return np.bincount(ids, weights=values, minlength=X.shape[0])


def row_sq_norms(X):
    """``||x||^2`` of every row, in float64."""
    data = X.data.astype(np.float64)
    return row_sums(X, data * data)


def row_abs_max(X):
    """The largest magnitude of every row (0 for empty rows)."""
    out = np.zeros(X.shape[0])
    filled = np.flatnonzero(np.diff(X.indptr))
    if filled.size:
        out[filled] = np.maximum.reduceat(np.abs(X.data), X.indptr[filled])
    return out


def row_wrapping_sums(X, values):
    """Per-row sums of unsigned-integer ``values`` (one per stored entry),
    wrapping around as integer arithmetic does: exact in any order."""
    out = np.zeros(X.shape[0], dtype=values.dtype)
    filled = np.flatnonzero(np.diff(X.indptr))
    if filled.size:
        out[filled] = np.add.reduceat(values, X.indptr[filled], dtype=values.dtype)
    return out


def running_row_sums(X, terms):
    """Per row, the sum of its ``terms`` (one per stored entry) added one at
    a time in column order: the same roundings as adding a dense row's
    terms in column order (a zero term leaves a running sum unchanged)."""
    n_rows = X.shape[0]
    counts = np.diff(X.indptr)
    order = np.argsort(-counts, kind="stable")  # rows by decreasing length
    starts = X.indptr[:-1][order]
    lengths = counts[order]
    total = np.zeros(n_rows)
    for k in range(int(lengths.max(initial=0))):
        active = np.searchsorted(-lengths, -k, side="left")  # rows longer than k
        total[:active] += terms[starts[:active] + k]
    out = np.empty(n_rows)
    out[order] = total
    return out


# ----------------------------------------------------------------- search
def scores(X, codes_t, code_sq, scale):
    """``||e||^2 - 2 x.e`` of every row and code and ``||x||^2``, for the
    rows times ``scale``; float64.  ``codes_t``: the transposed codes
    (C-contiguous, times ``scale``), ``code_sq`` their squared norms.

    ``-2 (x.e)`` has the bits of ``x.(-2 e)``, the dense layout's product
    (doubling is exact at every partial sum), except where terms fall into
    the subnormal range: their rounding doubles too, one subnormal spacing
    a term, which the bound's absolute term covers.
    """
    X = scaled(X.astype(np.float64, copy=False), scale)
    out = np.asarray(X @ codes_t)
    out *= -2.0
    out += code_sq
    return out, row_sq_norms(X)


def exact_ranked(X, codes64, rows, cols, k, ranker):
    """``ranker`` (the dense exact ranking of candidate ``(row, code)``
    pairs) on sparse ``X``, densifying a few rows at a time.

    Returns the ``k`` best codes of every row of ``X`` that has candidates,
    rows in ascending order, and their squared distances.
    """
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    present = np.unique(rows)
    per_block = max(1, _DENSE_ELEMENTS // max(1, X.shape[1]))
    labels, sq = [], []
    for start in range(0, present.shape[0], per_block):
        chosen = present[start : start + per_block]
        dense = X[chosen].toarray()
        lo, hi = np.searchsorted(rows, [chosen[0], chosen[-1] + 1])
        local = np.searchsorted(chosen, rows[lo:hi])
        found, dist = ranker(dense, codes64, local, cols[lo:hi], k)
        labels.append(found)
        sq.append(dist)
    return np.concatenate(labels), np.concatenate(sq)


def map_dense_rows(X, func):
    """``func`` (an array per row) on the rows of sparse ``X``, densified a
    few at a time, concatenated."""
    per_block = max(1, _DENSE_ELEMENTS // max(1, X.shape[1]))
    parts = [
        func(X[start : start + per_block].toarray())
        for start in range(0, X.shape[0], per_block)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.intp)


def sq_dist_to(X, codes64, labels, scale=1.0, code_sq=None):
    """``||x - e||^2`` of every row and its code ``labels`` (float64, in the
    units of ``X``), from the stored entries (module docstring).

    ``code_sq``: the codes' ``||e||^2`` times ``scale ** 2``, when known.
    """
    data = X.data.astype(np.float64)
    codes = codes64
    if scale != 1.0:
        data *= scale
        codes = codes64 * scale
    if code_sq is None:
        code_sq = np.einsum("ij,ij->i", codes, codes)
    ids = row_ids(X)
    chosen = codes[labels[ids], X.indices]
    code_sq = code_sq[labels]
    with np.errstate(over="ignore", invalid="ignore"):
        diff = data - chosen
        sq = code_sq - row_sums(X, chosen * chosen, ids)
        clamp_negatives(sq)
        sq += row_sums(X, diff * diff, ids)
    if scale != 1.0:
        with np.errstate(over="ignore", under="ignore"):
            sq /= scale
            sq /= scale
    return sq


# ------------------------------------------------------------- statistics
def code_sums(X, labels, sample_weight, n_codes):
    """``sum of w_i x_i`` over the rows of each code (float64, dense), stored
    column by column (Fortran order): an EMA step keeps the layout of the
    sums it adds (:func:`skvq._kernels.ema_update`), so a sparse stream's
    code book stays transposed the way its sparse product reads it
    (:class:`skvq._search.CodebookIndex`), without a copy a step.  Rows of
    few stored values give :class:`ScatteredSums` instead."""
    # The stored values scattered onto (code, column) in row order, chunk by
    # chunk: the same sums as one pass, with bounded temporaries.  The first
    # chunk by np.bincount, which also allocates the sums; the next ones by
    # np.add.at into them (16,384 TF-IDF rows, 100 x 20,000 cells: 6.0 ms and
    # 7.4 ms, where a bincount per chunk also adds a pass over the sums, and
    # the sparse product with the assignment takes 13.8 ms).
    n_features = X.shape[1]
    if X.nnz * FEW_VALUES_SHARE <= n_codes * n_features:
        cells, values = _scattered(X, labels, sample_weight, n_codes)
        return ScatteredSums(cells, values, n_codes, n_features)
    # Chunks of about SUMS_CHUNK_VALUES stored values: their temporaries
    # (five or six numbers per value) stay small beside the sums.
    per_row = X.nnz / max(1, X.shape[0])
    chunk_rows = int(min(CHUNK_ROWS, max(1, SUMS_CHUNK_VALUES // max(1.0, per_row))))
    chunks = row_chunks(X.shape[0], chunk_rows)
    if not chunks:
        return np.zeros((n_codes, n_features), order="F")

    def scattered(lo, hi):
        return _scattered(
            row_range(X, lo, hi), labels[lo:hi], sample_weight[lo:hi], n_codes
        )

    cells, values = scattered(*chunks[0])
    sums = np.bincount(cells, weights=values, minlength=n_codes * n_features)
    for lo, hi in chunks[1:]:
        np.add.at(sums, *scattered(lo, hi))
    return sums.reshape(n_features, n_codes).T


def _scattered(X, labels, sample_weight, n_codes):
    """The cells (``column * n_codes + code``) of the stored values of ``X``
    and their weighted values, in row order."""
    ids = row_ids(X)
    cells = np.multiply(X.indices, n_codes, dtype=np.intp)
    cells += labels[ids]
    return cells, sample_weight[ids] * X.data


# Sums of fewer stored values than an eighth of the code book's cells stay
# scattered (ScatteredSums): an EMA step then adds them cell by cell
# instead of making and reading a dense array the size of the code book.
FEW_VALUES_SHARE = 8


class ScatteredSums:
    """Per-code sums of a few sparse rows, as the cells their stored values
    fall on: what :func:`code_sums` returns when the rows hold fewer values
    than an eighth of the code book (a stream's batch of wide rows).

    An EMA step adds them to the cells they touch
    (:meth:`add_scaled_to`, see :func:`skvq._kernels.ema_average`);
    anything else sees the dense sums, stored column by column:
    ``np.asarray``, ``+`` and ``*`` give them.
    """

    dtype = np.dtype(np.float64)
    __array_ufunc__ = None  # ndarray + ScatteredSums: our __radd__

    def __init__(self, cells, values, n_codes, n_features):
        self.cells, self.values = cells, values
        self.shape = (n_codes, n_features)

    def toarray(self):
        """The dense sums, stored column by column."""
        n_codes, n_features = self.shape
        size = n_codes * n_features
        sums = np.bincount(self.cells, weights=self.values, minlength=size)
        return sums.reshape(n_features, n_codes).T

    def __array__(self, dtype=None, copy=None):
        return self.toarray() if dtype is None else self.toarray().astype(dtype)

    def __add__(self, other):
        return self.toarray() + np.asarray(other)

    __radd__ = __add__

    def __mul__(self, factor):
        return self.toarray() * factor

    __rmul__ = __mul__

    def add_scaled_to(self, flat, factor):
        """``flat[cell] += factor * (sum of the values on cell)`` for every
        cell touched, ``flat`` being sums stored column by column, flattened.
        A cell's sum adds its values in row order, as :func:`numpy.bincount`
        does, so the result equals adding ``factor`` times the dense sums
        wherever they are not zero."""
        totals = _zeroed("scattered-totals", flat.shape[0])
        try:
            np.add.at(totals, self.cells, self.values)
            flat[self.cells] += factor * totals[self.cells]
        finally:
            totals[self.cells] = 0.0  # the buffer stays zero between uses


def moments(X, sample_weight):
    """Weighted mean and sum of squared deviations per feature (no
    cancellation: the zeros contribute ``mean^2`` times their weight), of
    rows of positive total weight."""
    total = float(sample_weight.sum())
    cols = X.indices
    weights = sample_weight[row_ids(X)]
    n_features = X.shape[1]
    mean = np.bincount(cols, weights=weights * X.data, minlength=n_features) / total
    deviation = X.data - mean[cols]
    stored = np.bincount(cols, weights=weights, minlength=n_features)
    deviation *= deviation
    m2 = np.bincount(cols, weights=weights * deviation, minlength=n_features)
    m2 += np.maximum(total - stored, 0.0) * mean * mean
    return total, mean, m2


def sq_dist_to_vectors(points, vectors):
    """``||p - v||^2`` of every row of ``points`` (sparse) and every row of
    ``vectors`` (dense), shape ``(n_points, n_vectors)``, by products."""
    products = np.asarray(points @ vectors.T)
    d = -2.0 * products
    d += row_sq_norms(points)[:, None]
    d += np.einsum("ij,ij->i", vectors, vectors)
    clamp_negatives(d)
    return d


# ------------------------------------------------------- rows as a set
def row_bytes(rows, i):
    """The stored columns and values of row ``i``, as bytes (equal rows,
    in canonical form, give equal bytes)."""
    lo, hi = rows.indptr[i], rows.indptr[i + 1]
    return rows.indices[lo:hi].tobytes() + rows.data[lo:hi].tobytes()


def groups_by_bytes(rows):
    """First index of each group of equal rows, and each row's group, by
    exact comparison (first rows in ascending order)."""
    seen, first = {}, []
    inverse = np.empty(rows.shape[0], dtype=np.intp)
    for i in range(rows.shape[0]):
        group = seen.setdefault(row_bytes(rows, i), len(first))
        if group == len(first):
            first.append(i)
        inverse[i] = group
    return np.asarray(first, dtype=np.intp), inverse


def tie_ranks(rows, key):
    """Ranks that order the rows of equal ``key`` lexicographically (0 for
    the others), densifying those rows alone."""
    rank = np.zeros(rows.shape[0])
    order = np.argsort(key, kind="stable")
    equal = key[order[1:]] == key[order[:-1]]
    tied = np.unique(np.concatenate([order[1:][equal], order[:-1][equal]]))
    dense = rows[tied].toarray()
    columns = tuple(dense[:, j] for j in reversed(range(dense.shape[1])))
    rank[tied[np.lexsort(columns)]] = np.arange(tied.shape[0])
    return rank


def vstack(parts):
    """Rows of sparse ``parts`` one after the other (CSR)."""
    return sparse.vstack(parts, format="csr")
