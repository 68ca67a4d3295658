"""Residual quantisation: beam search, and the training of chained code books.

Encoding (:func:`beam_search`) keeps, from stage to stage, the ``beam_size``
partial reconstructions of lowest squared error.  The best extensions of a
path are among its ``beam_size`` nearest codes, so each stage asks the
stage's search index for the ``k`` nearest codes of every kept path's
residual, an exact set whose distances are known within a rigorous bound
(:meth:`~skvq._search.CodebookIndex.nearest_k_bounded`: a k-d tree or
blocked products, as for one nearest code), and keeps the best
``beam_size`` of those candidates: only the candidates whose bound reaches
the ``beam_size``-th best get exact float64 distances (about ``beam_size``
of the ``beam_size**2``; 15 % less time at beam 5 in 128 dimensions).  The
cost grows with ``n_codes`` as the greedy search's does.  Residuals are
float64, and so are the exact checks.

Training (:class:`ResidualTraining`) is written once for ``fit``, the first
``partial_fit`` and Dask: it sends requests (defined here) to a data source,
like the single code book's schedules.

- The greedy stage loop of ``fit`` (:func:`greedy_stages`) runs in memory
  on the canonical training sample (at most 256 distinct rows per code,
  one request): stage ``s`` is fitted by the stage trainer
  (:mod:`skvq._stage_trainer`, progressive-dimension k-means) to what every
  kept beam path leaves of the sample's rows after the stages before it.
  Its beams, extended by the last stage, encode the sample
  (:class:`SampleCodes`): the refinement's first encoding looks the rows up
  there.  The first ``partial_fit`` initialises stage after stage from the
  residual of each row's best path, kept per block of rows with the paths
  themselves.
- Joint refinement (``fit``): for the current codes, all code books are
  solved at once by least squares; the normal equations are sums over rows,
  so each block adds its part.  Beyond ``JOINT_SOLVE_MAX`` codes in all, a
  Lloyd step per stage in turn.  An eighth of the rows is held out of the
  solves, and a pass is kept only if their error drops.
- A stream step: one joint (beam) encoding of the batch, then an EMA step
  of every stage towards what the other stages leave of its rows.
"""

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from scipy import linalg, sparse

from ._kernels import COUNT_FLOOR, assignment_statistics
from ._relocation import MIN_SPLIT_ROWS, cell_members
from ._rows import WeightedRows, canonical_sample, positions_in, row_priority
from ._schedule import (
    full_update,
    initial_state,
    split_candidates,
    stream_apply,
    stream_finish,
    warn_if_few_rows,
)
from ._search import scratch
from ._sources import InitSample, Request, StepResult, sum_parts
from ._stage_trainer import StageTrainer
from ._state import CodebookState
from ._threads import TASK_ELEMENTS, n_threads, run_tasks

# Passes of joint refinement after the greedy training, at most; they stop
# earlier when the held-out error drops by less than this fraction.
REFINE_PASSES = 20
REFINE_RTOL = 1e-3
# The refinement solves on all the rows but this share, and keeps a pass
# only if the error of those held-out rows drops: a least-squares solve for
# thousands of codes fits the training rows' noise (on image patches it
# lowered the training error and raised the held-out error by 1-6 %).
HELD_OUT_SHARE = 1 / 8
# Joint least-squares refinement up to this many codes in all (a dense
# system of this size); beyond, a Lloyd step per stage.
JOINT_SOLVE_MAX = 4096
# Residual values (rows x paths x features) of one block of beam search:
# 2 MB of float64, so that a block's residuals, their gathered candidates
# and differences stay in cache.  Measured 2**17 to 2**21 on multi_bench's
# sets: 2**21 encoded 25-35 % fewer rows a second at beam 5 on the patches
# and the low-rank set, 8 % fewer at beam 1 on the patches; the digits
# within noise.
_BEAM_BLOCK_ELEMENTS = 2**18
# Residual values of one block of a stage's training pool (2 MB of float64;
# 2**16 to 2**18 were fastest, measured on 65,536 rows of 192 features).
_POOL_BLOCK_ELEMENTS = 2**18
# Padding of a row's candidates in :func:`_row_best`: after every (path, code).
_LAST_TIE = np.iinfo(np.intp).max
# What a greedy stage returns for the errors, computed only when needed.
_GREEDY = None


