"""Dask support: data-parallel EMA steps, lazy encoding, out-of-core fits.

This module is imported only when a Dask array reaches the estimator, so that
``import skvq`` never imports Dask.  Functions here receive a validated
estimator (parameters checked) and a Dask array that they validate
themselves: shape and dtype up front, values (NaN, infinity, negative
weights) inside the chunk tasks, where any error surfaces when the step is
computed, before the estimator changes.

An EMA step is a reduction: each chunk of the batch is assigned and summed
into :class:`~skvq._kernels.BatchStatistics` on the worker that holds it, the
partial statistics are tree-summed, and the client applies one EMA update.
Only ``n_codes x n_features`` arrays travel, never the data.
"""

from functools import partial

import dask
import dask.array as da
import numpy as np
from scipy import sparse
from sklearn.utils import check_array, check_random_state

from ._kernels import assignment_statistics, batch_statistics, weighted_mean_variance
from ._multi import _REFINE_PASSES, _REFINE_RTOL, stage_target
from ._relocation import cell_members, merge_members, split_rows

# Rows of the weighted sample that a step gathers to re-seed dead codes.
REASSIGN_SAMPLE = 1024
# Fan-in of the tree reduction of partial statistics.
_FAN_IN = 8


# ------------------------------------------------------------------ checks
def _check_array(estimator, X, *, reset):
    """Shape, dtype and feature-count checks that need no computation."""
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2D Dask array, got a {X.ndim}D array of shape {X.shape}."
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
    n_features = X.shape[1]
    if reset:
        estimator.n_features_in_ = n_features
        estimator.__dict__.pop("feature_names_in_", None)
    elif n_features != estimator.n_features_in_:
        raise ValueError(
            f"X has {n_features} features, but {type(estimator).__name__} is "
            f"expecting {estimator.n_features_in_} features as input."
        )
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return X.rechunk({1: -1})


def _check_weights(sample_weight, X):
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


def _chunk(block, weights):
    """Validate one chunk (inside its task) and give it weights."""
    block = check_array(block, dtype=[np.float64, np.float32], input_name="X")
    if weights is None:
        return block, np.ones(block.shape[0])
    weights = check_array(
        weights, ensure_2d=False, dtype=np.float64, input_name="sample_weight"
    )
    if np.any(weights < 0):
        raise ValueError("Negative values in data passed to `sample_weight`.")
    return block, weights


# -------------------------------------------------------- one step, reduced
def _chunk_statistics(index, n_codes, block, weights, pool_rows, seed, split_cells):
    """Statistics of one chunk, a weighted sample of it for reassignment, and
    the rows of the cells that relocation may split."""
    block, weights = _chunk(block, weights)
    stats, labels, sq_dist = batch_statistics(index, block, weights, n_codes)
    members = cell_members(block, weights, labels, split_cells)
    if pool_rows == 0 or stats.weight == 0:
        return stats, None, members
    rng = np.random.default_rng(seed)
    rows = rng.choice(block.shape[0], size=pool_rows, p=weights / stats.weight)
    pool_weights = np.full(pool_rows, stats.weight / pool_rows)
    return stats, (block[rows], pool_weights, sq_dist[rows]), members


def _chunk_members(index, block, weights, cells):
    """The rows of ``cells`` in one chunk, for ``fit``'s relocation rounds."""
    block, weights = _chunk(block, weights)
    labels = index.nearest(block)[0]
    return cell_members(block, weights, labels, cells)


def _tree_sum(parts):
    """Tree-reduce delayed (stats, pool, members) triples; pools and members
    are gathered in lists, in chunk order."""
    level = parts
    while True:
        level = [
            dask.delayed(_collect)(level[i : i + _FAN_IN])
            for i in range(0, len(level), _FAN_IN)
        ]
        if len(level) == 1:
            return level[0]


