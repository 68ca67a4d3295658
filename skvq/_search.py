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
  error of the product.  The answer is therefore the code that a direct
  float64 computation of ``sum((x - e) ** 2)`` returns, whatever the block
  size or the number of threads.
- ``"kd_tree"`` queries a :class:`scipy.spatial.cKDTree` for the two nearest
  codes and sends near ties to the same exact re-check.

Duplicate code vectors (possible after initialising from fewer distinct
samples than codes) are searched once: a sample always maps to the lowest
index among equal codes, so results never depend on how rows are grouped.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from joblib import effective_n_jobs
from scipy.spatial import cKDTree
from sklearn import get_config
from threadpoolctl import threadpool_limits

# Elements of one block of the distance matrix in the brute backend: small
# enough to stay in a core's cache, large enough to amortise the BLAS call.
_BLOCK_ELEMENTS = 2**17
# Elements of the temporary (rows, codes, features) array in the exact check.
_EXACT_ELEMENTS = 2**21


def _distinct_code_ids(codebook):
    """Return the ascending first indices of distinct codes, or None.

    ``None`` means every code is distinct (the common case, detected with one
    pass: equal rows give equal keys, because every row is reduced the same
    way).
    """
    probe = np.linspace(1.0, 2.0, codebook.shape[1])
    key = (codebook * probe).sum(axis=1)
    key.sort()
    if not np.any(key[1:] == key[:-1]):
        return None
    _, first = np.unique(codebook, axis=0, return_index=True)
    if first.shape[0] == codebook.shape[0]:
        return None
    return np.sort(first)


