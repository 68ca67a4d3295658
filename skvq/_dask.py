"""Dask support: training sources over persisted chunks, lazy encoding.

This module is imported only when a Dask array reaches an estimator, so that
``import skvq`` never imports Dask.  It knows nothing of the estimators: they
hand it arrays and callables.

Training.  :func:`dask_source` turns the chunks of a Dask array into
:class:`~skvq._sources.RowBlock` objects, persisted where they are computed
(on the workers, with ``distributed``): each holds its rows (sorted by
stage), their weights and what the requests leave for them (labels, squared
distances, the distance bounds of ``fit``).  :class:`DaskSource` serves a
batch of requests with one task per chunk concerned and a tree of merges
(fan-in ``FAN_IN``): only code-book-sized statistics travel, never the rows.
It answers exactly what :class:`~skvq._sources.InMemorySource` answers for
the same rows, to the rounding of the sums (the stages are the same sets of
rows), so the training schedules run unchanged.  Values (NaN, infinity,
negative weights) are checked inside the tasks that first read a chunk,
before any estimator changes.

Inference.  :func:`map_rows`, :func:`map_codes` and :func:`lazy_score`
apply a fitted estimator's NumPy methods block by block, lazily.
"""

import uuid
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from scipy import sparse
from sklearn.utils import check_array

from ._sources import (
    RowBlock,
    StagePlan,
    data_exponent,
    max_abs,
    sorted_by_stage,
    stage_thresholds,
    to_internal,
)
from ._state import unit_for
from ._validation import quiet_validation

# Fan-in of the tree merges of per-chunk results.
FAN_IN = 8
# Seconds between checks that the workers holding blocks are still there.
_LIVENESS_PERIOD = 10.0
# A stage is served in the client's process when one step on it costs at
# most this many multiply-adds (rows x codes x features: tens of
# milliseconds on one core, about what a round trip to a busy cluster costs,
# measured at 11 ms on two cores) and its rows take at most this many bytes.
LOCAL_WORK = 2**30
LOCAL_BYTES = 2**28


# ------------------------------------------------------------------ checks
def checked_array(X, *, n_features, name):
    """Shape, dtype and feature-count checks that need no computation.

    Returns ``X`` as float32 or float64 with one chunk across the features.
    """
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2D Dask array, got a {X.ndim}D array of shape {X.shape}."
        )
    if sparse.issparse(getattr(X, "_meta", None)):
        raise TypeError(
            f"{name} does not accept Dask arrays of sparse chunks: pass the "
            "SciPy sparse matrix itself (VQCodebookTransformer trains on it "
            "without densifying), or dense chunks (X.map_blocks(lambda b: "
            "b.toarray())) if they fit in memory."
        )
    if X.dtype.kind not in "biuf":
        kind = "Complex data" if X.dtype.kind == "c" else f"dtype {X.dtype}"
        raise ValueError(f"{kind} not supported: X must hold real numbers.")
    if np.isnan(X.shape[0]) or any(np.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            "The Dask array has unknown chunk sizes; call X.compute_chunk_sizes() "
            "first."
        )
    if X.shape[0] == 0:
        raise ValueError("Found array with 0 sample(s) (shape=(0, ...)).")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"X has {X.shape[1]} features, but {name} is expecting "
            f"{n_features} features as input."
        )
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return X.rechunk({1: -1})


def _weights(sample_weight, X):
    """Sample weights as a Dask array chunked like the rows of ``X``, or None."""
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, da.Array):
        sample_weight = np.asarray(sample_weight)
    if sample_weight.ndim != 1 or sample_weight.shape[0] != X.shape[0]:
        raise ValueError(
            f"sample_weight.shape == {sample_weight.shape}, expected ({X.shape[0]},)!"
        )
    return da.asarray(sample_weight).rechunk((X.chunks[0],))


def _validated_chunk(block, weights):
    """Validate one chunk (inside its task) and give it weights."""
    with quiet_validation():
        block = check_array(block, dtype=[np.float64, np.float32], input_name="X")
    if weights is None:
        return block, np.ones(block.shape[0])
    weights = check_array(
        weights, ensure_2d=False, dtype=np.float64, input_name="sample_weight"
    )
    if np.any(weights < 0):
        raise ValueError("Negative values in data passed to `sample_weight`.")
    return block, weights


