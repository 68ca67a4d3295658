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

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree
from sklearn import get_config
from threadpoolctl import ThreadpoolController

from ._rows import group_rows

# Elements of one block of the score matrix in the brute backend.  At 2**20
# (4 MiB of float32 scores) the product and the two argmin passes cost no
# more than at 2**18 on one thread, and four times fewer NumPy calls under
# the GIL let two threads scale at 3 features (27 ms instead of 49 for
# 200,000 rows and 256 codes; docs/performance.rst).
_BLOCK_ELEMENTS = 2**20
# Score elements of the smallest task handed to another thread: below this,
# dispatching costs more than it saves.
_TASK_ELEMENTS = 2**19
# Elements of the temporary (rows, codes, features) array in the exact check.
_EXACT_ELEMENTS = 2**21


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
    if not np.any(key[1:] == key[:-1]):
        return None
    _, first, _ = group_rows(codebook)
    if first.shape[0] == codebook.shape[0]:
        return None
    return np.sort(first)


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


def _exact_among(X, codes64, rows, cols):
    """Exact nearest code of each row of ``X`` among candidate (row, code) pairs.

    ``rows`` and ``cols`` list the candidate pairs, every row of ``X`` at least
    once; ties go to the lowest code index.
    """
    diff = X[rows].astype(np.float64) - codes64[cols]
    sq = np.einsum("ij,ij->i", diff, diff)
    order = np.lexsort((cols, sq, rows))
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = rows[order[1:]] != rows[order[:-1]]
    return cols[order[first]]


_SCRATCH = threading.local()


def _scratch(name, shape, dtype):
    """A per-thread reusable buffer: fresh large temporaries page-fault."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, np.dtype(dtype))
    buf = buffers.get(key)
    size = shape[0] * shape[1]
    if buf is None or buf.size < size:
        buf = buffers[key] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def _sq_dist_to(X, codes, labels):
    """Squared Euclidean distance of each row to its code, as float64.

    Differences are taken in the working dtype (exact for nearby values),
    so float32 data gets float32 relative accuracy without cancellation.
    """
    diff = _scratch("difference", X.shape, X.dtype)
    np.take(codes, labels, axis=0, out=diff)
    np.subtract(X, diff, out=diff)
    return np.einsum("ij,ij->i", diff, diff).astype(np.float64, copy=False)


def sq_dist_to_codes(X, codes, labels, n_jobs=None):
    """``_sq_dist_to`` in blocks of fixed size, on ``n_jobs`` threads."""
    out = np.empty(X.shape[0], dtype=np.float64)
    # Blocks of 2**16 values stay in cache through the gather, the
    # difference and the sum.
    block = max(1, 2**16 // max(1, X.shape[1]))

    def work(start, stop):
        for lo in range(start, stop, block):
            hi = min(lo + block, stop)
            out[lo:hi] = _sq_dist_to(X[lo:hi], codes, labels[lo:hi])

    _run_tasks(work, X.shape[0], block, _n_threads(n_jobs), 4 * block)
    return out


def _working_memory_rows(row_bytes, n_rows, n_threads=1):
    """Rows whose temporaries, in each of ``n_threads``, fit ``working_memory``."""
    budget = get_config()["working_memory"] * 2**20 / max(1, n_threads)
    return int(max(1, min(n_rows, budget // max(1, row_bytes))))


@lru_cache(maxsize=1)
def _blas_controller():
    # Inspecting the loaded libraries is slow (~0.1 ms): do it once.
    return ThreadpoolController().select(user_api="blas")


class _BlasHold:
    """Hold every BLAS library to one thread while any search of ours runs.

    ``threadpoolctl``'s context managers save and restore the limits around
    one block of code, so overlapping uses from several user threads can
    restore each other's "1" and leave the process limited.  This hold is
    reference-counted instead: the first search to enter saves the limits
    and sets them to 1, the last to leave restores what the first saved.
    Between the two, :func:`_default_threads` reads the saved limits, so
    concurrent searches still use the whole machine.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None

    def limits(self):
        """The BLAS limits that the user set (not our temporary hold)."""
        with self._lock:
            if self._saved is not None:
                return [n for _, n in self._saved]
        return [lib.num_threads for lib in _blas_controller().lib_controllers]

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                libs = _blas_controller().lib_controllers
                self._saved = [(lib, lib.num_threads) for lib in libs]
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(n)
                self._saved = None


