"""Numeric kernels of the EMA code book: initialisation, statistics, update.

Every function here assumes that its inputs were validated by the estimator:
finite float arrays (or CSR matrices in canonical form, see
:mod:`skvq._sparse`) of consistent shapes, non-negative sample weights with a
positive sum, and a NumPy random generator for the random draws.  They never
modify their inputs.  Every decision they make is invariant under a
power-of-two scaling of the data (it only changes exponents), which is what
lets the estimators work on data of any magnitude in internal units.
"""

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse

from . import _sparse
from ._arrays import clamp_negatives
from ._search import scratch
from ._threads import n_threads, run_tasks

# A code whose EMA count falls below this value (after about 35,000 unused
# steps at momentum 0.99, or one at momentum 0) has its count and sum rescaled
# together, so that the count never underflows to 0 and the vector is kept.
COUNT_FLOOR = float(np.sqrt(np.finfo(np.float64).tiny))


def weighted_draw(weights, uniforms):
    """Indices drawn with probability proportional to ``weights``, one for
    each of the ``uniforms`` (numbers in [0, 1))."""
    cumulative = np.cumsum(weights)
    targets = uniforms * cumulative[-1]
    idx = np.searchsorted(cumulative, targets, side="right")
    return np.minimum(idx, weights.shape[0] - 1)


# Candidates per seed: twice the 2 + log(n_codes) of Arthur and Vassilvitskii
# (and of scikit-learn); on load_digits and china.jpg this lowers the final
# distortion by 0.4-0.9 % on average over 5 seeds, at no measurable cost in
# float32 (docs/performance.rst).
_TRIALS_FACTOR = 2
# Seeding computes its distances in float32 when the median squared norm of
# the centred points is at least this fraction of the largest: the bulk of
# the squared distances then stays far above float32's subnormal range.
_FLOAT32_DYNAMIC_RANGE = 2.0**-60


def greedy_trials(n_codes):
    """The single code book's k-means++ candidates per seed:
    ``2 * (2 + log(n_codes))``."""
    return _TRIALS_FACTOR * (2 + int(np.log(n_codes)))


def kmeans_plusplus(points, weights, n_codes, rng, *, n_trials):
    """Greedy weighted k-means++ seeding on distinct points.

    Each new seed is the best, by weighted potential, of ``n_trials``
    candidates drawn with probability proportional to weight times squared
    distance to the seeds so far (:func:`greedy_trials` for one code book).
    Distances are computed on centred points divided by a power of two
    (exact) that brings their largest entry to [1, 2), in float32 unless the
    points span too many orders of magnitude for it (sparse points: not
    centred, in float64); the draws are therefore the same for the points at
    any scale.  Stops early when every point is a seed.

    Returns
    -------
    seeds : ndarray of shape (n_seeds,), dtype=intp
        Indices into ``points``, ``n_seeds = min(n_codes, n_points)``.
    """
    (seeds,) = kmeans_plusplus_many(
        [points], [weights], n_codes, [rng], n_trials=n_trials
    )
    return seeds


def kmeans_plusplus_many(points, weights, n_codes, rngs, *, n_trials):
    """:func:`kmeans_plusplus` of several samples, one generator each, with
    the NumPy calls of each iteration shared by all of them.

    Samples with the same number of features (dense) are seeded together:
    stacked (padded with rows of zero weight, which are never drawn), one
    ``np.matmul`` over the stack for the candidates' distances.  Each
    sample's seeds are those :func:`kmeans_plusplus` draws from it alone
    with its generator, bit for bit, provided the samples of a stack agree
    on the precision of their distances (float32 unless one of them spans
    too many orders of magnitude: then float64 for all).

    Returns
    -------
    seeds : list of ndarray of shape (n_seeds,), dtype=intp
    """
    seeds = [None] * len(points)
    for group in _seeding_groups(points):
        distances = _stacked_seed_distances([points[i] for i in group])
        found = _greedy_seeds(
            distances,
            [weights[i] for i in group],
            n_codes,
            [rngs[i] for i in group],
            n_trials,
        )
        for i, member_seeds in zip(group, found, strict=True):
            seeds[i] = member_seeds
    return seeds