# ------------------------------------------------------------ beam search
def beam_search(X, indexes, beam_size, n_jobs=None):
    """Codes of ``X`` for a chain of residual code books.

    Stage ``s`` quantises what the stages before it left.  With
    ``beam_size=1`` each stage takes the exact nearest code of the residual
    (greedy); otherwise the ``beam_size`` partial reconstructions of lowest
    squared error are kept for every row from stage to stage, and the best
    complete one wins.  ``indexes`` holds each stage's
    :class:`~skvq._search.CodebookIndex`.  Rows go through all the stages in
    blocks, each keeping its paths' residuals (float64) from stage to stage;
    the blocks are shared among ``n_jobs`` threads, each taking a block
    through every stage (one stage's search and ranking of a block are too
    small to share: 1.5 times faster at beam 5 on two cores).

    Returns
    -------
    codes : ndarray of shape (n_samples, n_stages), dtype=intp
    sq_err : ndarray of shape (n_samples,), float64
        Squared norm of what the codes leave of each row.
    """
    n_rows, n_features = X.shape
    codes = np.empty((n_rows, len(indexes)), dtype=np.intp)
    sq_err = np.empty(n_rows)
    block = max(1, _BEAM_BLOCK_ELEMENTS // (beam_size * max(1, n_features)))
    n_codes = max(index.codes64.shape[0] for index in indexes)

    def work(start, stop):
        for lo in range(start, stop, block):
            rows = slice(lo, min(lo + block, stop))
            codes[rows], sq_err[rows] = _beam_block(X[rows], indexes, beam_size)

    threads = n_threads(n_jobs)
    run_tasks(work, n_rows, block, threads, TASK_ELEMENTS // (beam_size * n_codes))
    return codes, sq_err


def _beam_block(X, indexes, beam_size):
    """:func:`beam_search` of one block of rows, in the calling thread."""
    # Reused buffers: fresh ones page-fault on every block, all the more on
    # Dask workers (see skvq._search.scratch).
    residual = scratch("beam-residual", X.shape, np.float64)
    residual[...] = X
    residual = residual[:, None, :]
    paths = np.zeros((X.shape[0], 1, 0), dtype=np.intp)
    for index in indexes:
        paths, residual, err = _extend(paths, residual, index, beam_size)
    if err is _GREEDY:
        err = np.einsum("ijk,ijk->ij", residual, residual)
    return paths[:, 0], err[:, 0]


def residuals(X, paths, indexes):
    """What each path leaves of its row: ``X - sum of its code vectors``
    (float64, shape ``(n_rows, n_paths, n_features)``)."""
    n_rows, n_paths = paths.shape[:2]
    residual = np.empty((n_rows, n_paths, X.shape[1]))
    residual[...] = X[:, None, :]
    flat = residual.reshape(n_rows * n_paths, X.shape[1])
    chosen = scratch("residual-chosen", flat.shape, np.float64)
    for t, index in enumerate(indexes):
        # mode="clip" (codes are valid): the default buffers ``out`` anew.
        np.take(_vectors(index), paths[:, :, t].reshape(-1), 0, chosen, "clip")
        flat -= chosen
    return residual


def _vectors(index):
    return index.codebook.astype(np.float64, copy=False)


def extend_beams(X, paths, indexes, index, beam_size, n_jobs=None):
    """Extend each row's kept paths by one more stage.

    ``paths`` of shape ``(n_samples, n_paths, n_stages)`` holds each row's
    kept encodings by the stages of ``indexes`` (None before the first
    stage); every path is extended by its ``beam_size`` nearest codes of
    ``index`` and the ``beam_size`` extensions of lowest squared error are
    kept, best first, ties to the lowest (path, code).  The paths' residuals
    are computed again from ``X``, in blocks of rows.

    Returns
    -------
    paths : ndarray of shape (n_samples, n_kept, n_stages + 1)
    sq_err : ndarray of shape (n_samples, n_kept)
        Squared norm of what each path leaves of its row.
    """
    n_rows = X.shape[0]
    if paths is None:
        paths = np.zeros((n_rows, 1, 0), dtype=np.intp)
    n_paths = paths.shape[1]
    n_codes = index.codes64.shape[0]
    keep = min(beam_size, n_paths * min(beam_size, n_codes))
    block = max(1, _BEAM_BLOCK_ELEMENTS // (n_paths * max(1, X.shape[1])))
    new_paths = np.empty((n_rows, keep, paths.shape[2] + 1), dtype=np.intp)
    sq_err = np.empty((n_rows, keep))

    def work(start, stop):
        for lo in range(start, stop, block):
            rows = slice(lo, min(lo + block, stop))
            residual = residuals(X[rows], paths[rows], indexes)
            new_paths[rows], residual, err = _extend(
                paths[rows], residual, index, beam_size
            )
            if err is _GREEDY:
                err = np.einsum("ijk,ijk->ij", residual, residual)
            sq_err[rows] = err

    min_rows = TASK_ELEMENTS // (n_paths * beam_size * n_codes)
    run_tasks(work, n_rows, block, n_threads(n_jobs), max(1, min_rows))
    return new_paths, sq_err


def _extend(paths, residual, index, beam_size):
    """One stage of beam search on a block: the kept paths, their residuals
    and squared errors after the stage (best first, ties to the lowest
    (path, code)); a greedy stage (one path, one code) updates the residuals
    in place and leaves the errors to the caller (``_GREEDY``).  In the
    calling thread: the callers share blocks among the threads."""
    n_rows, n_paths, n_features = residual.shape
    flat = residual.reshape(n_rows * n_paths, n_features)
    k = min(beam_size, index.codes64.shape[0])
    if k == 1:
        found = index.nearest(flat, n_jobs=1)[0]
        if n_paths == 1:  # greedy: no ranking to do
            chosen = scratch("beam-chosen", flat.shape, np.float64)
            np.take(_vectors(index), found, axis=0, out=chosen, mode="clip")
            flat -= chosen
            paths = np.concatenate([paths, found[:, None, None]], axis=2)
            return paths, residual, _GREEDY
        codes = found[:, None]
        diff = flat - _vectors(index)[found]
        sq = np.einsum("ij,ij->i", diff, diff)[:, None]
    else:
        # One code more than a path can contribute: where the k-th and the
        # next code of a path tie within the search's error bound and the
        # path leads its row, the codes left out may reach the row's cut,
        # and settling that takes an exact search of the path of its own
        # (0.18 ms a call on a few rows); one more argmin pass leaves half
        # as many such paths (image patches at beam 5: 4-10 % more rows a
        # second on one thread, the same codes).
        listed = min(k + 1, index.codes64.shape[0])
        found = index.nearest_k_bounded(flat, listed, n_jobs=1)
        return _best_extensions(paths, residual, index, found, beam_size)
    # Candidates of a row, path by path, each path's nearest first: a stable
    # sort keeps the lowest (path, code) among equal errors.
    keep = min(beam_size, n_paths * k)
    sq = sq.reshape(n_rows, n_paths * k)
    codes = codes.reshape(n_rows, n_paths * k)
    top = np.argsort(sq, axis=1, kind="stable")[:, :keep]
    arange = np.arange(n_rows)[:, None]
    parent = top // k
    chosen = codes[arange, top]
    new_paths = np.concatenate([paths[arange, parent], chosen[:, :, None]], axis=2)
    new_residual = residual[arange, parent] - _vectors(index)[chosen]
    return new_paths, new_residual, sq[arange, top]


def _best_extensions(paths, residual, index, found, beam_size):
    """The ``beam_size`` best extensions of each row's paths by the codes of
    ``found`` (:class:`~skvq._search.KNearest` of ``index``, each path's
    nearest codes by computed distance, known within a bound): the kept
    paths, their residuals and squared errors, best first, ties to the
    lowest (path, code).

    Only the candidates that may rank among the best (their lower bound at
    most the ``beam_size``-th smallest upper bound of the row, the cut) get
    exact distances: a direct float64 sum over the features, whose
    differences are the kept paths' new residuals.  Where a code that
    ``found`` left out of a path may lie below the cut (its ``floor``: 1 %
    of the rows of image patches at beam 5, against the 8 % of paths whose
    nearest codes the float32 search left uncertain), that path gets its
    exact nearest codes first.
    """
    n_rows, n_paths, n_features = residual.shape
    k = found.labels.shape[1]
    width = n_paths * k
    keep = min(beam_size, width)
    labels = found.labels.reshape(n_rows, width)
    approx = found.sq_dist.reshape(n_rows, width)
    slack = np.repeat(found.slack.reshape(n_rows, n_paths), k, axis=1)
    cut = _kth_smallest(approx + slack, keep)
    # Paths a code left out of ``found`` may extend into the best: exact.
    open_paths = np.flatnonzero(found.floor.reshape(n_rows, n_paths) <= cut[:, None])
    if open_paths.size:
        exact_labels, exact_sq = index.nearest_k(
            residual.reshape(-1, n_features)[open_paths], k, n_jobs=1
        )
        labels, approx = labels.copy(), approx.copy()
        labels.reshape(-1, k)[open_paths] = exact_labels
        approx.reshape(-1, k)[open_paths] = exact_sq
        slack.reshape(-1, k)[open_paths] = 0.0
        open_rows = np.unique(open_paths // n_paths)
        cut[open_rows] = _kth_smallest(approx[open_rows] + slack[open_rows], keep)
    alive = approx - slack <= cut[:, None]
    row, column = np.nonzero(alive)  # rows ascending, at least `keep` each
    parent = column // k
    code = labels[row, column]
    vectors = _vectors(index)
    # Flat gathers (far cheaper than 2-D fancy indexing) into reused buffers:
    # where the bounds leave many candidates alive (low-rank data), fresh
    # ones page-fault on every block.  mode="clip": the indices are valid.
    shape = (row.shape[0], n_features)
    diff = scratch("extension-residuals", shape, np.float64)
    chosen = scratch("extension-vectors", shape, np.float64)
    np.take(residual.reshape(-1, n_features), row * n_paths + parent, 0, diff, "clip")
    diff -= np.take(vectors, code, 0, chosen, "clip")
    sq = np.einsum("ij,ij->i", diff, diff)
    tie = parent * vectors.shape[0] + code  # ties to the lowest (path, code)
    take = _row_best(row, sq, tie, n_rows, keep)
    new_paths = np.concatenate(
        [
            np.take(
                paths.reshape(n_rows * n_paths, -1),
                row[take] * n_paths + parent[take],
                axis=0,
            ).reshape(n_rows, keep, -1),
            code[take].reshape(n_rows, keep, 1),
        ],
        axis=2,
    )
    new_residual = np.take(diff, take, axis=0).reshape(n_rows, keep, n_features)
    return new_paths, new_residual, sq[take].reshape(n_rows, keep)


def _kth_smallest(values, kth):
    """The ``kth`` smallest of each row of ``values`` (1-based)."""
    if kth == values.shape[1]:
        return values.max(axis=1)
    return np.partition(values, kth - 1, axis=1)[:, kth - 1]


def _row_best(row, sq, tie, n_rows, keep):
    """Positions of the ``keep`` smallest ``(sq, tie)`` of every row, in
    order (``row`` ascending, at least ``keep`` entries a row).

    The entries are laid out one row of the table per row, padded after
    each row's own with ``(inf, max)``, which rank after all of them: a
    small sort per row, three times faster than one sort of all the entries
    by ``(row, sq, tie)``.
    """
    starts = np.searchsorted(row, np.arange(n_rows))
    rank = np.arange(row.shape[0]) - starts[row]
    width = int(rank.max()) + 1
    if width == keep:  # every row has exactly its ``keep`` candidates
        order = np.lexsort((tie.reshape(n_rows, keep), sq.reshape(n_rows, keep)))
        return (order + starts[:, None]).reshape(-1)
    table_sq = np.full((n_rows, width), np.inf)
    table_tie = np.full((n_rows, width), _LAST_TIE, dtype=tie.dtype)
    table_sq[row, rank] = sq
    table_tie[row, rank] = tie
    order = np.lexsort((table_tie, table_sq))[:, :keep]
    return (order + starts[:, None]).reshape(-1)


def decode(indexes, codes, dtype=np.float64):
    """The sum of one code vector per stage (float64, cast to ``dtype``)."""
    total = _vectors(indexes[0])[codes[:, 0]].copy()
    for s in range(1, codes.shape[1]):
        total += _vectors(indexes[s])[codes[:, s]]
    return total.astype(dtype, copy=False)


# ---------------------------------------------------------- least squares
def normal_equations(X, sample_weight, codes, n_codes):
    """``B^T W B`` and ``B^T W X`` for the one-hot code matrix ``B`` of
    ``codes`` (all code books side by side): sums over rows, so the parts of
    the rows add up."""
    n_samples, n_codebooks = codes.shape
    columns = codes + n_codes * np.arange(n_codebooks)
    onehot = sparse.csr_matrix(
        (
            np.repeat(sample_weight, n_codebooks),
            columns.ravel(),
            np.arange(0, n_samples * n_codebooks + 1, n_codebooks),
        ),
        shape=(n_samples, n_codebooks * n_codes),
    )
    indicator = onehot.copy()
    indicator.data[:] = 1.0
    gram = (indicator.T @ onehot).toarray()
    rhs = np.asarray(onehot.T @ X.astype(np.float64, copy=False))
    return gram, rhs


def solve_codebooks(gram, rhs, codebooks, ridge=1e-6):
    """Code books that best reconstruct the rows from fixed codes, jointly.

    The code books ``C`` minimising ``sum w_i ||x_i - (B C)_i||^2`` solve the
    normal equations ``B^T W B C = B^T W X``.  A ridge of ``ridge`` times the
    mean count pulls every code towards its current vector: it settles the
    directions the data leave free (a shift of one code book undone by
    another) and keeps unused codes in place.

    Returns
    -------
    codebooks : list of ndarray of shape (n_codes, n_features), float64
    """
    gram = gram.copy()
    current = np.vstack(codebooks).astype(np.float64)
    strength = ridge * max(float(np.trace(gram)) / gram.shape[0], 1e-300)
    gram[np.diag_indices_from(gram)] += strength
    rhs = rhs + strength * current
    solved = linalg.solve(gram, rhs, assume_a="pos")
    return np.split(solved, len(codebooks))


def least_squares_codebooks(X, sample_weight, codes, codebooks, ridge=1e-6):
    """:func:`solve_codebooks` of the normal equations of ``X`` and ``codes``."""
    gram, rhs = normal_equations(X, sample_weight, codes, codebooks[0].shape[0])
    return solve_codebooks(gram, rhs, codebooks, ridge)


# ---------------------------------------------------------------- requests
@dataclass(frozen=True)
class _StagesRequest(Request):
    """A request about the states of several stages (known by version)."""

    versions: tuple = ()
    states: tuple = field(default=(), compare=False, repr=False)
    beam_size: int = 1

    single_key = False  # they read the rows themselves and every stage

    def indexes(self):
        return {s.version: s.index for s in self.states}

    def detached(self):
        return replace(self, states=())

    def stage_indexes(self, indexes):
        return [indexes[v] for v in self.versions]


@dataclass
class _Paths:
    """What a block keeps of the greedy stage loop: each row's kept paths
    and the indexes of the stages so far."""

    rows: int
    paths: np.ndarray | None = None
    indexes: list = field(default_factory=list)


@dataclass(frozen=True)
class AdvanceStages(_StagesRequest):
    """Extend the blocks' paths by the last of ``states`` (if any) and make
    the residual of each row's best path the rows of stage ``key``."""

    def sets_rows_of(self):
        return (self.key,)

    def on_block(self, block, rows, indexes, n_jobs):
        memory = block.extras.get("paths")
        if memory is None or memory.rows != rows or not self.versions:
            memory = block.extras["paths"] = _Paths(rows)
        X = block.X[:rows]
        if not self.versions:
            block.set_view(self.key, X)
            return None
        index = indexes[self.versions[-1]]
        memory.paths, _ = extend_beams(
            X, memory.paths, memory.indexes, index, self.beam_size, n_jobs
        )
        memory.indexes.append(index)
        target = X - decode(memory.indexes, memory.paths[:, 0])
        block.set_view(self.key, target.astype(X.dtype))
        return None

    def merge(self, parts):
        return None


@dataclass(frozen=True)
class HeldOutError:
    """The weighted squared error of encoding the held-out rows, and their
    weight (additive over blocks)."""

    error: float = 0.0
    weight: float = 0.0

    @property
    def mean_error(self):
        return self.error / self.weight

    def __add__(self, other):
        return HeldOutError(self.error + other.error, self.weight + other.weight)


@dataclass(frozen=True)
class SampleCodes:
    """The codes of a sample's distinct rows by a chain of code books, as
    its beam search ends (:func:`greedy_stages`), and what they leave of
    each row (squared): the encoding of any equal row, found by value."""

    points: np.ndarray  # (n_points, n_features), distinct
    codes: np.ndarray  # (n_points, n_stages), dtype=intp
    sq_err: np.ndarray  # (n_points,), float64

    def encode(self, X, search):
        """Codes and squared errors of the rows of ``X``: those of the equal
        point where there is one, else from ``search(rows)`` (beam search
        with the same code books: the same numbers either way)."""
        position = positions_in(X, self.points)
        codes = np.empty((X.shape[0], self.codes.shape[1]), dtype=np.intp)
        sq_err = np.empty(X.shape[0])
        known = np.flatnonzero(position >= 0)
        codes[known] = self.codes[position[known]]
        sq_err[known] = self.sq_err[position[known]]
        unknown = np.flatnonzero(position < 0)
        if unknown.size:
            codes[unknown], sq_err[unknown] = search(X[unknown])
        return codes, sq_err


@dataclass(frozen=True)
class Encoding:
    """Each code's weight and error from encoding the rows, the error of
    the held-out rows, and the normal equations of the codes of the other
    rows."""

    counts: np.ndarray  # (n_stages, n_codes)
    distortions: np.ndarray  # (n_stages, n_codes)
    held_out: HeldOutError = HeldOutError()
    gram: np.ndarray | None = None
    rhs: np.ndarray | None = None

    def __add__(self, other):
        return Encoding(
            self.counts + other.counts,
            self.distortions + other.distortions,
            self.held_out + other.held_out,
            None if self.gram is None else self.gram + other.gram,
            None if self.rhs is None else self.rhs + other.rhs,
        )


def held_out(X):
    """Whether each row is held out of the refinement's solves (a share
    ``HELD_OUT_SHARE`` of the rows, by their values alone): those of
    highest priority, the last that a canonical training sample takes (so
    that, on data larger than the stage trainer's sample, the greedy
    stages never saw them)."""
    return row_priority(X) >= 1.0 - HELD_OUT_SHARE


def _held_out_rows(block, rows):
    """:func:`held_out` of the block's first ``rows`` rows, computed once a
    block (60 ms for 32,000 x 192): the refinement asks for it in every
    encoding and every per-stage step."""
    check = block.extras.get("held_out")
    if check is None or check.shape[0] != rows:
        check = block.extras["held_out"] = held_out(block.X[:rows])
    return check


@dataclass(frozen=True)
class Encode(_StagesRequest):
    """Encode the rows with ``states`` (the blocks keep the codes); with
    ``normal_equations``, also the normal equations of those codes on the
    rows that are not held out.  With ``known`` (:class:`SampleCodes` by
    the same states), the rows it holds take their codes from it and only
    the others are searched."""

    n_codes: int = 0
    normal_equations: bool = False
    known: SampleCodes | None = None

    def on_block(self, block, rows, indexes, n_jobs):
        X, weights = block.X[:rows], block.weights[:rows]
        stage_indexes = self.stage_indexes(indexes)

        def search(rows):
            return beam_search(rows, stage_indexes, self.beam_size, n_jobs)

        if self.known is None:
            codes, sq_err = search(X)
        else:
            codes, sq_err = self.known.encode(X, search)
        block.extras["codes"] = codes
        n_stages = codes.shape[1]
        counts = np.stack(
            [np.bincount(codes[:, s], weights, self.n_codes) for s in range(n_stages)]
        )
        lost = weights * sq_err
        distortions = np.stack(
            [np.bincount(codes[:, s], lost, self.n_codes) for s in range(n_stages)]
        )
        check = _held_out_rows(block, rows)
        gram = rhs = None
        if self.normal_equations:
            solve = ~check
            gram, rhs = normal_equations(
                X[solve], weights[solve], codes[solve], self.n_codes
            )
        return Encoding(
            counts,
            distortions,
            HeldOutError(float(lost[check].sum()), float(weights[check].sum())),
            gram,
            rhs,
        )

    def merge(self, parts):
        return sum_parts(parts)


@dataclass(frozen=True)
class EncodeHeldOut(_StagesRequest):
    """Encode only the held-out rows with ``states``: what a refinement
    pass needs to be judged (an eighth of a full :class:`Encode`)."""

    def on_block(self, block, rows, indexes, n_jobs):
        check = _held_out_rows(block, rows)
        X, weights = block.X[:rows][check], block.weights[:rows][check]
        _, sq_err = beam_search(X, self.stage_indexes(indexes), self.beam_size, n_jobs)
        return HeldOutError(float(weights @ sq_err), float(weights.sum()))

    def merge(self, parts):
        return sum_parts(parts)


@dataclass(frozen=True)
class StageStatistics(_StagesRequest):
    """The statistics of stage ``key`` towards what the other stages (at
    ``states``) leave of each row, for the codes of the last encoding."""

    n_codes: int = 0

    def sets_rows_of(self):
        return (self.key,)

    def on_block(self, block, rows, indexes, n_jobs):
        X = block.X[:rows]
        encoding = _JointEncoding.of(
            X, self.stage_indexes(indexes), self.versions, block.extras["codes"]
        )
        # The held-out rows judge the refinement: they take no part in it.
        weights = np.where(_held_out_rows(block, rows), 0.0, block.weights[:rows])
        return stage_targets(
            block, rows, self.key, encoding, self.n_codes, n_jobs, weights
        ).stats

    def merge(self, parts):
        return sum_parts(parts)


@dataclass(frozen=True)
class _JointEncoding:
    """The rows of a block encoded by every stage: the stages' indexes and
    versions, the codes, what they leave of each row (float64) and its
    squared norm."""

    indexes: list
    versions: tuple
    codes: np.ndarray
    residual: np.ndarray
    sq_dist: np.ndarray

    @classmethod
    def of(cls, X, indexes, versions, codes):
        residual = X.astype(np.float64)
        residual -= decode(indexes, codes)
        sq_dist = np.einsum("ij,ij->i", residual, residual)
        return cls(indexes, versions, codes, residual, sq_dist)


def stage_targets(block, rows, s, encoding, n_codes, n_jobs, weights, cells=()):
    """What stage ``s`` should reproduce of each row: the row less the other
    stages' code vectors, i.e. what all the stages leave plus its own code
    vector (whose distance to that target is the residual's norm).

    The targets become the stage's rows in the block, remembered with their
    codes and squared distances (for re-seeding).  Returns their statistics,
    each row weighted by ``weights``, and the rows of ``cells``.
    """
    X = block.X[:rows]
    codes, sq_dist = encoding.codes[:, s], encoding.sq_dist
    target = encoding.residual + _vectors(encoding.indexes[s])[codes]
    target = target.astype(X.dtype, copy=False)
    block.set_view(s, target)
    memory = block.memory(s, rows)
    memory.version, memory.labels, memory.sq_dist = encoding.versions[s], codes, sq_dist
    stats = assignment_statistics(
        target, codes, sq_dist, weights, n_codes, n_jobs=n_jobs
    )
    members = None
    if cells:
        min_rows = MIN_SPLIT_ROWS if block.holds_all else 1
        members = cell_members(target, weights, codes, cells, min_rows)
    return StepResult(stats, members)


@dataclass(frozen=True)
class JointStatistics(_StagesRequest):
    """A stream's step of every stage from one joint encoding of the rows:
    the statistics of each stage's targets and the rows of its ``cells``."""

    n_codes: int = 0
    cells: tuple = ()  # one tuple of cells per stage

    def sets_rows_of(self):
        return tuple(range(len(self.versions)))

    def on_block(self, block, rows, indexes, n_jobs):
        stage_indexes = self.stage_indexes(indexes)
        X = block.X[:rows]
        codes, _ = beam_search(X, stage_indexes, self.beam_size, n_jobs)
        encoding = _JointEncoding.of(X, stage_indexes, self.versions, codes)
        weights = block.weights[:rows]
        return [
            stage_targets(
                block, rows, s, encoding, self.n_codes, n_jobs, weights, self.cells[s]
            )
            for s in range(len(stage_indexes))
        ]

    def merge(self, parts):
        return [
            StepResult.merged(
                [part[s] for part in parts], with_members=bool(self.cells[s])
            )
            for s in range(len(self.versions))
        ]


# ---------------------------------------------------------------- training
@dataclass(frozen=True)
class ResidualOutcome:
    """Trained stage states, full steps of their fits, refinement passes."""

    states: tuple
    n_iter: int = 0
    n_refinements: int = 0


class ResidualTraining:
    """The greedy stage loop and the refinement, on one data source.

    ``rngs`` holds one random generator per stage (its fit's draws).
    """

    def __init__(self, config, source, beam_size, rngs):
        self.config = config
        self.source = source
        self.beam_size = beam_size
        self.rngs = rngs

    def fit(self):
        """``fit``: greedy stages trained on a sample by the stage trainer,
        then joint refinement (a generator returning a
        :class:`ResidualOutcome`)."""
        trainer = StageTrainer.progressive(self.config)
        sample = yield InitSample(0, None, trainer.max_rows)
        warn_if_few_rows(sample.n_rows, self.config.n_codes)
        greedy = greedy_stages(
            sample.points.astype(self.source.dtype),
            sample.weights,
            trainer,
            self.beam_size,
            self.rngs,
            self.source.unit,
        )
        # The sample's codes spare the first encoding a search of the rows
        # (a ninth of the patches' fit at beam 5) when the sample holds them
        # all (a capped one would leave most rows to search, after a lookup
        # of every row) and requests are served in this process (to
        # workers, the sample would travel with every request).
        complete = sample.n_rows < trainer.max_rows
        use_sample = complete and self.source.serves_locally
        known = greedy.sample_codes if use_sample else None
        states, n_refinements = yield from self.refine(greedy.states, known)
        return ResidualOutcome(states, greedy.n_iter, n_refinements)

    def start(self):
        """The first ``partial_fit``: every stage initialised from the
        residuals of the batch, then one joint step (a generator returning
        the states)."""
        states = []
        for s, rng in enumerate(self.rngs):
            yield self._advance(states, s)
            state = yield from initial_state(
                self.config, self.source, s, None, self.config.init_rows, rng
            )
            states.append(state)
        return (yield from joint_step(self.config, tuple(states), self.beam_size))

    def _advance(self, states, key):
        return AdvanceStages(
            key,
            None,
            tuple(s.version for s in states[-1:]),
            tuple(states[-1:]),
            self.beam_size,
        )

    def refine(self, states, known=None):
        """Joint passes after the greedy training: re-solve, re-encode,
        repeat (a generator returning the states and the passes kept).
        ``known``: :class:`SampleCodes` by ``states`` for the first encoding.

        Each pass re-solves every code book at once for the current codes
        (least squares from the normal equations of the last encoding; a
        Lloyd step per stage in turn when the system would be too large),
        from the rows that are not held out, then encodes the rows again.  A pass
        is kept only if it lowers the error of the held-out rows by
        ``REFINE_RTOL``; the first pass that does not is undone and ends the
        refinement, so refinement never raises the held-out error.  There is
        no refinement without held-out rows, nor with fewer rows than codes
        in all (the solve would be underdetermined; faiss refuses it too).
        """
        config = self.config
        n_codes = config.n_codes
        joint = len(states) * n_codes <= JOINT_SOLVE_MAX
        underdetermined = self.source.plan.n_rows < len(states) * n_codes
        # The normal equations only when a solve may follow.
        encoding = yield self._encode(states, joint and not underdetermined, known)
        n_refinements = 0
        if underdetermined or not encoding.held_out.weight > 0:
            return self._with_usage(states, encoding), n_refinements
        for _ in range(REFINE_PASSES):
            if joint:
                candidate = self._solved(states, encoding)
            else:
                candidate = yield from self._stage_steps(states)
            # Judged on the held-out rows alone: most passes are undone, and
            # a full encoding is only needed for a kept one.
            check = yield EncodeHeldOut(
                0,
                None,
                tuple(s.version for s in candidate),
                tuple(candidate),
                self.beam_size,
            )
            best, error = encoding.held_out.mean_error, check.mean_error
            kept = error < best * (1.0 - REFINE_RTOL)
            if config.verbose:
                unit2 = states[0].unit * states[0].unit
                print(
                    f"Refinement {n_refinements + 1}: held-out error "
                    f"{best * unit2:.6g} -> {error * unit2:.6g}, "
                    f"{'kept' if kept else 'undone'}."
                )
            if not kept:
                break
            states = candidate
            encoding = yield self._encode(states, joint)
            n_refinements += 1
        return self._with_usage(states, encoding), n_refinements

    def _encode(self, states, joint, known=None):
        return Encode(
            0,
            None,
            tuple(s.version for s in states),
            tuple(states),
            self.beam_size,
            self.config.n_codes,
            joint,
            known,
        )

    def _solved(self, states, encoding):
        """Every stage's vectors solved jointly; unused codes keep theirs."""
        solved = solve_codebooks(encoding.gram, encoding.rhs, [s.codes for s in states])
        new = []
        for state, vectors, counts in zip(states, solved, encoding.counts, strict=True):
            codes = state.codes.copy()
            used = counts > 0
            codes[used] = vectors[used]
            new.append(state.with_codes(codes))
        return tuple(new)

    def _with_usage(self, states, encoding):
        """Counts and distortions of an encoding (per ``batch_rows``)."""
        scale = self.source.plan.batch_rows / self.source.plan.n_rows
        return tuple(
            state.installed(
                state.codes,
                np.maximum(scale * counts, COUNT_FLOOR),
                scale * distortions,
            )
            for state, counts, distortions in zip(
                states, encoding.counts, encoding.distortions, strict=True
            )
        )

    def _stage_steps(self, states):
        """A Lloyd step per stage in turn, each towards what the others
        (at their latest vectors) leave of the rows that are not held out
        (a generator)."""
        states = list(states)
        scale = self.source.plan.batch_rows / self.source.plan.n_rows
        for s in range(len(states)):
            stats = yield StageStatistics(
                s,
                None,
                tuple(t.version for t in states),
                tuple(states),
                self.beam_size,
                self.config.n_codes,
            )
            states[s] = yield from full_update(
                self.config, states[s], stats, s, None, scale
            )
        return tuple(states)


class GreedyStages(NamedTuple):
    """What :func:`greedy_stages` trained: the stages' states, the Lloyd
    iterations made, and the sample's codes by all the stages."""

    states: tuple
    n_iter: int
    sample_codes: SampleCodes


def greedy_stages(X, weights, trainer, beam_size, rngs, unit):
    """The greedy stage loop of ``fit`` on an in-memory sample (a
    :class:`GreedyStages`).

    Stage ``s`` is fitted by ``trainer`` (a
    :class:`~skvq._stage_trainer.StageTrainer`) to what every kept path of
    the rows leaves after the stages before it (:func:`beam_pool`): the
    code books learn from the residuals that beam search will produce.
    ``rngs[s]`` draws the stage's pool, its seeding, then the seed of its
    re-seeding draws.  The paths extended by the last stage are the beam
    search of the sample (the same codes as :func:`beam_search`).
    """
    states, paths, n_iter = [], None, 0
    for rng in rngs:
        indexes = [state.index for state in states]
        if states:
            paths, _ = extend_beams(
                X, paths, indexes[:-1], indexes[-1], beam_size, trainer.n_jobs
            )
        pool = beam_pool(X, weights, paths, indexes, trainer.max_rows, rng)
        fit = trainer.fit(*pool, rng)
        n_iter += fit.n_iter
        seed = int(rng.randint(np.iinfo(np.int32).max))
        states.append(
            CodebookState.initial(
                fit.codes, algorithm=trainer.algorithm, seed=seed, unit=unit
            )
        )
    indexes = [state.index for state in states]
    paths, sq_err = extend_beams(
        X, paths, indexes[:-1], indexes[-1], beam_size, trainer.n_jobs
    )
    codes = SampleCodes(X, paths[:, 0], sq_err[:, 0])
    return GreedyStages(tuple(states), n_iter, codes)


def beam_pool(X, weights, paths, indexes, max_rows, rng):
    """What each kept path leaves of its row (``X`` itself before the first
    stage), weighted as its row: at most ``max_rows`` of them, drawn
    uniformly without replacement; in ``X``'s dtype."""
    n_paths = 1 if paths is None else paths.shape[1]
    n_pool = X.shape[0] * n_paths
    chosen = np.arange(n_pool)
    if n_pool > max_rows:
        chosen = np.sort(rng.choice(n_pool, size=max_rows, replace=False))
    rows, path = np.divmod(chosen, n_paths)
    if paths is None:
        return X[rows], weights[rows]
    # In blocks that stay in cache: the float64 residuals of the whole pool
    # at once (100 MB for 65,536 rows of 192 features) took 10 times as long.
    left = np.empty((rows.shape[0], X.shape[1]), dtype=X.dtype)
    block = max(1, _POOL_BLOCK_ELEMENTS // max(1, X.shape[1]))
    for lo in range(0, rows.shape[0], block):
        part = slice(lo, lo + block)
        block_paths = paths[rows[part], path[part]][:, None, :]
        left[part] = residuals(X[rows[part]], block_paths, indexes)[:, 0]
    return left, weights[rows]


def joint_step(config, states, beam_size):
    """A stream's step: one joint encoding of the batch, then an EMA step and
    the upkeep of every stage (a generator returning the new states); the
    pools of the stages whose codes died come from one request."""
    versions = tuple(s.version for s in states)
    results = yield JointStatistics(
        0,
        None,
        versions,
        tuple(states),
        beam_size,
        config.n_codes,
        tuple(split_candidates(s, config) for s in states),
    )
    updates = [
        stream_apply(config, state, result)
        for state, result in zip(states, results, strict=True)
    ]
    dying = tuple(s for s, (_, dead, _) in enumerate(updates) if dead.any())
    pools = {}
    if dying:
        pools = yield JointPool(
            0, None, versions, tuple(states), beam_size, config.init_rows, dying
        )
    return tuple(
        stream_finish(config, new, dead, mean_count, pools.get(s), result)
        for s, ((new, dead, mean_count), result) in enumerate(
            zip(updates, results, strict=True)
        )
    )


@dataclass(frozen=True)
class JointPool(_StagesRequest):
    """The rows a stream's dead codes of each of ``stages`` are re-seeded
    from: what that stage should reproduce of the batch's ``max_rows``
    distinct rows of lowest priority (a canonical subset of the rows
    themselves), under the step's joint encoding by ``states``, with their
    squared distances.  Answers ``stage -> pool``."""

    max_rows: int = 0
    stages: tuple = ()

    def on_block(self, block, rows, indexes, n_jobs):
        X, weights = block.X[:rows], block.weights[:rows]
        chosen = canonical_sample(X, weights, max_rows=self.max_rows)
        stage_indexes = self.stage_indexes(indexes)
        points = chosen.points.astype(X.dtype)
        codes, _ = beam_search(points, stage_indexes, self.beam_size, n_jobs)
        encoding = _JointEncoding.of(points, stage_indexes, self.versions, codes)
        targets = {
            s: (
                encoding.residual + _vectors(stage_indexes[s])[codes[:, s]],
                encoding.sq_dist,
            )
            for s in self.stages
        }
        return _StagePools(chosen, targets)

    def merge(self, parts):
        parts = [p for p in parts if p.rows.n_rows]
        offsets = np.cumsum([0] + [p.rows.n_rows for p in parts[:-1]])
        merged = canonical_sample(
            np.concatenate([p.rows.points for p in parts]),
            np.concatenate([p.rows.weights for p in parts]),
            np.concatenate(
                [
                    o + np.arange(p.rows.n_rows)
                    for o, p in zip(offsets, parts, strict=True)
                ]
            ),
            self.max_rows,
        )
        targets = {
            s: tuple(
                np.concatenate([p.targets[s][j] for p in parts])[merged.values]
                for j in (0, 1)
            )
            for s in self.stages
        }
        return _StagePools(WeightedRows(merged.points, merged.weights), targets)


@dataclass(frozen=True)
class _StagePools:
    """A :class:`JointPool` (or a block's part of one): the chosen rows and
    each stage's targets of them (equal rows have equal targets, so parts
    merge by rows).  ``get(stage)`` is that stage's pool, as re-seeding
    reads rows: targets, weights and squared distances."""

    rows: WeightedRows
    targets: dict  # stage -> (target rows, squared distances)

    def get(self, stage):
        if stage not in self.targets:
            return None
        target, sq_dist = self.targets[stage]
        return WeightedRows(target, self.rows.weights, sq_dist)