# ---------------------------------------------------------------- training
@dataclass(frozen=True)
class _Summary:
    """What the first pass learns of the chunks: weight and magnitude."""

    weight: float
    max_abs: float

    def __add__(self, other):
        return _Summary(self.weight + other.weight, max(self.max_abs, other.max_abs))


def _make_block(block, weights, columns):
    """A validated chunk as a block, with its summary."""
    block, weights = _validated_chunk(block, weights)
    row_block = RowBlock(np.ascontiguousarray(block), weights, columns)
    row_block.summary = _Summary(float(weights.sum()), max_abs(block))
    return row_block


def _summary(block):
    return block.summary


def _arranged(block, unit, bounds, exponent):
    """The block in internal units, its rows sorted by stage."""
    X, weights, stage_rows = sorted_by_stage(block.X, block.weights, bounds, exponent)
    return RowBlock(to_internal(X, unit), weights, block.columns, stage_rows=stage_rows)


def _stage_rows(block):
    return block.stage_rows


def dask_source(
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
    """A :class:`DaskSource` over a checked Dask array (or, for a stream's
    batch, a stateless :class:`DaskBatch` unless ``keep_rows``).

    The chunks are validated and persisted at once; for a ``fit``, each
    chunk's rows are sorted by stage (the stages of the NumPy schedule, see
    :mod:`skvq._sources`), else one stage holds every row (a stream's batch).
    """
    sample_weight = _weights(sample_weight, X)
    chunks = list(X.to_delayed().ravel())
    weights = (
        [None] * len(chunks)
        if sample_weight is None
        else list(sample_weight.to_delayed().ravel())
    )
    if not (fit or keep_rows):
        return _batch_source(X, chunks, weights, batch_size, unit, columns)
    # Every task below reads one block: no block is ever copied to another
    # worker, so the in-place updates of training always reach the one copy.
    made = dask.persist(
        *[
            dask.delayed(_make_block)(chunk, w, columns)
            for chunk, w in zip(chunks, weights, strict=True)
        ]
    )
    summaries = dask.compute([dask.delayed(_summary)(b) for b in made])[0]
    summary = summaries[0]
    for other in summaries[1:]:
        summary = summary + other
    if not summary.weight > 0:
        raise ValueError("Sample weights must contain at least one non-zero number.")
    if unit is None:
        unit = unit_for(summary.max_abs, X.dtype)
    n_rows = int(np.sum(X.chunks[0]))
    bounds = (np.inf,)
    if fit:
        bounds = stage_thresholds(n_rows, batch_size, n_codes)
    exponent = data_exponent(summary.max_abs)
    blocks = list(
        dask.persist(
            *[dask.delayed(_arranged)(b, unit, bounds, exponent) for b in made]
        )
    )
    del made
    block_rows = dask.compute([dask.delayed(_stage_rows)(b) for b in blocks])[0]
    stage_rows = tuple(int(r) for r in np.sum(block_rows, axis=0))
    plan = StagePlan(stage_rows, min(batch_size, n_rows))
    local_rows = 0  # a stream's batch stays on the workers
    if fit:
        local_rows = min(
            LOCAL_WORK // max(1, (n_codes or 1) * X.shape[1]),
            LOCAL_BYTES // max(1, X.dtype.itemsize * X.shape[1]),
        )
    return DaskSource(
        blocks,
        block_rows,
        plan,
        unit,
        X.dtype,
        X.shape[1],
        n_jobs,
        local_rows,
        columns,
    )


def _batch_source(X, chunks, weights, batch_size, unit, columns):
    """A :class:`DaskBatch` (the first batch of a stream learns its unit)."""
    if unit is None:
        summaries = dask.compute(
            [
                dask.delayed(_chunk_summary)(chunk, w)
                for chunk, w in zip(chunks, weights, strict=True)
            ]
        )[0]
        summary = summaries[0]
        for other in summaries[1:]:
            summary = summary + other
        if not summary.weight > 0:
            raise ValueError(
                "Sample weights must contain at least one non-zero number."
            )
        unit = unit_for(summary.max_abs, X.dtype)
    n_rows = int(np.sum(X.chunks[0]))
    plan = StagePlan((n_rows,), min(batch_size, n_rows))
    return DaskBatch(chunks, weights, plan, unit, X.dtype, X.shape[1], columns)


def _chunk_summary(chunk, weights):
    chunk, weights = _validated_chunk(chunk, weights)
    return _Summary(float(weights.sum()), max_abs(chunk))


class DaskBatch:
    """A stream's batch on Dask: each call of :meth:`serve` is one graph
    over the user's chunks (validate, serve the requests, tree-merge the
    parts), computed at once; nothing is persisted, so the per-row memory
    of a request does not outlive its call (a request that needs a step's
    assignment searches again)."""

    def __init__(self, chunks, weights, plan, unit, dtype, n_features, columns):
        self.chunks = chunks
        self.weights = weights
        self.plan = plan
        self.unit = unit
        self.dtype = np.dtype(dtype)
        self.n_features = n_features
        self.columns = columns
        self._session = uuid.uuid4().hex
        self.n_tasks = 0

    def serve(self, requests):
        """The result of each request, in order."""
        indexes = {}
        for request in requests:
            for version, index in request.indexes().items():
                indexes[version] = dask.delayed(
                    index, name=f"skvq-index-{self._session}-{version}"
                )
        detached = [request.detached() for request in requests]
        level = [
            dask.delayed(_batch_parts)(
                chunk, w, self.columns, self.unit, detached, indexes
            )
            for chunk, w in zip(self.chunks, self.weights, strict=True)
        ]
        self.n_tasks += len(level)
        while len(level) > 1:
            level = [
                dask.delayed(_merge_parts)(level[i : i + FAN_IN], detached)
                for i in range(0, len(level), FAN_IN)
            ]
            self.n_tasks += len(level)
        merged = dask.compute(level[0])[0]
        return [request.merge(merged[i]) for i, request in enumerate(requests)]


def _batch_parts(chunk, weights, columns, unit, requests, indexes):
    """One chunk's parts of every request."""
    chunk, weights = _validated_chunk(chunk, weights)
    block = RowBlock(to_internal(np.ascontiguousarray(chunk), unit), weights, columns)
    return {
        i: [request.on_block(block, block.n_rows, indexes, 1)]
        for i, request in enumerate(requests)
    }


def _distributed_client():
    """The ``distributed`` client that Dask computes with now, or None."""
    scheduler = dask.base.get_scheduler()
    client = getattr(scheduler, "__self__", None)
    cls = type(client)
    if cls.__name__ == "Client" and cls.__module__.startswith("distributed"):
        return client
    return None


class DaskSource:
    """The rows of a training run as persisted :class:`RowBlock` chunks.

    ``block_rows[k]`` holds the rows of each stage in block ``k``.

    In a ``fit``, requests on a stage of at most ``local_rows`` rows (see
    ``LOCAL_WORK``: the small stages, where relocation makes many short
    steps) are served in this process, on ``n_jobs`` threads: the rows of
    the largest such stage are gathered once (the same rows, in chunk
    order), and a step then costs no round trip to the cluster.  A stream's
    batch is always served on the workers.

    With a ``distributed`` client, each block is updated in place on the
    worker that holds it: one task per worker, bound to it (strict worker
    restrictions, so it is neither moved nor stolen), serves the blocks it
    holds on the worker's threads, and only merged parts travel.  Should
    that worker leave the cluster, the request raises an error instead of
    training on a block that lost its memory.  With the local schedulers,
    each chunk's task returns its block with its parts, and the pair becomes
    the block of the next call.
    """

    # Requests travel to the workers (but those on small stages of a fit):
    # large arrays in a request would travel with them.
    serves_locally = False

    def __init__(
        self,
        blocks,
        block_rows,
        plan,
        unit,
        dtype,
        n_features,
        n_jobs,
        local_rows,
        columns=None,
    ):
        self.blocks = blocks
        self.block_rows = block_rows
        self.plan = plan
        self.unit = unit
        self.dtype = np.dtype(dtype)
        self.n_features = n_features
        self.n_jobs = n_jobs
        self.local_rows = local_rows
        self.columns = columns
        self._local = {}  # (key, stage) -> RowBlock of the stage's rows here
        self._gathered = {}  # key -> rows of the largest local stage
        self._set_keys = set()  # keys whose rows requests replaced
        self._session = uuid.uuid4().hex
        self.n_tasks = 0  # scheduler tasks of the requests served so far
        self._client = _distributed_client()
        if self._client is not None:
            from distributed import futures_of, wait

            self._futures = [futures_of(block)[0] for block in blocks]
            wait(self._futures)
            holders = self._client.who_has(self._futures)
            self._holders = [sorted(holders[f.key])[0] for f in self._futures]
            self._threads = self._client.nthreads()
            # Requests served by each block: a block that did not see them
            # all (a copy, or one rebuilt after its worker left) says so.
            self._generations = [0] * len(blocks)

    def serve(self, requests):
        """The result of each request, in order."""
        for request in requests:
            for key in request.sets_rows_of():
                self._set_keys.add(key)
                self._local = {k: b for k, b in self._local.items() if k[0] != key}
                self._gathered.pop(key, None)
        local = [i for i, r in enumerate(requests) if self._is_local(r)]
        remote = [i for i in range(len(requests)) if i not in set(local)]
        results = [None] * len(requests)
        for i in local:
            request = requests[i]
            block = self._local_block(request.key, self._stage_of(request))
            part = request.on_block(block, block.n_rows, request.indexes(), self.n_jobs)
            results[i] = request.merge([part])
        if remote:
            for i, result in zip(
                remote, self._serve_blocks([requests[i] for i in remote]), strict=True
            ):
                results[i] = result
        return results

    def _is_local(self, request):
        """Whether a request runs here: a small stage's rows of one key."""
        return (
            request.single_key
            and self.plan.rows[self._stage_of(request)] <= self.local_rows
        )

    def _stage_of(self, request):
        """The stage a request reads (None: all rows, the last stage)."""
        return len(self.plan.rows) - 1 if request.stage is None else request.stage

    def _local_block(self, key, stage):
        """The rows of ``stage`` that ``key`` sees, here.

        The rows of the largest stage served here are gathered once (the
        rows themselves, shared by every key of a column subset, or the
        rows set for ``key``: a residual stage's targets); a smaller stage's
        rows are the first rows of each chunk among them, since the chunks
        keep their rows sorted by stage.
        """
        view_key = key if key in self._set_keys else None
        block = self._local.get((view_key, stage))
        if block is None:
            if view_key is not None:  # one key's own rows at a time
                self._local = {k: b for k, b in self._local.items() if k[0] is None}
                self._gathered = {k: g for k, g in self._gathered.items() if k is None}
            X, weights = self._gathered_rows(view_key)
            rows = self._local_stage_rows(stage)
            columns = None if view_key is not None else self.columns
            block = RowBlock(X[rows], weights[rows], columns, holds_all=True)
            self._local[view_key, stage] = block
        return block

    def _gathered_rows(self, view_key):
        """The rows of the largest stage served here, in chunk order."""
        found = self._gathered.get(view_key)
        if found is None:
            largest = max(
                s for s, rows in enumerate(self.plan.rows) if rows <= self.local_rows
            )
            parts = self._gather(_stage_view, view_key, largest)
            found = self._gathered[view_key] = (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
            )
        return found

    def _local_stage_rows(self, stage):
        """Positions of ``stage``'s rows among the gathered ones."""
        largest = max(
            s for s, rows in enumerate(self.plan.rows) if rows <= self.local_rows
        )
        starts = np.cumsum([0] + [rows[largest] for rows in self.block_rows[:-1]])
        return np.concatenate(
            [
                start + np.arange(rows[stage])
                for start, rows in zip(starts, self.block_rows, strict=True)
            ]
        )

    def _gather(self, function, *args):
        """``function(block, *args)`` on every block, results in block order."""
        if self._client is not None:
            tasks = [
                self._client.submit(
                    _checked(function),
                    future,
                    generation,
                    *args,
                    workers=[holder],
                    allow_other_workers=False,
                    pure=False,
                )
                for future, holder, generation in zip(
                    self._futures, self._holders, self._generations, strict=True
                )
            ]
            self.n_tasks += len(tasks)
            return self._results(tasks)
        self.n_tasks += len(self.blocks)
        return dask.compute(
            [dask.delayed(_on_block_of(function))(b, *args) for b in self.blocks]
        )[0]

    def _serve_blocks(self, requests):
        """The result of each request: one task per chunk concerned (or per
        worker, with ``distributed``), merged."""
        detached = [request.detached() for request in requests]
        wanted = [
            [
                i
                for i, request in enumerate(requests)
                if request.stage is None or self.block_rows[k][request.stage] > 0
            ]
            for k in range(len(self.blocks))
        ]
        if self._client is not None:
            merged = self._serve_on_workers(requests, detached, wanted)
        else:
            merged = self._serve_locally(requests, detached, wanted)
        # One part per request: merged already, or a lone chunk's.
        return [requests[i].merge(merged[i]) for i in range(len(requests))]

    def _serve_locally(self, requests, detached, wanted):
        """Local schedulers: tasks return (block, parts); the persisted pairs
        are the next call's blocks."""
        indexes = {}
        for request in requests:
            for version, index in request.indexes().items():
                indexes[version] = dask.delayed(
                    index, name=f"skvq-index-{self._session}-{version}"
                )
        served, tasks = [], []
        for k, block in enumerate(self.blocks):
            if not wanted[k]:
                continue
            served.append(k)
            tasks.append(
                dask.delayed(_serve_block)(
                    block,
                    {i: detached[i] for i in wanted[k]},
                    {v: indexes[v] for i in wanted[k] for v in requests[i].indexes()},
                )
            )
        tasks = list(dask.persist(*tasks))
        for k, task in zip(served, tasks, strict=True):
            self.blocks[k] = task
        level = tasks
        while len(level) > 1:
            level = [
                dask.delayed(_merge_parts)(level[i : i + FAN_IN], detached)
                for i in range(0, len(level), FAN_IN)
            ]
            self.n_tasks += len(level)
        self.n_tasks += len(tasks)
        return _parts_of(dask.compute(level[0])[0])

    def _serve_on_workers(self, requests, detached, wanted):
        """``distributed``: one task per worker, bound to it, serves the
        blocks that worker holds (updating them in place, on the worker's
        threads) and merges their parts; the client merges the workers'."""
        client = self._client
        index_objects = {}
        for request in requests:
            index_objects.update(request.indexes())
        groups = {}
        for k, holder in enumerate(self._holders):
            if wanted[k]:
                groups.setdefault(holder, []).append(k)
        tasks = [
            client.submit(
                _serve_group,
                [self._futures[k] for k in blocks],
                [self._generations[k] for k in blocks],
                [wanted[k] for k in blocks],
                detached,
                {
                    v: index_objects[v]
                    for k in blocks
                    for i in wanted[k]
                    for v in requests[i].indexes()
                },
                self._threads.get(worker, 1),
                workers=[worker],
                allow_other_workers=False,
                pure=False,
            )
            for worker, blocks in groups.items()
        ]
        self.n_tasks += len(tasks)
        for blocks in groups.values():
            for k in blocks:
                self._generations[k] += 1
        return _merge_parts(self._results(tasks), detached)

    def _results(self, tasks):
        """The tasks' results; an error if a worker holding blocks left."""
        from distributed import wait

        while True:
            done = wait(tasks, timeout=_LIVENESS_PERIOD, return_when="ALL_COMPLETED")
            if not done.not_done:
                return self._client.gather(tasks)
            gone = set(self._holders) - set(self._client.nthreads())
            if gone:
                for task in tasks:
                    task.cancel()
                raise RuntimeError(
                    f"The Dask worker(s) {sorted(gone)} holding chunks of the "
                    "training data left the cluster, with what training kept on "
                    "those chunks; fit again."
                )


def _block_of(item):
    """A block, from a persisted block or a persisted (block, parts) pair."""
    return item[0] if isinstance(item, tuple) else item


def _on_block_of(function):
    """``function`` applied to the block of a persisted item."""

    def apply(item, *args):
        return function(_block_of(item), *args)

    return apply


def _stage_view(block, key, stage):
    """The rows of ``stage`` in a block (``key`` None: all the features, else
    the rows ``key`` sees), and their weights."""
    rows = block.rows_in(stage)
    X = block.X if key is None else block.view(key)
    return X[:rows], block.weights[:rows]


def _parts_of(item):
    """``request -> parts``, from a (block, parts) pair or a merged node."""
    return item[1] if isinstance(item, tuple) else item


def _serve_block(item, requests, indexes):
    """One chunk's block and its parts of ``requests`` (all its rows are in
    their stages)."""
    block = _block_of(item)
    parts = {
        i: [request.on_block(block, block.rows_in(request.stage), indexes, 1)]
        for i, request in requests.items()
    }
    return block, parts


def _check_generation(block, generation):
    """Raise if ``block`` did not serve the ``generation`` requests it should
    have: a copy, or a block rebuilt after its worker left."""
    if getattr(block, "generation", 0) != generation:
        raise RuntimeError(
            "A chunk of the training data lost what training kept on it (its "
            "Dask worker left, or it was copied to another worker); fit again."
        )


def _checked(function):
    """``function(block, *args)`` after :func:`_check_generation`."""

    def apply(block, generation, *args):
        _check_generation(block, generation)
        return function(block, *args)

    return apply


def _serve_group(blocks, generations, wanted, requests, indexes, n_jobs):
    """The merged parts of the blocks one worker holds (block ``k`` serves
    the requests ``wanted[k]``), computed on the worker's ``n_jobs``
    threads.  Each block must have served ``generations[k]`` requests."""
    for block, generation in zip(blocks, generations, strict=True):
        _check_generation(block, generation)
        block.generation = generation + 1
    parts = {}
    for block, block_wanted in zip(blocks, wanted, strict=True):
        for i in block_wanted:
            rows = block.rows_in(requests[i].stage)
            part = requests[i].on_block(block, rows, indexes, n_jobs)
            parts.setdefault(i, []).append(part)
    return {i: [requests[i].merge(p)] for i, p in parts.items()}


def _merge_parts(items, requests):
    """Merge the parts that several chunks (or subtrees) give each request."""
    collected = {}
    for item in items:
        for i, parts in _parts_of(item).items():
            collected.setdefault(i, []).extend(parts)
    return {i: [requests[i].merge(parts)] for i, parts in collected.items()}


# ---------------------------------------------------------------- inference
def _apply(block, function):
    return function(block)


def map_rows(X, function, n_columns, dtype, *, sparse_output=False):
    """``function`` on each block of rows of ``X``, lazily.

    ``n_columns`` None: one value per row (a 1-D result).
    """
    if n_columns is None:
        return X.map_blocks(
            _apply, function, drop_axis=1, dtype=dtype, meta=np.empty(0, dtype)
        )
    meta = np.empty((0, n_columns), dtype=dtype)
    if sparse_output:
        meta = sparse.csr_matrix((0, n_columns), dtype=dtype)
    return X.map_blocks(
        _apply,
        function,
        chunks=(X.chunks[0], (n_columns,)),
        dtype=dtype,
        meta=meta,
    )


def map_codes(codes, function, n_features, dtype):
    """``function`` (a decoder) on each block of rows of ``codes``, lazily."""
    if codes.ndim not in (1, 2):
        raise ValueError(f"Expected a 1D or 2D Dask array, got shape {codes.shape}.")
    if codes.ndim == 1:
        codes = codes[:, None]
    codes = codes.rechunk({1: -1})
    return codes.map_blocks(
        _apply,
        function,
        chunks=(codes.chunks[0], (n_features,)),
        dtype=dtype,
        meta=np.empty((0, n_features), dtype=dtype),
    )


def _score_parts(block, weights, sq_errors):
    block, weights = _validated_chunk(block, weights)
    return np.array([np.dot(weights, sq_errors(block)), weights.sum()])


def lazy_score(X, sample_weight, sq_errors):
    """Minus the weighted mean of ``sq_errors(rows)``, as a lazy 0-d array."""
    sample_weight = _weights(sample_weight, X)
    blocks = list(X.to_delayed().ravel())
    weights = (
        [None] * len(blocks)
        if sample_weight is None
        else list(sample_weight.to_delayed().ravel())
    )
    parts = [
        da.from_delayed(
            dask.delayed(_score_parts)(block, w, sq_errors),
            shape=(2,),
            dtype=np.float64,
        )
        for block, w in zip(blocks, weights, strict=True)
    ]
    total = da.stack(parts).sum(axis=0)
    return -total[0] / total[1]