_BLAS_HOLD = _BlasHold()


@contextmanager
def blas_held(n_jobs, n_scores):
    """Hold BLAS to one thread for a whole computation that uses our threads.

    OpenBLAS's own threads spin for a while after each multithreaded call;
    a BLAS call of the calling thread between two parallel searches would
    leave them spinning on the cores that the next search needs.  Nothing is
    held with one thread in all, or when searches of ``n_scores`` row-code
    pairs are too small to share (BLAS's threads then do the work).
    """
    if _n_threads(n_jobs) > 1 and n_scores >= 2 * _TASK_ELEMENTS:
        with _BLAS_HOLD:
            yield
    else:
        yield


@lru_cache(maxsize=1)
def _n_cores():
    # os.cpu_count() costs tens of microseconds here: ask once.
    return os.cpu_count() or 1


def _default_threads():
    """All cores, capped as threadpoolctl caps BLAS (``threadpool_limits``)."""
    return max(1, min([_n_cores(), *_BLAS_HOLD.limits()]))


def _n_threads(n_jobs):
    """Threads for ``n_jobs``: None follows the BLAS limits, negative values
    count from all cores."""
    if n_jobs is None:
        return _default_threads()
    if n_jobs < 0:
        return max(1, _n_cores() + 1 + n_jobs)
    return max(1, n_jobs)


_POOL_LOCK = threading.Lock()
_POOL = {}


def _thread_pool(n_threads):
    """A persistent pool: creating threads for every small call costs ~0.1 ms."""
    with _POOL_LOCK:
        pool = _POOL.get(n_threads)
        if pool is None:
            pool = _POOL[n_threads] = ThreadPoolExecutor(max_workers=n_threads)
        return pool