def _seeding_groups(points):
    """Indices of the samples seeded together: dense samples by number of
    features (in order of first appearance), each sparse sample alone."""
    groups = {}
    for i, member in enumerate(points):
        key = ("sparse", i) if _sparse.is_sparse(member) else member.shape[1]
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _greedy_seeds(sq_dist, weights, n_codes, rngs, n_trials):
    """The greedy k-means++ loop over a stack of samples: ``sq_dist(idx)``
    gives the squared distances ``(n_members, n_candidates, n_rows)`` of
    candidates ``idx`` (one row per member) to every (padded) row.

    Every member's uniform draws are taken at once, in the order in which
    the loop uses them (the first seed's, then ``n_trials`` per seed): the
    same numbers as drawing them in turn, and the same state of each
    generator afterwards.
    """
    sizes = [w.shape[0] for w in weights]
    n_seeds = [min(n_codes, size) for size in sizes]
    n_members, most_seeds = len(weights), max(n_seeds)
    stacked = np.zeros((n_members, max(sizes)))
    trial_draws = np.zeros((n_members, most_seeds - 1, n_trials))
    seeds = np.zeros((n_members, most_seeds), dtype=np.intp)
    for m, (w, rng) in enumerate(zip(weights, rngs, strict=True)):
        stacked[m, : sizes[m]] = w
        draws = rng.uniform(size=1 + n_trials * (n_seeds[m] - 1))
        trial_draws[m, : n_seeds[m] - 1] = draws[1:].reshape(-1, n_trials)
        seeds[m, 0] = weighted_draw(w, draws[:1])[0]
    members = np.arange(n_members)
    closest = sq_dist(seeds[:, :1])[:, 0]
    totals_weights = stacked.astype(closest.dtype)
    candidates = np.empty((n_members, n_trials), dtype=np.intp)
    last_rows = np.array(sizes)[:, None] - 1
    for c in range(1, most_seeds):
        # The padded rows' potential is 0: each row of the cumulative sums
        # is the member's own, then its total repeated.
        cumulative = np.cumsum(stacked * closest, axis=1)
        targets = trial_draws[:, c - 1] * cumulative[:, -1:]
        for m in members:
            candidates[m] = cumulative[m].searchsorted(targets[m], side="right")
        np.minimum(candidates, last_rows, out=candidates)
        dist = sq_dist(candidates)
        np.minimum(dist, closest[:, None, :], out=dist)
        best = [
            np.argmin(dist[m, :, :size] @ totals_weights[m, :size])
            for m, size in enumerate(sizes)
        ]
        seeds[:, c] = candidates[members, best]
        closest = dist[members, best]
    return [seeds[m, : n_seeds[m]] for m in range(n_members)]


def _stacked_seed_distances(points):
    """The squared distances of k-means++ seeding for a stack of samples:
    ``sq_dist(idx)`` of candidates ``idx`` (one row of indices per sample)
    to every row of its sample, shape ``(n_members, n_candidates,
    n_rows)`` (the rows padded with zeros to the largest sample).  Dense
    samples are centred and divided by a power of two (exact), in float32
    when their dynamic range allows; a sparse sample comes alone."""
    if _sparse.is_sparse(points[0]):
        (member,) = points
        single = _sparse_seed_distances(member)
        return lambda idx: single(idx[0])[None]
    centred = [_centred_unit(member) for member in points]
    in_float32 = all(_float32_suffices(member) for member in centred)
    dtype = np.float32 if in_float32 else np.float64
    n_rows = max(member.shape[0] for member in centred)
    stack = np.zeros((len(centred), n_rows, centred[0].shape[1]), dtype=dtype)
    for m, member in enumerate(centred):
        stack[m, : member.shape[0]] = member
    sq_norms = np.einsum("mij,mij->mi", stack, stack)
    stack_t = np.ascontiguousarray(stack.transpose(0, 2, 1))
    members = np.arange(len(centred))[:, None]
    # With one feature, NumPy's matmul leaves BLAS for a loop 15 times
    # slower (1 ns an entry; a residual stage is seeded on its first
    # principal dimension): the broadcast product is the same single
    # rounding.
    product = np.multiply if stack.shape[2] == 1 else np.matmul

    def sq_dist(idx):
        # In place: fresh temporaries of this size page-fault on every call.
        d = product(stack[members, idx], stack_t)
        d *= -2.0
        d += sq_norms[:, None, :]
        d += sq_norms[members, idx][:, :, None]
        clamp_negatives(d)
        d[members, np.arange(idx.shape[1]), idx] = 0.0
        return d

    return sq_dist