def _exact_nearest(X, codes64):
    """Nearest code by direct float64 differences; ties go to the lowest index."""
    n_codes, n_features = codes64.shape
    labels = np.empty(X.shape[0], dtype=np.intp)
    step = max(1, _EXACT_ELEMENTS // max(1, n_codes * n_features))
    for start in range(0, X.shape[0], step):
        rows = X[start : start + step].astype(np.float64)
        diff = rows[:, None, :] - codes64[None, :, :]
        labels[start : start + step] = np.einsum("ijk,ijk->ij", diff, diff).argmin(1)
    return labels


def _sq_dist_to(X, codes64, labels):
    """Squared Euclidean distance of each row to its code, in float64."""
    diff = X.astype(np.float64) - codes64[labels]
    return np.einsum("ij,ij->i", diff, diff)


def _working_memory_rows(row_bytes, n_rows):
    """Rows whose temporaries fit in scikit-learn's ``working_memory`` (MiB)."""
    budget = get_config()["working_memory"] * 2**20
    return int(max(1, min(n_rows, budget // max(1, row_bytes))))


def _n_threads(n_jobs):
    return max(1, effective_n_jobs(n_jobs))


def _run_blocks(func, n_rows, block_rows, n_threads):
    """Call ``func(start, stop)`` on consecutive row blocks, maybe in threads.

    ``func`` writes its results into preallocated arrays, so the outcome does
    not depend on the order in which blocks finish.
    """
    bounds = [(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)]
    if n_threads == 1 or len(bounds) == 1:
        for start, stop in bounds:
            func(start, stop)
        return
    # NumPy and BLAS release the GIL; one BLAS thread per worker avoids
    # oversubscribing the cores.
    with threadpool_limits(limits=1, user_api="blas"):
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(lambda b: func(*b), bounds))


class _BrutePrep:
    """Centred, pre-scaled distinct codes for one working dtype."""

    def __init__(self, codes64, dtype):
        self.dtype = np.dtype(dtype)
        self.center = codes64.mean(axis=0).astype(self.dtype)
        centred = codes64 - self.center
        # -2 * e is exact in floating point, so the product gives -2 x.e.
        self.minus_2e_t = np.ascontiguousarray((-2.0 * centred).astype(self.dtype).T)
        self.e_sq = np.einsum("ij,ij->i", centred, centred).astype(self.dtype)
        self.e_max = float(np.sqrt(self.e_sq.max(initial=0.0)))
        # Rigorous bound factor on the error of one entry of ||e||^2 - 2 x.e:
        # the product contributes gamma_C ||x|| ||e||, the centring and the
        # roundings of the sums a few unit roundoffs more.
        unit = np.finfo(self.dtype).eps / 2
        self.kappa = (2 * codes64.shape[1] + 16) * unit


class _CodebookIndex:
    """Search structure for one code book, rebuilt whenever the code book changes.

    Parameters
    ----------
    codebook : ndarray of shape (n_codes, n_features)
        The code vectors, float32 or float64.
    algorithm : {"kd_tree", "brute"}
        The resolved backend.
    """

    def __init__(self, codebook, algorithm):
        self.algorithm = algorithm
        self.n_codes = codebook.shape[0]
        self.ids = _distinct_code_ids(codebook)
        distinct = codebook if self.ids is None else codebook[self.ids]
        self.codes64 = distinct.astype(np.float64)
        self.full64 = codebook.astype(np.float64)
        self._full_prep = _BrutePrep(self.full64, np.float64)
        if algorithm == "kd_tree":
            self._tree = cKDTree(self.codes64)
        else:
            self._prep = {
                np.dtype(dt): _BrutePrep(self.codes64, dt)
                for dt in (np.float32, np.float64)
            }

    # -- nearest code -----------------------------------------------------
    def nearest(self, X, *, n_jobs=None, return_sq_dist=False):
        """Index of the nearest code of every row (and its squared distance).

        Returns
        -------
        labels : ndarray of shape (n_samples,), dtype=intp
        sq_dist : ndarray of shape (n_samples,), float64, or None
        """
        n = X.shape[0]
        labels = np.empty(n, dtype=np.intp)
        sq_dist = np.empty(n, dtype=np.float64) if return_sq_dist else None
        n_threads = _n_threads(n_jobs)
        if self.algorithm == "kd_tree":
            search = self._kd_block
            row_bytes = 8 * X.shape[1] + 64
            threads_inside, threads_outside = n_threads, 1
        else:
            search = self._brute_block
            row_bytes = 3 * X.itemsize * self.codes64.shape[0] + 8 * X.shape[1]
            threads_inside, threads_outside = 1, n_threads
        block = self._block_rows(n, row_bytes, self.algorithm == "brute")

        def work(start, stop):
            rows = X[start:stop]
            found = search(rows, threads_inside)
            labels[start:stop] = found if self.ids is None else self.ids[found]
            if sq_dist is not None:
                sq_dist[start:stop] = _sq_dist_to(rows, self.codes64, found)

        _run_blocks(work, n, block, threads_outside)
        return labels, sq_dist

    def _block_rows(self, n_rows, row_bytes, cache_sized):
        rows = _working_memory_rows(row_bytes, n_rows)
        if cache_sized:
            rows = min(rows, max(64, _BLOCK_ELEMENTS // self.codes64.shape[0]))
        return max(1, rows)

    def _brute_block(self, X, n_threads):
        prep = self._prep[np.dtype(np.result_type(X.dtype, np.float32))]
        centred = X.astype(prep.dtype, copy=False) - prep.center
        scores = centred @ prep.minus_2e_t
        scores += prep.e_sq
        rows = np.arange(X.shape[0])
        labels = scores.argmin(axis=1)
        best = scores[rows, labels]
        if scores.shape[1] == 1:
            return labels
        scores[rows, labels] = np.inf
        second = scores.min(axis=1)
        x_norm = np.sqrt(np.einsum("ij,ij->i", centred, centred, dtype=np.float64))
        bound = prep.kappa * (x_norm + prep.e_max) ** 2
        unsure = ~(second - best > 2.0 * bound)
        if unsure.any():
            labels[unsure] = _exact_nearest(X[unsure], self.codes64)
        return labels

    def _kd_block(self, X, n_threads):
        if self.codes64.shape[0] == 1:
            return np.zeros(X.shape[0], dtype=np.intp)
        dist, idx = self._tree.query(X, k=2, workers=n_threads)
        d1, d2 = dist[:, 0] ** 2, dist[:, 1] ** 2
        labels = idx[:, 0].astype(np.intp, copy=False)
        # cKDTree sums squared differences in float64: a relative gap above
        # this bound is a certain winner; anything closer is re-checked.
        unit = np.finfo(np.float64).eps / 2
        unsure = ~(d2 - d1 > 4 * (X.shape[1] + 4) * unit * d2)
        if unsure.any():
            labels[unsure] = _exact_nearest(X[unsure], self.codes64)
        return labels

    # -- all distances ----------------------------------------------------
    def distances(self, X, *, n_jobs=None):
        """Euclidean distances of every row to every code (all n_codes columns).

        Computed in float64 on centred data and returned in ``X.dtype``.
        """
        n, k = X.shape[0], self.n_codes
        out = np.empty((n, k), dtype=X.dtype)
        prep = self._full_prep
        block = _working_memory_rows(24 * k, n)
        block = min(block, max(64, _BLOCK_ELEMENTS // k))

        def work(start, stop):
            centred = X[start:stop].astype(np.float64) - prep.center
            sq = centred @ prep.minus_2e_t
            sq += prep.e_sq
            sq += np.einsum("ij,ij->i", centred, centred)[:, None]
            np.maximum(sq, 0.0, out=sq)
            out[start:stop] = np.sqrt(sq, out=sq)

        _run_blocks(work, n, block, _n_threads(n_jobs))
        return out
