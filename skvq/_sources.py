"""Data sources: where the rows of a training run live, and what they compute.

The training schedules (:mod:`skvq._schedule`, :mod:`skvq._residual`) never
touch rows.  They send *requests* (the statistics of a step, the rows of some
cells, a canonical sample) to a *source*, which serves a batch of requests
in one pass over its rows and answers each with one merged result:

- :class:`InMemorySource` holds the rows as one :class:`RowBlock` in this
  process (NumPy input); the kernels inside use threads;
- :class:`skvq._dask.DaskSource` holds one :class:`RowBlock` per chunk,
  persisted on the workers (Dask input); each request runs on every block
  concerned, and the parts are tree-reduced.

A request knows how to run on one block (:meth:`Request.on_block`) and how to
merge the parts of several (:meth:`Request.merge`); its parts add up exactly
(statistics) or merge canonically (samples of rows), so both sources give the
same answers, to the rounding of the sums.  Per-row memory that a request
leaves (labels, squared distances, distance bounds) stays with the block,
tagged with the code book version that produced it.

A source also fixes the *stage plan* of ``fit``: growing, nested sets of
rows.  Stage membership is decided row by row, from a hash of the row's
values (:func:`~skvq._rows.stage_priority`): the first stage holds the rows
of priority below ``n_1 / n``, the next those below ``n_2 / n``, and so on.
The stages are therefore the same sets of rows on every backend and for any
chunking (and at any power-of-two scale of the data); each block keeps its
rows sorted by stage, so that a stage is a prefix of every block.  Sparse
rows in memory are not copied sorted: their block gathers the rows of the
stage in use (in their original order) and trains the last stage on the
rows as given (see :class:`RowBlock`).
"""

from dataclasses import dataclass, field, replace

import numpy as np

from ._kernels import BatchStatistics, LloydBounds, Moments, batch_statistics
from ._relocation import MIN_SPLIT_ROWS, cell_members, merge_members
from ._rows import canonical_sample, merge_samples, stage_priority
from ._sparse import head, is_sparse, scaled
from ._state import unit_for

# fit keeps distance bounds on stages of at least this many row-code pairs:
# below, their bookkeeping costs more than it saves.
BOUNDS_MIN_SCORES = 2**18
# fit's first stage holds this many batches (or 3 * n_codes rows).
FIRST_STAGE_BATCHES = 32


def stage_sizes(n_rows, batch_size, n_codes):
    """Rows of each stage of ``fit``: doubling prefixes, the last all rows."""
    if batch_size >= n_rows:
        return [n_rows]
    first = max(3 * n_codes, FIRST_STAGE_BATCHES * batch_size)
    sizes = [min(first, n_rows)]
    while sizes[-1] < n_rows:
        sizes.append(min(2 * sizes[-1], n_rows))
    return sizes


def stage_thresholds(n_rows, batch_size, n_codes):
    """Priority bounds of the stages of a ``fit`` on ``n_rows`` rows: stage
    ``s`` holds the rows of priority below ``bounds[s]`` (the last bound, 1,
    holds them all)."""
    sizes = stage_sizes(n_rows, batch_size, n_codes)
    return tuple(size / n_rows for size in sizes[:-1]) + (np.inf,)


def sorted_by_stage(X, sample_weight, bounds, exponent):
    """The rows (and weights) sorted by stage, and the rows of each stage.

    Returns
    -------
    X, sample_weight : ndarray
        Copies in stage order (rows of a stage in their original order).
    stage_rows : tuple of int
        Rows of stage ``s`` (a prefix), growing.
    """
    if len(bounds) == 1:
        return X, sample_weight, (X.shape[0],)
    order, stage_rows = stage_order(X, bounds, exponent)
    return X[order], sample_weight[order], stage_rows


def stage_order(X, bounds, exponent):
    """The rows in stage order (a stable sort of their stages), and the rows
    of each stage (see :func:`sorted_by_stage`)."""
    stage = np.searchsorted(bounds, stage_priority(X, exponent), side="right")
    order = np.argsort(stage, kind="stable")
    counts = np.bincount(stage, minlength=len(bounds))
    return order, tuple(int(c) for c in np.cumsum(counts))


def data_exponent(max_abs_value):
    """The binary exponent of the largest magnitude (0 for all-zero data)."""
    return int(np.frexp(max_abs_value)[1]) if max_abs_value > 0 else 0


@dataclass(frozen=True)
class StagePlan:
    """Rows of each stage of a source (one stage for a stream's batch)."""

    rows: tuple  # rows of each stage, growing; the last is all rows
    batch_rows: int  # rows of a stream's batch: the unit of fit's counts

    @property
    def n_rows(self):
        return self.rows[-1]

    def scale(self, stage):
        """The factor that expresses a full step's statistics per batch."""
        return self.batch_rows / self.rows[stage]