def _centred_unit(points):
    """Dense points centred and divided by a power of two (exact) that
    brings their largest entry to [1, 2), float64."""
    centred = points - points.mean(axis=0)
    largest = np.abs(centred).max(initial=0.0)
    if largest > 0:
        centred = np.ldexp(centred, 1 - int(np.frexp(largest)[1]))
    return centred


def _float32_suffices(centred):
    """Whether the squared distances of ``centred`` points stay far above
    float32's subnormal range (the median squared norm against the
    largest)."""
    sq_norms = np.einsum("ij,ij->i", centred, centred)
    return np.median(sq_norms) >= _FLOAT32_DYNAMIC_RANGE * sq_norms.max(initial=0.0)


def _sparse_seed_distances(points):
    """The seeding distances of CSR points: ``sq_dist(idx)`` of points
    ``idx`` to every point, from products with the chosen points (float64,
    not centred: centring would fill the rows), on points divided by a power
    of two that brings their largest entry to [1, 2)."""
    largest = float(np.abs(points.data).max(initial=0.0))
    scale = float(np.ldexp(1.0, 1 - int(np.frexp(largest)[1]))) if largest > 0 else 1.0
    points = _sparse.scaled(points, scale)
    points_t = points.T.tocsr()
    return _distances_by_products(
        lambda idx: (points[idx] @ points_t).toarray(), _sparse.row_sq_norms(points)
    )


def _distances_by_products(products, sq_norms):
    """``sq_dist(idx)``: squared distances of points ``idx`` to every point,
    ``||a||^2 + ||b||^2 - 2 a.b`` from ``products(idx)`` (a fresh array of
    the points' products) and the points' squared norms; exactly 0 from a
    point to itself."""

    def sq_dist(idx):
        d = products(idx)
        d *= -2.0
        d += sq_norms
        d += sq_norms[idx][:, None]
        clamp_negatives(d)
        d[np.arange(idx.shape[0]), idx] = 0.0
        return d

    return sq_dist


def random_seeds(points, weights, n_codes, rng):
    """``min(n_codes, n_points)`` distinct points drawn with probability ~ weight."""
    n_seeds = min(n_codes, points.shape[0])
    return rng.choice(
        points.shape[0], size=n_seeds, replace=False, p=weights / weights.sum()
    )


def init_codebook(sample, n_codes, method, rng, *, n_trials):
    """Initial code vectors drawn from a canonical sample by ``method``.

    When the sample has fewer distinct rows than ``n_codes``, every row
    becomes a code and the remaining codes repeat rows drawn with
    probability proportional to their weight.

    Parameters
    ----------
    sample : WeightedRows
        Distinct rows of positive weight, in canonical order.

    n_trials : int
        k-means++'s candidates per seed (:func:`kmeans_plusplus`).

    Returns
    -------
    codebook : ndarray of shape (n_codes, n_features), float64
    """
    (codebook,) = init_codebooks([sample], n_codes, method, [rng], n_trials=n_trials)
    return codebook