def _run_tasks(func, n_rows, block_rows, n_threads, min_task_rows):
    """Call ``func(start, stop)`` on consecutive row ranges, in ``n_threads``.

    The rows are cut into at most ``2 * n_threads`` tasks (each at least
    ``min_task_rows`` rows, so that small calls stay in the calling thread),
    of whole blocks of ``block_rows`` when there are enough rows, handed to a
    persistent pool.  ``func`` writes into preallocated arrays, so the
    outcome does not depend on the threads.  While the pool works, BLAS is
    held to one thread per worker (NumPy and BLAS release the GIL), which
    avoids oversubscribing the cores.
    """
    n_tasks = min(2 * n_threads, max(1, n_rows // max(1, min_task_rows)))
    if n_threads <= 1 or n_tasks <= 1:
        func(0, n_rows)
        return
    per_task = -(-n_rows // n_tasks)
    if per_task > block_rows:
        per_task = -(-per_task // block_rows) * block_rows
    bounds = [(s, min(s + per_task, n_rows)) for s in range(0, n_rows, per_task)]
    with _BLAS_HOLD:
        pool = _thread_pool(min(n_threads, len(bounds)))
        for future in [pool.submit(func, *b) for b in bounds]:
            future.result()


class _BrutePrep:
    """Centred codes for one working dtype, laid out for one BLAS product.

    ``product`` has shape ``(n_features + 1, n_codes)``: its first rows hold
    ``-2 e`` and its last row ``||e||^2`` (codes centred), so that
    ``[x - center, 1] @ product`` is ``||e||^2 - 2 x.e`` in a single call.
    Writing ``[x - center, 1]`` costs no more than the copy that the ones
    column needs anyway, and it removes the cancellation of the expansion far
    from the origin.
    """

    def __init__(self, codes64, dtype):
        self.dtype = np.dtype(dtype)
        n_codes, n_features = codes64.shape
        self.center = codes64.mean(axis=0).astype(self.dtype)
        centred = codes64 - self.center
        e_sq = np.einsum("ij,ij->i", centred, centred)
        # -2 * e is exact in floating point.
        self.product = np.empty((n_features + 1, n_codes), dtype=self.dtype)
        np.multiply(centred.T, -2.0, out=self.product[:n_features], casting="same_kind")
        self.product[n_features] = e_sq
        self.e_max = float(np.sqrt(e_sq.max(initial=0.0)))
        # Rigorous bound factor on the error of one entry of ||e||^2 - 2 x.e,
        # and of the difference of two entries: the product contributes
        # gamma_C ||x|| ||e||, the centring, the casts and the sums a few unit
        # roundoffs of (||x|| + max ||e||)^2 more.
        unit = np.finfo(self.dtype).eps / 2
        self.kappa = (2 * n_features + 16) * unit

    def scores(self, X, *, scratch=True):
        """``(||e||^2 - 2 (x - center).e, x - center)`` for a block of rows.

        With ``scratch``, both live in per-thread buffers that the next call
        overwrites.
        """
        n_rows, n_features = X.shape
        shape_a, shape_s = (n_rows, n_features + 1), (n_rows, self.product.shape[1])
        if scratch:
            augmented = _scratch("augmented", shape_a, self.dtype)
            scores = _scratch("scores", shape_s, self.dtype)
        else:
            augmented = np.empty(shape_a, dtype=self.dtype)
            scores = np.empty(shape_s, dtype=self.dtype)
        centred = augmented[:, :n_features]
        np.subtract(X, self.center, out=centred)
        augmented[:, n_features] = 1.0
        return np.matmul(augmented, self.product, out=scores), centred

    def margin(self, centred):
        """Per row: a bound on the rounding error of a difference of two scores,
        and ``||x - center||^2``."""
        x_sq = np.einsum("ij,ij->i", centred, centred)
        margin = np.sqrt(x_sq)
        margin += self.e_max
        margin *= margin
        margin *= 2.0 * self.kappa
        return margin, x_sq


class _CodebookIndex:
    """Search structure for one code book, rebuilt whenever the code book changes.

    Parameters
    ----------
    codebook : ndarray of shape (n_codes, n_features)
        The code vectors, float32 or float64.
    algorithm : {"auto", "kd_tree", "brute"}
        The backend; ``"auto"`` applies :func:`kd_tree_pays_off`.
    """

    def __init__(self, codebook, algorithm):
        self.codebook = codebook
        self.ids = _distinct_code_ids(codebook)
        distinct = codebook if self.ids is None else codebook[self.ids]
        self.codes64 = distinct.astype(np.float64)
        n_distinct, n_features = self.codes64.shape
        self._tree = self._prep = None
        self._algorithm = algorithm
        if algorithm != "kd_tree":
            self._prep = _BrutePrep(self.codes64, codebook.dtype)

    def _uses_tree(self):
        """Whether queries go to the k-d tree (built on first use)."""
        if self._algorithm == "brute":
            return False
        n_distinct, n_features = self.codes64.shape
        use = self._algorithm == "kd_tree" or kd_tree_pays_off(n_features, n_distinct)
        if use and self._tree is None:
            self._tree = cKDTree(self.codes64)
        return use

    # -- nearest code -----------------------------------------------------
    def nearest(self, X, *, n_jobs=None, return_sq_dist=False, return_second=False):
        """Index of the nearest code of every row (and its squared distance).

        With ``return_second``, also a lower bound on the squared distance of
        each row to every code but its own (0 where none is known: near
        ties, duplicate codes), which :class:`LloydBounds` uses to skip rows.

        Returns
        -------
        labels : ndarray of shape (n_samples,), dtype=intp
        sq_dist : ndarray of shape (n_samples,), float64, or None
        second : ndarray of shape (n_samples,), float64 (only with
            ``return_second``)
        """
        n_rows, n_distinct = X.shape[0], self.codes64.shape[0]
        labels = np.empty(n_rows, dtype=np.intp)
        sq_dist = np.empty(n_rows, dtype=np.float64) if return_sq_dist else None
        second = np.zeros(n_rows) if return_second else None
        n_threads = _n_threads(n_jobs)
        if return_sq_dist:
            codes = self.codes64.astype(X.dtype, copy=False)
        if self._uses_tree():
            block = _working_memory_rows(8 * X.shape[1] + 64, n_rows)

            def search(rows):
                return self._kd_block(rows, n_threads)

            tasks = dict(n_threads=1, min_task_rows=n_rows)
        else:
            prep = self._prep
            if prep.dtype != X.dtype:
                prep = _BrutePrep(self.codes64, X.dtype)
            row_bytes = X.itemsize * (n_distinct + X.shape[1] + 1)
            block = _working_memory_rows(row_bytes, n_rows, n_threads)
            block = min(block, max(16, _BLOCK_ELEMENTS // n_distinct))

            def search(rows):
                return self._brute_block(rows, prep)

            tasks = dict(
                n_threads=n_threads, min_task_rows=_TASK_ELEMENTS // n_distinct
            )

        def work(start, stop):
            for lo in range(start, stop, block):
                hi = min(lo + block, stop)
                rows = X[lo:hi]
                found, lower = search(rows)
                if self.ids is None:
                    labels[lo:hi] = found
                    if second is not None:
                        second[lo:hi] = lower
                else:  # duplicate codes tie with the winner: no bound
                    labels[lo:hi] = self.ids[found]
                if sq_dist is not None:
                    sq_dist[lo:hi] = _sq_dist_to(rows, codes, found)

        _run_tasks(work, n_rows, block, **tasks)
        if return_second:
            return labels, sq_dist, second
        return labels, sq_dist

    def _brute_block(self, X, prep):
        """Nearest codes of a block, and lower bounds on the second distances."""
        scores, centred = prep.scores(X)
        labels = scores.argmin(axis=1)
        n_rows, n_codes = scores.shape
        if n_codes == 1:
            return labels, np.full(n_rows, np.inf)
        # Flat positions of each row's best code: take/put on the flat
        # scores cost far less than 2-D fancy indexing.
        flat = scores.reshape(-1)
        offsets = np.arange(0, n_rows * n_codes, n_codes)
        best = flat.take(labels + offsets)
        flat.put(labels + offsets, np.inf)
        second = flat.take(scores.argmin(axis=1) + offsets)
        margin, x_sq = prep.margin(centred)
        # ||x - e||^2 = score + ||x - center||^2, each within margin / 2.
        lower = second.astype(np.float64)
        lower += x_sq
        lower -= 2.0 * margin
        unsure = np.flatnonzero(second - best <= margin)
        if unsure.size:
            # The exact winner is among the codes within the error margin of
            # the computed best (the best itself was set to inf above).
            near = scores[unsure] <= (best[unsure] + margin[unsure])[:, None]
            near[np.arange(unsure.size), labels[unsure]] = True
            cand_rows, cand_cols = np.nonzero(near)
            labels[unsure] = _exact_among(X[unsure], self.codes64, cand_rows, cand_cols)
            lower[unsure] = 0.0
        np.maximum(lower, 0.0, out=lower)
        return labels, lower

    def _kd_block(self, X, n_threads):
        """Nearest codes of a block, and lower bounds on the second distances."""
        if self.codes64.shape[0] == 1:
            return np.zeros(X.shape[0], dtype=np.intp), np.full(X.shape[0], np.inf)
        dist, idx = self._tree.query(X, k=2, workers=n_threads)
        d1, d2 = dist[:, 0] ** 2, dist[:, 1] ** 2
        labels = idx[:, 0].astype(np.intp, copy=False)
        # cKDTree sums squared differences in float64: a relative gap above
        # this bound is a certain winner; anything closer is re-checked.
        unit = np.finfo(np.float64).eps / 2
        rel = 4 * (X.shape[1] + 4) * unit
        unsure = ~(d2 - d1 > rel * d2)
        lower = d2 * (1.0 - 2.0 * rel)
        if unsure.any():
            labels[unsure] = _exact_nearest(X[unsure], self.codes64)
            lower[unsure] = 0.0
        return labels, lower

    # -- all distances ----------------------------------------------------
    def distances(self, X, *, n_jobs=None):
        """Euclidean distances of every row to every code (all n_codes columns).

        Computed in float64 on centred data and returned in ``X.dtype``.
        """
        n_rows, n_codes = X.shape[0], self.codebook.shape[0]
        out = np.empty((n_rows, n_codes), dtype=X.dtype)
        prep = _BrutePrep(self.codebook.astype(np.float64), np.float64)
        n_threads = _n_threads(n_jobs)
        block = _working_memory_rows(24 * n_codes, n_rows, n_threads)
        block = min(block, max(16, _BLOCK_ELEMENTS // n_codes))

        def work(start, stop):
            for lo in range(start, stop, block):
                hi = min(lo + block, stop)
                sq, centred = prep.scores(X[lo:hi], scratch=False)
                sq += np.einsum("ij,ij->i", centred, centred)[:, None]
                np.maximum(sq, 0.0, out=sq)
                out[lo:hi] = np.sqrt(sq, out=sq)

        _run_tasks(work, n_rows, block, n_threads, _TASK_ELEMENTS // n_codes)
        return out


def residual_beam_search(X, codebooks, beam_size, n_jobs=None):
    """Codes of ``X`` for a chain of residual code books.

    Stage ``s`` quantises what the stages before it left.  With
    ``beam_size=1`` each stage takes the exact nearest code of the residual
    (:class:`_CodebookIndex`, greedy); otherwise the ``beam_size`` partial
    reconstructions of lowest squared error are kept for every row from
    stage to stage, and the best complete one wins.

    ``codebooks`` holds one :class:`_CodebookIndex` per stage (beam search
    reads their code vectors).

    Returns
    -------
    codes : ndarray of shape (n_samples, n_stages), dtype=intp
    sq_err : ndarray of shape (n_samples,), float64
        Squared norm of what the codes leave of each row.
    """
    n_rows, n_features = X.shape
    codes = np.empty((n_rows, len(codebooks)), dtype=np.intp)
    if beam_size == 1:
        residual = X.copy()
        for s, index in enumerate(codebooks):
            codes[:, s] = index.nearest(residual, n_jobs=n_jobs)[0]
            residual -= index.codebook[codes[:, s]]
        residual = residual.astype(np.float64, copy=False)
        return codes, np.einsum("ij,ij->i", residual, residual)
    vectors = [index.codebook.astype(np.float64) for index in codebooks]
    paths = np.empty((n_rows, 1, 0), dtype=np.intp)
    for s, codebook in enumerate(vectors):
        paths, sq_err = extend_beams(X, paths, vectors[:s], codebook, beam_size)
    return paths[:, 0], sq_err[:, 0]


def extend_beams(X, paths, vectors, codebook, beam_size):
    """Extend each row's partial encodings by one more stage, beam search.

    ``paths`` of shape ``(n_samples, n_beams, n_stages)`` holds each row's
    kept encodings by the code books ``vectors`` (float64); every path is
    extended by every code of ``codebook`` and the ``beam_size`` extensions
    of lowest squared error are kept.  Rows are processed in blocks of a
    few million scores.

    Returns
    -------
    paths : ndarray of shape (n_samples, beam_size, n_stages + 1)
        Best first (ties to the lowest parent beam and code).
    sq_err : ndarray of shape (n_samples, beam_size)
        Squared norm of what each path leaves of its row.
    """
    n_rows, n_beams, _ = paths.shape
    keep = min(beam_size, n_beams * codebook.shape[0])
    block = max(1, 2**21 // (n_beams * codebook.shape[0]))
    new_paths = np.empty((n_rows, keep, paths.shape[2] + 1), dtype=np.intp)
    sq_err = np.empty((n_rows, keep))
    for start in range(0, n_rows, block):
        rows = slice(start, start + block)
        new_paths[rows], sq_err[rows] = _extend_block(
            X[rows], paths[rows], vectors, codebook, keep
        )
    return new_paths, sq_err


def _extend_block(X, paths, vectors, codebook, keep):
    """:func:`extend_beams` on a block of rows, in float64."""
    n_rows, n_beams, _ = paths.shape
    n_codes = codebook.shape[0]
    residual = np.repeat(X.astype(np.float64)[:, None, :], n_beams, axis=1)
    for t, stage in enumerate(vectors):
        residual -= stage[paths[:, :, t]]
    err = np.einsum("ijk,ijk->ij", residual, residual)
    scores = (residual.reshape(-1, residual.shape[2]) @ codebook.T).reshape(
        n_rows, n_beams, n_codes
    )
    scores *= -2.0
    scores += err[:, :, None]
    scores += np.einsum("ij,ij->i", codebook, codebook)
    scores = scores.reshape(n_rows, -1)
    # The best extensions, best first, ties to the lowest (beam, code): a few
    # argmin passes beat a partial sort of every row.
    arange = np.arange(n_rows)
    top = np.empty((n_rows, keep), dtype=np.intp)
    for rank in range(keep):
        top[:, rank] = np.argmin(scores, axis=1)
        scores[arange, top[:, rank]] = np.inf
    parent, code = np.divmod(top, n_codes)
    residual = residual[arange[:, None], parent] - codebook[code]
    err = np.einsum("ijk,ijk->ij", residual, residual)
    paths = np.concatenate([paths[arange[:, None], parent], code[:, :, None]], axis=2)
    # Exact errors order the kept paths (stable: ties keep the order above).
    order = np.argsort(err, axis=1, kind="stable")
    return (
        np.take_along_axis(paths, order[:, :, None], axis=1),
        np.take_along_axis(err, order, axis=1),
    )