# ------------------------------------------------------------------ blocks
@dataclass
class RowMemory:
    """What the last requests left for the rows of one key of a block."""

    rows: int  # the prefix of the block's rows this memory covers
    bounds: LloydBounds | None = None
    version: int | None = None  # code book version of labels and sq_dist
    labels: np.ndarray | None = None
    sq_dist: np.ndarray | None = None


class RowBlock:
    """A block of rows (in internal units), their weights, and their memory.

    ``columns`` maps a key to the features it sees (``(start, stop)``); a
    key without an entry sees every feature, unless a view was set for it
    (the residual targets of a stage).

    Stage ``s`` is made of ``stage_rows[s]`` rows: the first ones when the
    rows are sorted by stage; with a ``stage_order`` (the rows in stage
    order, :func:`stage_order`), the rows it names first, gathered in
    their original order when the stage is first asked for and kept until
    another stage is (the last stage is the rows as given).  The second
    form spares a copy of the rows for sparse input to ``fit``.
    """

    def __init__(
        self,
        X,
        weights,
        columns=None,
        *,
        stage_rows=None,
        holds_all=False,
        stage_order=None,
    ):
        self.X = X
        self.weights = weights
        self.columns = columns or {}
        self.stage_rows = stage_rows or (X.shape[0],)
        self.stage_order = stage_order
        self._gathered = {}  # key -> (rows, rows of the stage, their weights)
        # Whether this block holds every row of its source: per-cell filters
        # on row counts are then exact.
        self.holds_all = holds_all
        self.extras = {}  # what a trainer keeps per block (residual paths)
        self._views = {}
        self._memory = {}

    @property
    def n_rows(self):
        return self.X.shape[0]

    def rows_in(self, stage):
        """Rows of the block in ``stage`` (None: all of them)."""
        return self.n_rows if stage is None else self.stage_rows[stage]

    def view(self, key):
        """The rows that ``key`` trains on."""
        found = self._views.get(key)
        if found is not None:
            return found
        start, stop = self.columns.get(key, (0, self.X.shape[1]))
        if (start, stop) == (0, self.X.shape[1]):
            return self.X
        found = self._views[key] = np.ascontiguousarray(self.X[:, start:stop])
        return found

    def rows_of(self, key, rows):
        """The rows of :meth:`view` in the stage of ``rows`` rows (the
        first ones, a view of the arrays, also for sparse rows; or gathered,
        see the class docstring)."""
        return self._stage_rows_of(key, rows)[0]

    def weights_of(self, key, rows):
        """The weights of :meth:`rows_of`."""
        return self._stage_rows_of(key, rows)[1]

    def _stage_rows_of(self, key, rows):
        if self.stage_order is None or rows == self.n_rows:
            self._gathered.pop(key, None)
            return head(self.view(key), rows), self.weights[:rows]
        gathered = self._gathered.get(key)
        if gathered is None or gathered[0] != rows:
            self._gathered.pop(key, None)  # before the next copy is made
            chosen = np.sort(self.stage_order[:rows])
            gathered = (rows, self.view(key)[chosen], self.weights[chosen])
            self._gathered[key] = gathered
        return gathered[1:]

    def set_view(self, key, values):
        """Make ``key`` train on ``values`` (one row per row of the block)."""
        self._views[key] = values
        self._memory.pop(key, None)

    def memory(self, key, rows):
        """The memory of ``key`` for the first ``rows`` rows (fresh when the
        prefix changed)."""
        memory = self._memory.get(key)
        if memory is None or memory.rows != rows:
            memory = self._memory[key] = RowMemory(rows)
        return memory

    def assignment(self, key, rows, index, version, n_jobs):
        """Labels and squared distances of the first ``rows`` rows of ``key``
        under code book ``version``: remembered, or searched now."""
        memory = self.memory(key, rows)
        if memory.version != version or memory.sq_dist is None:
            X = self.rows_of(key, rows)
            labels, sq_dist = index.nearest(X, n_jobs=n_jobs, return_sq_dist=True)
            memory.version, memory.labels, memory.sq_dist = version, labels, sq_dist
        return memory.labels, memory.sq_dist