def init_codebooks(samples, n_codes, method, rngs, *, n_trials):
    """:func:`init_codebook` of several samples, one generator each (the
    k-means++ draws of all of them made together,
    :func:`kmeans_plusplus_many`): each code book equals the one drawn from
    its sample alone."""
    points = [sample.points for sample in samples]
    weights = [sample.weights for sample in samples]
    if method == "k-means++":
        seeds = kmeans_plusplus_many(points, weights, n_codes, rngs, n_trials=n_trials)
    else:
        seeds = [
            random_seeds(p, w, n_codes, rng)
            for p, w, rng in zip(points, weights, rngs, strict=True)
        ]
    codebooks = []
    for sample, found, rng in zip(samples, seeds, rngs, strict=True):
        if found.shape[0] < n_codes:
            uniforms = rng.uniform(size=n_codes - found.shape[0])
            extra = weighted_draw(sample.weights, uniforms)
            found = np.concatenate([found, extra])
        codebooks.append(dense_rows(sample.points, found))
    return codebooks


def dense_rows(points, idx):
    """Rows ``idx`` of ``points`` as a dense float64 array (a few rows of a
    sparse sample become code vectors)."""
    chosen = points[idx]
    if _sparse.is_sparse(chosen):
        return chosen.toarray().astype(np.float64, copy=False)
    return chosen