def _collect(parts):
    """Sum the statistics of ``parts`` and gather their (small) pools and members."""
    total, pools, members = None, [], []
    for stats, pool, part_members in parts:
        total = stats if total is None else total + stats
        if isinstance(part_members, list):
            members.extend(part_members)
        else:
            members.append(part_members)
        if pool is None:
            continue
        pools.extend(pool if isinstance(pool, list) else [pool])
    return total, pools, members


def _step(estimator, blocks, weight_blocks, row_counts, momentum=None, scale=None):
    """One EMA step over the given chunks (a reduction), applied at the client."""
    n_rows = sum(row_counts)
    reassign = estimator.dead_code_threshold > 0
    split_cells = estimator._split_candidates() if scale is None else ()
    index = dask.delayed(estimator._index, pure=True)
    parts = []
    for i, (block, weights, rows) in enumerate(
        zip(blocks, weight_blocks, row_counts, strict=True)
    ):
        pool_rows = -(-REASSIGN_SAMPLE * rows // n_rows) if reassign else 0
        seed = [estimator._seed, estimator.n_steps_, i]
        parts.append(
            dask.delayed(_chunk_statistics)(
                index, estimator.n_codes, block, weights, pool_rows, seed, split_cells
            )
        )
    stats, pools, members = dask.compute(_tree_sum(parts))[0]
    if not stats.weight > 0:
        raise ValueError("Sample weights must contain at least one non-zero number.")
    pool = None
    if pools:
        pool = tuple(np.concatenate(column) for column in zip(*pools, strict=True))
    splits = split_rows(merge_members(members), stats.counts)
    estimator._apply_statistics(stats, pool, momentum, scale, splits)
    return stats, None


def _gather(estimator, stage_chunks, stage, cells, labels, counts):
    """Rows of ``cells`` among the chunks of ``fit``'s stage ``stage``."""
    blocks, weight_blocks = stage_chunks[stage]
    index = dask.delayed(estimator._index, pure=True)
    parts = [
        dask.delayed(_chunk_members)(index, block, weights, cells)
        for block, weights in zip(blocks, weight_blocks, strict=True)
    ]
    return split_rows(merge_members(dask.compute(parts)[0]), counts)


def _blocks(X, sample_weight):
    blocks = list(X.to_delayed().ravel())
    if sample_weight is None:
        return blocks, [None] * len(blocks)
    return blocks, list(sample_weight.to_delayed().ravel())


# --------------------------------------------------------------- fitting
def _initial_sample(estimator, X, sample_weight, rng):
    """A bounded random sample of rows to initialise from (never all of X)."""
    size = estimator._init_size()
    if X.shape[0] > size:
        # Generator.choice draws `size` distinct rows in O(size) memory;
        # RandomState.choice would permute all n row indices.
        generator = np.random.default_rng(rng.randint(np.iinfo(np.int32).max))
        rows = np.sort(generator.choice(X.shape[0], size=size, replace=False))
        X = X[rows]
        sample_weight = None if sample_weight is None else sample_weight[rows]
    X, sample_weight = dask.compute(X, sample_weight)
    return _chunk(X, sample_weight)


def partial_fit(estimator, X, sample_weight):
    """One EMA step over the whole Dask array (initialising first if needed)."""
    first = not hasattr(estimator, "codebook_")
    X = _check_array(estimator, X, reset=first)
    sample_weight = _check_weights(sample_weight, X)
    if first:
        rng = check_random_state(estimator.random_state)
        estimator._initialize(*_initial_sample(estimator, X, sample_weight, rng), rng)
    blocks, weight_blocks = _blocks(X, sample_weight)
    _step(estimator, blocks, weight_blocks, X.chunks[0])
    return estimator


def _stages(estimator, X, sample_weight, rng):
    """``fit``'s stages with chunks as the unit.

    The chunks are taken in one random order; stage ``s`` covers the
    shortest prefix of that order with at least the stage's rows (see
    ``VQCodebookTransformer._stage_sizes``), and its full step is one
    reduction over those chunks.
    """
    blocks, weight_blocks = _blocks(X, sample_weight)
    sizes = np.asarray(X.chunks[0])
    order = np.arange(len(sizes))
    if X.shape[0] > estimator.batch_size:
        order = rng.permutation(len(sizes))
    ends = np.cumsum(sizes[order])
    batch_rows = min(estimator.batch_size, X.shape[0])
    steps, rows, stage_chunks = [], [], []
    for target in estimator._stage_sizes(X.shape[0]):
        count = int(np.searchsorted(ends, target)) + 1
        if rows and ends[count - 1] == rows[-1]:
            continue
        chunks = order[:count]
        rows.append(int(ends[count - 1]))
        stage_chunks.append(
            ([blocks[k] for k in chunks], [weight_blocks[k] for k in chunks])
        )
        steps.append(
            partial(
                _step,
                estimator,
                *stage_chunks[-1],
                [int(sizes[k]) for k in chunks],
                0.0,
                batch_rows / rows[-1],
            )
        )
    return steps, rows, partial(_gather, estimator, stage_chunks)


def fit(estimator, X, sample_weight):
    """``fit`` on a Dask array: the NumPy schedule with chunks as the unit."""
    X = _check_array(estimator, X, reset=True)
    sample_weight = _check_weights(sample_weight, X)
    # No chunk larger than a minibatch (lazy; a no-op for small chunks).
    if max(X.chunks[0]) > estimator.batch_size:
        X = X.rechunk({0: estimator.batch_size})
        if sample_weight is not None:
            sample_weight = sample_weight.rechunk((X.chunks[0],))
    rng = check_random_state(estimator.random_state)
    steps, rows, gather = _stages(estimator, X, sample_weight, rng)
    estimator._initialize(*_initial_sample(estimator, X, sample_weight, rng), rng)
    variance = 0.0
    if estimator.tol > 0:
        variance = weighted_mean_variance(
            *_initial_sample(estimator, X, sample_weight, rng)
        )
    estimator._run_stages(steps, rows, variance, gather)
    return estimator


# ------------------------------------------------------------ inference
def predict(estimator, X):
    X = _check_array(estimator, X, reset=False)
    return X.map_blocks(
        _apply_block,
        estimator,
        "predict",
        drop_axis=1,
        dtype=np.int64,
        meta=np.empty(0, np.int64),
    )


def _apply_block(block, estimator, method):
    """Run the NumPy ``method`` of the fitted estimator on one block."""
    return getattr(estimator, method)(block)


def transform(estimator, X):
    X = _check_array(estimator, X, reset=False)
    encode = estimator.encode
    if encode == "index":
        return X.map_blocks(
            _apply_block,
            estimator,
            "transform",
            chunks=(X.chunks[0], (1,)),
            dtype=np.int64,
        )
    columns = (X.chunks[0], (estimator.n_codes,))
    if encode == "onehot":
        meta = sparse.csr_matrix((0, estimator.n_codes), dtype=X.dtype)
        return X.map_blocks(
            _apply_block,
            estimator,
            "transform",
            chunks=columns,
            dtype=X.dtype,
            meta=meta,
        )
    return X.map_blocks(
        _apply_block, estimator, "transform", chunks=columns, dtype=X.dtype
    )


def inverse_transform(estimator, X):
    if X.ndim not in (1, 2):
        raise ValueError(f"Expected a 1D or 2D Dask array, got shape {X.shape}.")
    if X.ndim == 1:
        X = X[:, None]
    X = X.rechunk({1: -1})
    n_features = estimator.codebook_.shape[1]
    return X.map_blocks(
        _apply_block,
        estimator,
        "inverse_transform",
        chunks=(X.chunks[0], (n_features,)),
        dtype=estimator.codebook_.dtype,
        meta=np.empty((0, n_features), dtype=estimator.codebook_.dtype),
    )


def _score_parts(estimator, block, weights):
    block, weights = _chunk(block, weights)
    return np.array([np.dot(weights, estimator._sq_errors(block)), weights.sum()])


def score(estimator, X, sample_weight):
    """Minus the weighted mean squared reconstruction error of any skvq
    quantiser, as a lazy 0-d Dask array."""
    X = _check_array(estimator, X, reset=False)
    sample_weight = _check_weights(sample_weight, X)
    blocks, weight_blocks = _blocks(X, sample_weight)
    parts = [
        da.from_delayed(
            dask.delayed(_score_parts)(estimator, block, weights),
            shape=(2,),
            dtype=np.float64,
        )
        for block, weights in zip(blocks, weight_blocks, strict=True)
    ]
    total = da.stack(parts).sum(axis=0)
    return -total[0] / total[1]


# ------------------------------------------------- multi-codebook quantisers
def checked_multi_input(estimator, X, *, reset):
    """Shape and dtype checks of a Dask array for a multi-codebook quantiser."""
    return _check_array(estimator, X, reset=reset)


def multi_blockwise(estimator, method, X, *args):
    """Lazy ``transform``, ``inverse_transform`` or ``score`` of a fitted
    :class:`~skvq.ProductVQTransformer` or :class:`~skvq.ResidualVQTransformer`."""
    if method == "score":
        return score(estimator, X, *args)
    n_codebooks = len(estimator.quantizers_)
    if method == "inverse_transform":
        X = X.rechunk({1: -1})
        n_features = estimator.n_features_in_
        dtype = estimator.quantizers_[0].codebook_.dtype
        return X.map_blocks(
            _apply_block,
            estimator,
            method,
            chunks=(X.chunks[0], (n_features,)),
            dtype=dtype,
            meta=np.empty((0, n_features), dtype=dtype),
        )
    X = _check_array(estimator, X, reset=False)
    if estimator.encode == "index":
        return X.map_blocks(
            _apply_block,
            estimator,
            method,
            chunks=(X.chunks[0], (n_codebooks,)),
            dtype=np.int64,
            meta=np.empty((0, n_codebooks), dtype=np.int64),
        )
    width = n_codebooks * estimator.n_codes
    return X.map_blocks(
        _apply_block,
        estimator,
        method,
        chunks=(X.chunks[0], (width,)),
        dtype=X.dtype,
        meta=sparse.csr_matrix((0, width), dtype=X.dtype),
    )


def _residual_chunk(estimator, block, weights, stages, pool_rows, seed, split_cells):
    """Per-stage statistics of one chunk, from its joint (beam) encoding.

    For every stage in ``stages``: the statistics of what the other stages
    leave of the chunk's rows, a weighted sample of those targets for
    re-seeding, and the members of the cells relocation may split.
    """
    block, weights = _chunk(block, weights)
    codes = estimator._encode(block)
    decoded = estimator._decode(codes)
    rng = np.random.default_rng(seed)
    rows = None
    if pool_rows and weights.sum() > 0:
        rows = rng.choice(block.shape[0], size=pool_rows, p=weights / weights.sum())
    parts = []
    for s in stages:
        quantizer = estimator.quantizers_[s]
        target, sq_dist = stage_target(block, decoded, quantizer.codebook_[codes[:, s]])
        stats = assignment_statistics(
            target, codes[:, s], sq_dist, weights, estimator.n_codes
        )
        pool = None
        if rows is not None:
            pool_weights = np.full(pool_rows, weights.sum() / pool_rows)
            pool = (target[rows], pool_weights, sq_dist[rows])
        members = cell_members(target, weights, codes[:, s], split_cells[s])
        parts.append((stats, pool, members))
    return parts


def _residual_step(estimator, X, sample_weight, stages, momentum=None, scale=None):
    """One EMA step of the given stages from a reduction over the chunks."""
    blocks, weight_blocks = _blocks(X, sample_weight)
    reassign = estimator.dead_code_threshold > 0
    n_rows = X.shape[0]
    split_cells = {
        s: (
            estimator.quantizers_[s]._split_candidates()
            if scale is None
            else np.empty(0, dtype=np.intp)
        )
        for s in stages
    }
    chunk_parts = []
    for i, (block, weights, rows) in enumerate(
        zip(blocks, weight_blocks, X.chunks[0], strict=True)
    ):
        pool_rows = -(-REASSIGN_SAMPLE * rows // n_rows) if reassign else 0
        first = estimator.quantizers_[stages[0]]
        seed = [first._seed, first.n_steps_, i]
        chunk_parts.append(
            dask.delayed(_residual_chunk)(
                estimator, block, weights, stages, pool_rows, seed, split_cells
            )
        )
    chunk_parts = dask.compute(chunk_parts)[0]
    for j, s in enumerate(stages):
        triples = [parts[j] for parts in chunk_parts]
        stats = triples[0][0]
        for other in triples[1:]:
            stats = stats + other[0]
        if not stats.weight > 0:
            raise ValueError(
                "Sample weights must contain at least one non-zero number."
            )
        pools = [t[1] for t in triples if t[1] is not None]
        pool = None
        if pools:
            pool = tuple(np.concatenate(c) for c in zip(*pools, strict=True))
        splits = split_rows(merge_members([t[2] for t in triples]), stats.counts)
        estimator.quantizers_[s]._apply_statistics(stats, pool, momentum, scale, splits)


def fit_residual(estimator, X, sample_weight):
    """``ResidualVQTransformer.fit`` on a Dask array.

    The stages are trained greedily, each a Dask ``fit`` of a
    :class:`~skvq.VQCodebookTransformer` on the lazy residuals of the stages
    before it; the joint refinement then runs each stage's Lloyd step as a
    reduction over the chunks (one pass of the data per stage).
    """
    X = _check_array(estimator, X, reset=True)
    sample_weight = _check_weights(sample_weight, X)
    estimator.quantizers_ = []
    residual = X
    for seed in estimator._seeds(estimator.n_stages):
        quantizer = estimator._quantizer(seed).fit(
            residual, sample_weight=sample_weight
        )
        estimator.quantizers_.append(quantizer)
        decoded = X.map_blocks(
            _decode_block, estimator, len(estimator.quantizers_), dtype=X.dtype
        )
        residual = X - decoded
    scale = min(estimator.batch_size, X.shape[0]) / X.shape[0]
    best, estimator.n_refinements_ = np.inf, 0
    for _ in range(_REFINE_PASSES):
        error = -float(score(estimator, X, sample_weight).compute())
        if not error < best * (1.0 - _REFINE_RTOL):
            break
        best = error
        for s in range(estimator.n_stages):
            _residual_step(estimator, X, sample_weight, [s], 0.0, scale)
        estimator.n_refinements_ += 1
    estimator._finish_fit()
    return estimator


def _decode_block(block, estimator, n_stages):
    """Decoding of a chunk by the first ``n_stages`` stages (greedy training).

    Reads the estimator only: tasks of the threaded scheduler share it.
    """
    block = np.ascontiguousarray(block)
    return estimator._decode(estimator._encode(block, n_stages=n_stages))


def partial_fit_residual(estimator, X, sample_weight):
    """``ResidualVQTransformer.partial_fit`` on a Dask array: one reduction."""
    first = not hasattr(estimator, "quantizers_")
    X = _check_array(estimator, X, reset=first)
    sample_weight = _check_weights(sample_weight, X)
    if first:
        rng = check_random_state(estimator.random_state)
        sample = _initial_sample(estimator._quantizer(None), X, sample_weight, rng)
        estimator._start_stages(*sample)
    _residual_step(estimator, X, sample_weight, list(range(len(estimator.quantizers_))))
    return estimator