# ---------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """Something a schedule asks of every row of a stage of a source.

    ``key`` names the code book (and so the view of the rows), ``stage`` the
    stage of the source's plan (None: all rows).  ``state`` stays with the
    schedule: blocks get :meth:`detached` copies and the search indexes of
    :meth:`indexes`.
    """

    key: int
    stage: int | None

    # Whether the request reads only the rows of ``key`` (its view), so that
    # a source may serve it from a copy of those rows alone.
    single_key = True

    def indexes(self):
        """``version -> CodebookIndex`` that the blocks need."""
        return {}

    def detached(self):
        """The request as it travels to the blocks."""
        return self

    def sets_rows_of(self):
        """Keys whose rows (views) the request replaces in the blocks."""
        return ()

    def on_block(self, block, rows, indexes, n_jobs):
        """The part of the result from the first ``rows`` rows of ``block``."""
        raise NotImplementedError

    def merge(self, parts):
        """The result from the parts of all the blocks concerned."""
        raise NotImplementedError


@dataclass(frozen=True)
class _StateRequest(Request):
    """A request about one code book state (known to the blocks by version)."""

    version: int = 0
    state: object = field(default=None, compare=False, repr=False)

    def indexes(self):
        return {self.version: self.state.index}

    def detached(self):
        return replace(self, state=None)


@dataclass(frozen=True)
class StepResult:
    """The statistics of a step, and the rows of the cells it was asked for."""

    stats: BatchStatistics
    members: dict | None = None

    @classmethod
    def merged(cls, parts, *, with_members):
        """The result of all the blocks from their ``parts``; the rows of the
        cells are merged only ``with_members``."""
        stats = sum_parts([part.stats for part in parts])
        members = None
        if with_members:
            members = merge_members([part.members for part in parts])
        return cls(stats, members)


def sum_parts(parts):
    """The sum of the blocks' ``parts`` in block order (the order of the
    float additions is fixed, so that every backend gets the same bits)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


@dataclass(frozen=True)
class Statistics(_StateRequest):
    """The statistics of one EMA step of ``state`` (its index assigns).

    ``bounds`` keeps distance bounds on the rows between the steps of a
    stage; ``cells`` asks for the rows of those cells too (a stream's
    relocation candidates).
    """

    n_codes: int = 0
    bounds: bool = False
    cells: tuple = ()

    @classmethod
    def of(cls, state, key, stage, *, bounds=False, cells=()):
        return cls(
            key, stage, state.version, state, state.n_codes, bounds, tuple(cells)
        )

    def on_block(self, block, rows, indexes, n_jobs):
        X, weights = block.rows_of(self.key, rows), block.weights_of(self.key, rows)
        memory = block.memory(self.key, rows)
        bounds = None
        if self.bounds:
            if memory.bounds is None:
                memory.bounds = LloydBounds(X.shape[1], X.dtype)
            bounds = memory.bounds
        stats, labels, sq_dist = batch_statistics(
            indexes[self.version], X, weights, self.n_codes, n_jobs, bounds
        )
        memory.version, memory.labels, memory.sq_dist = self.version, labels, sq_dist
        members = None
        if self.cells:
            # Cells of fewer rows than a split needs are dropped after the
            # merge; a block that holds all the rows can skip them now.
            min_rows = MIN_SPLIT_ROWS if block.holds_all else 1
            members = cell_members(X, weights, labels, self.cells, min_rows)
        return StepResult(stats, members)

    def merge(self, parts):
        return StepResult.merged(parts, with_members=bool(self.cells))


@dataclass(frozen=True)
class CellRows(_StateRequest):
    """The distinct rows (at most ``MAX_SPLIT_ROWS`` each) of ``cells``,
    assigned by the index of ``state`` (a state, or its
    :class:`~skvq._state.SearchedBy`)."""

    cells: tuple = ()

    @classmethod
    def of(cls, state, key, stage, cells):
        return cls(key, stage, state.version, state, tuple(int(c) for c in cells))

    def on_block(self, block, rows, indexes, n_jobs):
        labels, _ = block.assignment(
            self.key, rows, indexes[self.version], self.version, n_jobs
        )
        X, weights = block.rows_of(self.key, rows), block.weights_of(self.key, rows)
        return cell_members(X, weights, labels, self.cells)

    def merge(self, parts):
        return merge_members(parts)


@dataclass(frozen=True)
class ReseedPool(_StateRequest):
    """A canonical sample of at most ``max_rows`` distinct rows, with their
    squared distances to ``state``'s code book (those of the step that
    ``state`` made, when the blocks remember it)."""

    max_rows: int = 0

    @classmethod
    def of(cls, state, key, stage, max_rows):
        return cls(key, stage, state.version, state, max_rows)

    def on_block(self, block, rows, indexes, n_jobs):
        _, sq_dist = block.assignment(
            self.key, rows, indexes[self.version], self.version, n_jobs
        )
        X, weights = block.rows_of(self.key, rows), block.weights_of(self.key, rows)
        return canonical_sample(X, weights, sq_dist, self.max_rows)

    def merge(self, parts):
        return merge_samples(parts, self.max_rows)