def code_statistics(X, labels, sample_weight, n_codes, n_jobs=None):
    """Per-code weighted counts and sums of a batch, in float64.

    Large batches are summed in chunks of a fixed number of rows (a function
    of the number of features alone), on ``n_jobs`` threads, and the partial
    sums are added in chunk order: the result does not depend on the
    threads, and each chunk is cast to float64 while it is in cache.

    Returns
    -------
    counts : ndarray of shape (n_codes,)
        ``sum of w_i over the rows assigned to each code``.
    sums : ndarray of shape (n_codes, n_features)
        ``sum of w_i x_i over the rows assigned to each code``.
    """
    n_samples = X.shape[0]
    counts = np.bincount(labels, weights=sample_weight, minlength=n_codes)
    if _sparse.is_sparse(X):  # one scatter in row order (chunked): no threads
        return counts, _sparse.code_sums(X, labels, sample_weight, n_codes)
    chunk = statistics_chunk(X.shape[1])
    if n_samples <= chunk:
        return counts, _chunk_sums(X, labels, sample_weight, n_codes)
    parts = [None] * -(-n_samples // chunk)

    def work(start, stop):
        for lo in range(start, stop, chunk):
            parts[lo // chunk] = _chunk_sums(
                X[lo : lo + chunk],
                labels[lo : lo + chunk],
                sample_weight[lo : lo + chunk],
                n_codes,
            )

    run_tasks(work, n_samples, chunk, n_threads(n_jobs), chunk)
    sums = parts[0]
    for part in parts[1:]:
        sums += part
    return counts, sums


# Values per chunk of the statistics (rows times features), and rows at
# least: a chunk of fixed size, so that the order of the float64 additions
# never depends on the threads, and large enough that building its sparse
# assignment matrix (~30 us) and handing it to a thread stay small against
# the sums (50,000 x 3 float32: 0.33 ms in chunks of 2**14 rows, 0.13 ms in
# one).
_STATISTICS_CHUNK_VALUES = 2**20
_STATISTICS_CHUNK_ROWS = 2**14


def statistics_chunk(n_features):
    """Rows per chunk of :func:`code_statistics`."""
    return max(_STATISTICS_CHUNK_ROWS, _STATISTICS_CHUNK_VALUES // max(1, n_features))


# Up to this many rows, the sums of a chunk go through a sort (measured:
# faster than the sparse product below about 200 rows).
_SMALL_CHUNK = 128


def _chunk_sums(X, labels, sample_weight, n_codes):
    """Weighted sums of the rows of each code, in sample order, in float64."""
    n_samples = X.shape[0]
    if n_samples <= _SMALL_CHUNK:
        # Sorting a few labels beats building a sparse matrix.
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.flatnonzero(
            np.concatenate(([True], sorted_labels[1:] != sorted_labels[:-1]))
        )
        weighted = X[order].astype(np.float64)
        weighted *= sample_weight[order, None]
        sums = np.zeros((n_codes, X.shape[1]))
        sums[sorted_labels[starts]] = np.add.reduceat(weighted, starts, axis=0)
        return sums
    assign = _assignment_matrix(labels, sample_weight, n_codes)
    if X.dtype != np.float64:
        # Cast into a reused buffer, likewise.
        buffer = scratch("statistics", X.shape, np.float64)
        np.copyto(buffer, X)
        X = buffer
    return np.asarray(assign @ X)


_ASSIGNMENT = threading.local()
# Shapes of assignment matrices a thread keeps (a fit uses one or two a
# stage: its chunks and their remainder; a stream its batch size).
_ASSIGNMENT_SHAPES = 4
# Batches of at most this many rows reuse their assignment matrix (16 bytes
# a row: at most 1 MiB a thread); larger chunks build one for each call,
# SciPy's checks a few per cent of their product.
_REUSED_ASSIGNMENT_ROWS = 2**14


def _assignment_matrix(labels, sample_weight, n_codes):
    """The ``(n_codes, n_samples)`` CSC matrix whose column ``i`` holds
    ``sample_weight[i]`` at row ``labels[i]``: its product with ``X``
    scatters the weighted rows onto their codes in one pass, in sample
    order, with no sort.

    For a small batch, each thread keeps one such matrix per shape and
    overwrites its entries in place: the structure (one entry a column, so
    its indices are sorted and canonical whatever the labels) never
    changes, and building a new matrix costs SciPy's checks (about 7 us, as
    much as the product of a 256-row batch).  A large chunk's index arrays
    are int32 views of reused buffers (fresh ones would page-fault every
    call).
    """
    n_samples = labels.shape[0]
    if n_samples > _REUSED_ASSIGNMENT_ROWS:
        indices = scratch("statistics-indices", (1, n_samples), np.int32)[0]
        indices[:] = labels
        return sparse.csc_matrix(
            (sample_weight, indices, _column_starts(n_samples)),
            shape=(n_codes, n_samples),
            copy=False,
        )
    matrices = _ASSIGNMENT.__dict__.setdefault("matrices", {})
    assign = matrices.get((n_codes, n_samples))
    if assign is None:
        if len(matrices) >= _ASSIGNMENT_SHAPES:
            matrices.clear()
        assign = matrices[(n_codes, n_samples)] = sparse.csc_matrix(
            (
                np.zeros(n_samples),
                np.zeros(n_samples, dtype=np.int32),
                np.arange(n_samples + 1, dtype=np.int32),
            ),
            shape=(n_codes, n_samples),
        )
    assign.indices[:] = labels
    assign.data[:] = sample_weight
    return assign


@lru_cache(maxsize=4)
def _column_starts(n_samples):
    """``0, 1, ..., n_samples`` as int32 (one row per column)."""
    starts = np.arange(n_samples + 1, dtype=np.int32)
    starts.setflags(write=False)
    return starts


@dataclass(frozen=True)
class BatchStatistics:
    """Additive sufficient statistics of one EMA step over (part of) a batch.

    Statistics of disjoint parts of a batch add up to those of the batch,
    which is what lets a step run as a reduction over chunks.
    """

    counts: np.ndarray  # (n_codes,): sum of w_i per code
    sums: np.ndarray  # (n_codes, n_features): sum of w_i x_i per code
    distortions: np.ndarray  # (n_codes,): sum of w_i ||x_i - c_k||^2 per code
    weight: float  # sum of w_i

    @property
    def loss(self):
        """``sum of w_i ||x_i - c(x_i)||^2`` over the batch."""
        return float(self.distortions.sum())

    @property
    def mean_loss(self):
        """The weighted mean squared distance of the batch."""
        return self.loss / self.weight

    def __add__(self, other):
        return BatchStatistics(
            self.counts + other.counts,
            self.sums + other.sums,
            self.distortions + other.distortions,
            self.weight + other.weight,
        )


def batch_statistics(index, X, sample_weight, n_codes, n_jobs=None, bounds=None):
    """Assign the rows of ``X`` to their nearest codes and sum them up.

    ``bounds``, a :class:`LloydBounds` kept across the full steps of one
    stage of ``fit`` on the same ``X``, lets rows that certainly keep their
    code skip the search.

    Returns
    -------
    stats : BatchStatistics
    labels : ndarray of shape (n_samples,)
        Code of each row.
    sq_dist : ndarray of shape (n_samples,)
        Squared distance of each row to its code.
    """
    if bounds is None:
        labels, sq_dist = index.nearest(X, n_jobs=n_jobs, return_sq_dist=True)
    else:
        labels, sq_dist = bounds.assign(index, X, n_jobs)
    stats = assignment_statistics(X, labels, sq_dist, sample_weight, n_codes, n_jobs)
    return stats, labels, sq_dist


def assignment_statistics(X, labels, sq_dist, sample_weight, n_codes, n_jobs=None):
    """:class:`BatchStatistics` of rows assigned to codes ``labels`` (at squared
    distances ``sq_dist``), whatever chose the assignment."""
    counts, sums = code_statistics(X, labels, sample_weight, n_codes, n_jobs)
    distortions = np.bincount(
        labels, weights=sample_weight * sq_dist, minlength=n_codes
    )
    return BatchStatistics(counts, sums, distortions, float(sample_weight.sum()))


class LloydBounds:
    """Distance bounds that let repeated full steps on one ``X`` skip rows.

    After a step, every row keeps an upper bound on the distance to its code
    and a lower bound on the distance to every other code.  When the codes
    then move by ``delta_k``, the triangle inequality moves the bounds by at
    most the move of the row's code (upper) and the largest move of the
    others (lower); a row whose upper bound stays below its lower bound
    certainly keeps its code, and only the other rows are searched again
    (Hamerly's bounds for k-means, kept here in rigorous floating point:
    each bound is widened by the rounding error of its computation).  The
    labels are therefore exactly those of a full search, whatever code book
    comes next: the bounds are relative to the last one they saw.
    """

    def __init__(self, n_features, dtype):
        self.rel = 4 * (n_features + 8) * np.finfo(dtype).eps / 2
        self.codebook = None
        self.last_searched = 0

    def assign(self, index, X, n_jobs=None):
        """Exact nearest codes of the rows of ``X`` and their squared distances."""
        codebook = index.codebook
        if self.codebook is None:
            labels, _, second = index.nearest(X, n_jobs=n_jobs, return_second=True)
            self.lower = np.sqrt(second, out=second)
            self.upper = np.empty_like(self.lower)
            self.labels = labels
            self.last_searched = X.shape[0]
        else:
            redo = self._unsure_rows(codebook)
            if redo.size:
                found, _, second = index.nearest(
                    X[redo], n_jobs=n_jobs, return_second=True
                )
                self.labels[redo] = found
                self.lower[redo] = np.sqrt(second)
            self.last_searched = redo.size
        labels = self.labels.copy()
        sq_dist = index.sq_dist(X, labels, n_jobs=n_jobs)
        self.lower *= 1.0 - self.rel
        np.sqrt(sq_dist, out=self.upper)
        self.upper *= 1.0 + self.rel
        self.codebook = codebook
        return labels, sq_dist

    def _unsure_rows(self, codebook):
        """Loosen the bounds by the codes' moves; the rows they no longer
        decide (the bounds are updated in place)."""
        moved = codebook.astype(np.float64) - self.codebook
        delta = np.sqrt(np.einsum("ij,ij->i", moved, moved)) * (1.0 + 1e-9)
        top = int(np.argmax(delta))
        others = np.delete(delta, top)
        runner_up = others.max(initial=0.0)
        # Every row's lower bound drops by the largest move of another code:
        # delta[top], or the runner-up's move for the rows of code top.
        of_top = np.flatnonzero(self.labels == top)
        lower_of_top = self.lower[of_top] - runner_up
        self.lower -= delta[top]
        self.lower[of_top] = lower_of_top
        moves = scratch("bound moves", (1, self.labels.shape[0]), np.float64)[0]
        np.take(delta, self.labels, out=moves, mode="clip")
        self.upper += moves
        return np.flatnonzero(~(self.upper < self.lower))


def ema_update(
    counts,
    sums,
    codebook,
    batch_counts,
    batch_sums,
    momentum,
    *,
    batch_is_temporary=False,
):
    """One EMA step of the code book; returns new arrays, inputs untouched
    (but ``batch_sums`` when ``batch_is_temporary``: the caller's own
    temporary, which a step at momentum 0 takes as its new sums rather than
    copy it, a code-book-sized array less at the peak of a ``fit``).

    ``n_k <- m n_k + (1 - m) batch_counts_k``,
    ``s_k <- m s_k + (1 - m) batch_sums_k`` and ``c_k <- s_k / n_k`` for every
    code that received weight (the per-code distortion follows the same rule,
    see :func:`ema_average`).  A large code book's new sums and vectors are
    stored in the memory layout of ``batch_sums`` (:func:`memory_order`;
    sparse rows sum up column by column, and scattered sums add to sums
    stored that way), so that consecutive steps run contiguous passes.
    A code that received none keeps its vector
    exactly (in exact arithmetic ``s_k / n_k`` does not change); its sum is
    re-expressed as ``c_k n_k`` so that rounding cannot make ``s_k / n_k``
    drift from ``c_k`` over a long wait, and its count is kept above
    ``COUNT_FLOOR`` so that it never underflows to 0.
    """
    new_counts = ema_average(counts, batch_counts, momentum)
    if (
        momentum == 0.0
        and batch_is_temporary
        and isinstance(batch_sums, np.ndarray)
        and batch_sums.dtype == np.float64
    ):
        new_sums = batch_sums  # what ema_average would copy
    else:
        new_sums = ema_average(sums, batch_sums, momentum)
    won = batch_counts > 0
    if won.all():  # one pass (a large batch reaches every code)
        new_codebook = (new_sums / new_counts[:, None]).astype(
            codebook.dtype, copy=False
        )
    elif 2 * np.count_nonzero(won) > won.shape[0]:
        # Most codes won: one pass, then the others' vectors put back (row
        # gathers of a code book stored column by column are slow; the
        # others' counts may be 0 at momentum 0).
        with np.errstate(divide="ignore", invalid="ignore"):
            new_codebook = (new_sums / new_counts[:, None]).astype(
                codebook.dtype, copy=False
            )
        lost = np.flatnonzero(~won)
        new_codebook[lost] = codebook[lost]
    else:
        new_codebook = np.array(codebook, order=memory_order(new_sums))
        rows = np.flatnonzero(won)  # gathers: few rows win in a small batch
        new_codebook[rows] = new_sums[rows] / new_counts[rows, None]
    kept = np.flatnonzero(~won | (new_counts < COUNT_FLOOR))
    np.maximum(new_counts, COUNT_FLOOR, out=new_counts)
    new_sums[kept] = new_codebook[kept] * new_counts[kept, None]
    return new_counts, new_sums, new_codebook


# Arrays of at least this many values go through reused buffers (below,
# a fresh temporary costs less than the lookup of a buffer).
_REUSE_ELEMENTS = 2**16


def memory_order(array):
    """``"F"`` for an array stored column by column (and not also row by
    row), else ``"C"``."""
    flags = array.flags
    return "F" if flags.f_contiguous and not flags.c_contiguous else "C"


def ema_average(value, batch_value, momentum):
    """``m * value + (1 - m) * batch_value``, a new array (for large arrays,
    in the memory layout of ``batch_value``)."""
    if momentum == 0.0:  # the same numbers: 0 * value adds (signed) zeros
        return np.array(batch_value, dtype=np.result_type(batch_value, 1.0))
    if isinstance(batch_value, _sparse.ScatteredSums):
        # A few cells of a sparse batch: m * value, plus (1 - m) times the
        # batch sums where they are not zero (the numbers of the dense
        # formula, but where a negative zero of m * value keeps its sign).
        new = np.multiply(value, momentum, order="F")
        batch_value.add_scaled_to(new.reshape(-1, order="F"), 1.0 - momentum)
        return new
    if value.size < _REUSE_ELEMENTS:
        new = np.multiply(value, momentum)
        new += (1.0 - momentum) * batch_value
        return new
    # Through a reused buffer: a fresh temporary of a large code book
    # page-faults on every step.
    order = memory_order(batch_value)
    new = np.multiply(value, momentum, order=order)
    shape = value.shape if order == "C" else value.shape[::-1]
    share = scratch("ema-share", shape, np.result_type(batch_value, 1.0))
    share = share if order == "C" else share.T
    np.multiply(batch_value, 1.0 - momentum, out=share)
    new += share
    return new


def reseed_dead_codes(codebook, dead, pool, rng):
    """New vectors for dead codes, drawn from a pool k-means++ style.

    Dead codes, in ascending order, each take a distinct row of the pool
    drawn with probability proportional to its weight times its squared
    distance to the code book (the pool's values, updated after every pick).
    Codes stay where they are once every row coincides with a code.

    Parameters
    ----------
    pool : WeightedRows
        Distinct rows in canonical order; ``values`` are their squared
        distances to the code book.

    Returns
    -------
    reseeded : ndarray of int
        Indices of the codes that moved.
    vectors : ndarray of shape (n_reseeded, n_features), float64
        Their new vectors.
    """
    points, weights = pool.points, pool.weights
    d2 = pool.values.astype(np.float64)
    reseeded, vectors = [], []
    for k in np.flatnonzero(dead):
        potential = weights * d2
        if not potential.sum() > 0:
            break
        pick = dense_rows(points, weighted_draw(potential, rng.uniform(size=1)))[0]
        reseeded.append(k)
        vectors.append(pick)
        if _sparse.is_sparse(points):
            to_pick = _sparse.sq_dist_to_vectors(points, pick[None, :])[:, 0]
        else:
            diff = points - pick
            to_pick = np.einsum("ij,ij->i", diff, diff)
        np.minimum(d2, to_pick, out=d2)
    n_features = codebook.shape[1]
    return (
        np.asarray(reseeded, dtype=np.intp),
        np.asarray(vectors, dtype=np.float64).reshape(-1, n_features),
    )


def perplexity(counts):
    """``exp`` of the entropy of the usage distribution ``counts / counts.sum()``."""
    p = counts / counts.sum()
    p = p[p > 0]
    return float(np.exp(-np.dot(p, np.log(p))))


def weighted_mean(values, sample_weight):
    """Weighted mean of ``values`` (float64)."""
    return float(np.dot(sample_weight, values) / sample_weight.sum())


@dataclass(frozen=True)
class Moments:
    """Weight, weighted mean and weighted sum of squared deviations per
    feature of some rows: additive over parts (Chan et al.'s update)."""

    weight: float
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, X, sample_weight):
        total = float(sample_weight.sum())
        if not total > 0:
            zeros = np.zeros(X.shape[1])
            return cls(0.0, zeros, zeros)
        if _sparse.is_sparse(X):  # by chunks of rows: bounded temporaries
            moments = cls(0.0, np.zeros(X.shape[1]), np.zeros(X.shape[1]))
            for lo, hi in _sparse.row_chunks(X.shape[0]):
                weights = sample_weight[lo:hi]
                if weights.sum() > 0:
                    part = _sparse.row_range(X, lo, hi)
                    moments = moments + cls(*_sparse.moments(part, weights))
            return moments
        mean = (sample_weight @ X) / total
        centred = X - mean
        centred *= centred
        return cls(total, mean, sample_weight @ centred)

    def __add__(self, other):
        total = self.weight + other.weight
        if not total > 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.weight / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.weight * other.weight / total)
        return Moments(total, mean, m2)

    @property
    def mean_variance(self):
        """Mean over features of the weighted variance of each feature."""
        return float(np.mean(self.m2 / self.weight)) if self.weight > 0 else 0.0