@dataclass(frozen=True)
class InitSample(Request):
    """A canonical sample of at most ``max_rows`` distinct rows."""

    max_rows: int | None = None

    def on_block(self, block, rows, indexes, n_jobs):
        X, weights = block.rows_of(self.key, rows), block.weights_of(self.key, rows)
        return canonical_sample(X, weights, max_rows=self.max_rows)

    def merge(self, parts):
        return merge_samples(parts, self.max_rows)


@dataclass(frozen=True)
class Variance(Request):
    """The weighted feature moments of the rows (for ``tol``)."""

    def on_block(self, block, rows, indexes, n_jobs):
        return Moments.of(
            block.rows_of(self.key, rows), block.weights_of(self.key, rows)
        )

    def merge(self, parts):
        return sum_parts(parts)


# ----------------------------------------------------------------- sources
class InMemorySource:
    """The rows of a NumPy training run, as one block in this process.

    Build it with :func:`in_memory_source`.
    """

    # Requests are served here: large arrays in a request cost no transfer.
    serves_locally = True

    def __init__(self, block, plan, unit, n_jobs):
        self.block = block
        self.plan = plan
        self.unit = unit
        self.n_jobs = n_jobs
        self.dtype = block.X.dtype
        self.n_features = block.X.shape[1]

    def serve(self, requests):
        """The result of each request, in order."""
        results = []
        for request in requests:
            rows = self.block.rows_in(request.stage)
            part = request.on_block(self.block, rows, request.indexes(), self.n_jobs)
            results.append(request.merge([part]))
        return results


def max_abs(X):
    """The largest magnitude in ``X`` (without a temporary copy)."""
    if is_sparse(X):
        X = X.data
    if X.size == 0:
        return 0.0
    return float(max(X.max(), -X.min()))


def in_memory_source(
    X,
    sample_weight,
    *,
    n_jobs,
    batch_size,
    n_codes=None,
    fit=False,
    unit=None,
    columns=None,
    keep_rows=None,
):
    """An :class:`InMemorySource` over validated ``X`` (its rows are always
    kept: ``keep_rows`` is for the Dask sources).

    For a ``fit``, dense rows are copied sorted by stage and sparse rows
    get a stage order (see the module docstring); otherwise one stage holds
    the rows as they are (a stream's batch).  ``unit`` defaults to the one
    that the magnitude of ``X`` calls for; data are divided by it (a copy,
    only when it is not 1).
    """
    n_rows = X.shape[0]
    largest = max_abs(X) if unit is None or fit else 0.0
    if unit is None:
        unit = unit_for(largest, X.dtype)
    stage_rows, order = (n_rows,), None
    if fit:
        bounds = stage_thresholds(n_rows, batch_size, n_codes)
        if is_sparse(X) and len(bounds) > 1:  # no sorted copy (see RowBlock)
            order, stage_rows = stage_order(X, bounds, data_exponent(largest))
        else:
            X, sample_weight, stage_rows = sorted_by_stage(
                X, sample_weight, bounds, data_exponent(largest)
            )
    X = to_internal(X, unit)
    plan = StagePlan(stage_rows, min(batch_size, n_rows))
    block = RowBlock(
        X,
        sample_weight,
        columns,
        stage_rows=stage_rows,
        holds_all=True,
        stage_order=order,
    )
    return InMemorySource(block, plan, unit, n_jobs)


def to_internal(X, unit):
    """``X`` in internal units (a copy only when ``unit`` is not 1).

    Raises a ValueError when rows of a later batch do not fit the unit that
    the first data chose (a stream that grew by hundreds of orders of
    magnitude).
    """
    if unit == 1.0:
        return X
    if is_sparse(X):
        with np.errstate(over="ignore", under="ignore"):
            internal = scaled(X, 1.0 / unit)
        values = internal.data
    else:
        with np.errstate(over="ignore", under="ignore"):
            factor = X.dtype.type(1.0 / unit)
            if np.isfinite(factor) and factor > 0:
                internal = X * factor
            else:  # the factor itself leaves float32's range: through float64
                internal = (X.astype(np.float64) * (1.0 / unit)).astype(X.dtype)
        values = internal
    if not np.isfinite(values).all():
        raise ValueError(
            f"X holds values (largest magnitude {max_abs(X):.3g}) beyond what this "
            f"model's internal unit ({unit:.3g}, chosen from the first data) can "
            "represent; fit the model again on data of this magnitude."
        )
    return internal
