"""The stage trainer of the multi-codebook quantisers' ``fit``.

A product or residual quantiser trains several code books in a row (one per
subspace, one per stage), each on rows that earlier code books prepared.
The single code book's ``fit`` (k-means++ with extra candidates, Lloyd
steps to convergence, relocation rounds) is made for one code book on its
own and costs too much eight times over.  The stage trainer fits one code
book to a bounded weighted sample by **progressive-dimension k-means**
(after Liu et al., "Improved Residual Vector Quantization for
High-dimensional Approximate Nearest Neighbor Search", 2015, and faiss's
``ProgressiveDimClustering``):

1. the sample is centred and rotated onto its principal axes (an exact
   change of coordinates: distances are kept);
2. the codes are seeded (``init``) on the first principal dimension alone;
3. Lloyd iterations run on the first ``d_1 < d_2 < ... < d`` principal
   dimensions (``PROGRESSIVE_STEPS`` sizes growing geometrically), each
   step warm-started from the cells of the last: the early iterations are
   cheap and settle the coarse structure along the directions of most
   energy, which the later ones refine.

Each Lloyd iteration uses the same kernels as every other fit (the search
index and the weighted statistics; Hamerly's distance bounds were left out,
as they spared few rows here), and a cell left empty takes half of the
largest cell (split along its spread), as faiss does.  Measured on
``benchmarks/multi_bench.py``'s sets, progressive steps reach a lower
held-out error than Lloyd iterations on all the dimensions for residual
stages (docs/multi_codebook.rst).  The product quantiser's subspaces, of a
few features each, use one plain step instead (:meth:`StageTrainer.plain`).
"""

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ._kernels import (
    Moments,
    batch_statistics,
    code_statistics,
    greedy_trials,
    init_codebooks,
)
from ._rows import WeightedRows
from ._search import CodebookIndex
from ._threads import BLAS_HOLD

# A code book trains on at most this many rows per code (faiss's default
# too): more rows barely move the codes, and the cost grows with them.
MAX_ROWS_PER_CODE = 256
# Lloyd iterations of the product quantiser's plain trainer, at most (as
# faiss's product quantiser).
PLAIN_ITERATIONS = 25
# Seeds are drawn from at most this many rows per code, as MiniBatchKMeans
# seeds from ``init_size`` rows: seeding costs rows times codes (k-means++
# on all 32,000 rows of each stage took 1.7 s of a 14 s residual fit).
INIT_ROWS_PER_CODE = 16
# k-means++ candidates per seed of the product quantiser's subspaces (the
# single code book draws 2 * (2 + log K), 14 for 256 codes).  On
# multi_bench's three sets (held-out error, means of 3 seeds) 3, 7 or 14
# candidates end at the same error within the seeds' spread, 1 did too
# except on load_digits (+1.4 %); load_digits' fit takes 0.072 s with 3,
# 0.082 s with 7 (6 seeds: error 0.05661 and 0.05649, spread 0.0003).
SEED_TRIALS = 3
# Dimension steps of progressive k-means, and Lloyd iterations per step
# (faiss's defaults; 10 x 10 iterations of growing size cost about as much
# as 25 on all the dimensions).
PROGRESSIVE_STEPS = 10
STEP_ITERATIONS = 10
# A step ends when an iteration lowers the distortion by less than this
# fraction.  Progressive steps: 1e-3 (against 1e-4, on multi_bench's three
# sets: 10-15 % less time, equal or lower held-out error at beams 1 and 5;
# 1e-2 raised it on the low-rank set).  Plain steps: 1e-4 (1e-3 raised the
# product quantiser's error on the low-rank set, 0.5340 to 0.5343).
PROGRESSIVE_RTOL = 1e-3
PLAIN_RTOL = 1e-4
# A split cell's two codes lie this fraction of the cell's spread apart.
SPLIT_SPREAD = 2.0**-10


@dataclass(frozen=True)
class StageFit:
    """The code vectors (the sample's coordinates and dtype) and the Lloyd
    iterations that fitted them."""

    codes: np.ndarray
    n_iter: int


@dataclass(frozen=True)
class StageTrainer:
    """k-means of one code book in ``progressive_steps`` dimension steps
    (module docstring; one step: plain Lloyd iterations on all the
    features, without the rotation), seeded by ``init`` (k-means++: the
    best of ``seed_trials`` candidates per seed).

    ``step_iterations`` Lloyd iterations per step at most; a step ends early
    when the codes move by at most ``tol`` times the sample's mean variance
    (squared shift summed over the codes, as in
    :class:`~sklearn.cluster.KMeans`), or when an iteration lowers the
    distortion by less than ``step_rtol``.
    """

    n_codes: int
    init: str = "k-means++"
    seed_trials: int = SEED_TRIALS
    algorithm: str = "auto"
    progressive_steps: int = PROGRESSIVE_STEPS
    step_iterations: int = STEP_ITERATIONS
    step_rtol: float = PROGRESSIVE_RTOL
    tol: float = 0.0
    n_jobs: int | None = None

    @classmethod
    def progressive(cls, config):
        """The residual quantiser's trainer for an estimator's
        :class:`~skvq._state.TrainingConfig`: ``PROGRESSIVE_STEPS`` steps
        (``max_iter`` caps the Lloyd iterations of a code book)."""
        per_step = max(1, min(STEP_ITERATIONS, config.max_iter // PROGRESSIVE_STEPS))
        # Seeds on one principal dimension cost little: the single code
        # book's candidates (the residual figures were measured with them).
        trials = greedy_trials(config.n_codes)
        return cls._of(config, PROGRESSIVE_STEPS, per_step, PROGRESSIVE_RTOL, trials)

    @classmethod
    def plain(cls, config):
        """The product quantiser's trainer: one step on all the dimensions
        of a subspace (a few features: progressive steps were measured to
        cost more there and gain nothing), ``PLAIN_ITERATIONS`` at most."""
        iterations = min(PLAIN_ITERATIONS, config.max_iter)
        return cls._of(config, 1, iterations, PLAIN_RTOL, SEED_TRIALS)

    @classmethod
    def _of(cls, config, progressive_steps, step_iterations, step_rtol, seed_trials):
        return cls(
            config.n_codes,
            init=config.init,
            seed_trials=seed_trials,
            algorithm=config.algorithm,
            progressive_steps=progressive_steps,
            step_iterations=step_iterations,
            step_rtol=step_rtol,
            tol=config.tol,
            n_jobs=config.n_jobs,
        )

    @property
    def max_rows(self):
        """The most rows a code book trains on."""
        return MAX_ROWS_PER_CODE * self.n_codes

    def fit(self, X, weights, rng):
        """A :class:`StageFit` of ``X`` (rows of positive ``weights``)."""
        (fit,) = self.fit_many([X], [weights], [rng])
        return fit

    def fit_many(self, X, weights, rngs):
        """:meth:`fit` of several samples, one generator each: the seeds of
        all of them are drawn together (one stacked k-means++,
        :func:`~skvq._kernels.init_codebooks`), then each sample's Lloyd
        iterations run.  Each :class:`StageFit` equals the sample's fit
        alone."""
        prepared = [self._prepared(x, w) for x, w in zip(X, weights, strict=True)]
        seeds = self._seeds(
            [np.ascontiguousarray(p.X[:, : p.dims[0]]) for p in prepared],
            weights,
            rngs,
        )
        return [
            self._descend(p, w, codes)
            for p, w, codes in zip(prepared, weights, seeds, strict=True)
        ]

    def _prepared(self, X, weights):
        """The sample on its principal axes (progressive steps) or as it is,
        with its dimension steps and the Lloyd iterations' shift tolerance."""
        shift_tol = self.tol * Moments.of(X, weights).mean_variance
        dims = progressive_dims(X.shape[1], self.progressive_steps)
        if self.progressive_steps == 1:
            return _Prepared(X, dims, shift_tol)
        mean, axes = principal_axes(X, weights)
        rotated = (X - mean.astype(X.dtype)) @ axes.astype(X.dtype)
        return _Prepared(rotated, dims, shift_tol, rotated=True, mean=mean, axes=axes)

    def _descend(self, prepared, weights, codes):
        """Lloyd iterations from the seeds ``codes`` through the dimension
        steps, each warm-started from the cells of the last."""
        labels, n_iter = None, 0
        for step, n_dims in enumerate(prepared.dims):
            part = np.ascontiguousarray(prepared.X[:, :n_dims])
            if step > 0:
                codes = self._warm_start(part, weights, labels)
            codes, labels, steps = self._lloyd(part, weights, codes, prepared.shift_tol)
            n_iter += steps
        return StageFit(prepared.in_features(codes), n_iter)

    def _lloyd(self, X, weights, codes, shift_tol):
        """Lloyd iterations from ``codes``; the codes, the last labels and
        the iterations made."""
        n_iter, last_loss = 0, np.inf
        while n_iter < self.step_iterations:
            n_iter += 1
            index = CodebookIndex(codes, self.algorithm)
            stats, labels, _ = batch_statistics(
                index, X, weights, self.n_codes, self.n_jobs
            )
            new = split_empty_cells(stats.counts, stats.sums, stats.distortions)
            new = new.astype(X.dtype)
            moved = (new - codes).astype(np.float64)
            codes = new
            loss = stats.mean_loss
            if float(np.sum(moved * moved)) <= shift_tol:
                break
            if last_loss - loss < self.step_rtol * loss:
                break
            last_loss = loss
        return codes, labels, n_iter

    def _seeds(self, X, weights, rngs):
        """Initial codes of each sample by ``init``, drawn from at most
        ``INIT_ROWS_PER_CODE`` rows per code (seeding costs rows times
        codes)."""
        max_rows = INIT_ROWS_PER_CODE * self.n_codes
        samples = []
        for x, w, rng in zip(X, weights, rngs, strict=True):
            if x.shape[0] > max_rows:
                chosen = np.sort(rng.choice(x.shape[0], size=max_rows, replace=False))
                x, w = x[chosen], w[chosen]
            samples.append(WeightedRows(x, w))
        codebooks = init_codebooks(
            samples, self.n_codes, self.init, rngs, n_trials=self.seed_trials
        )
        return [codes.astype(x.dtype) for codes, x in zip(codebooks, X, strict=True)]

    def _warm_start(self, X, weights, labels):
        """The codes in more dimensions: each cell's weighted mean there."""
        counts, sums = code_statistics(X, labels, weights, self.n_codes, self.n_jobs)
        distortions = np.zeros(self.n_codes)
        return split_empty_cells(counts, sums, distortions).astype(X.dtype)


@dataclass(frozen=True)
class _Prepared:
    """A sample ready for the dimension steps: its rows (on the principal
    axes when ``rotated``: ``(x - mean) @ axes``), the steps' dimensions and
    the shift tolerance of its Lloyd iterations."""

    X: np.ndarray
    dims: list
    shift_tol: float
    rotated: bool = False
    mean: np.ndarray | None = None
    axes: np.ndarray | None = None

    def in_features(self, codes):
        """``codes`` (coordinates of ``X``) in the sample's features."""
        if not self.rotated:
            return codes
        back = codes.astype(np.float64) @ self.axes.T + self.mean
        return back.astype(self.X.dtype)


def principal_axes(X, weights):
    """The weighted mean of the rows (float64) and the eigenvectors of their
    weighted covariance (columns, largest eigenvalue first; float64,
    orthonormal to rounding whatever the precision of the covariance,
    which only decides the order of the axes: it is summed in ``X``'s
    dtype)."""
    mean = weights @ X.astype(np.float64) / weights.sum()
    scaled = (X - mean.astype(X.dtype)) * np.sqrt(weights).astype(X.dtype)[:, None]
    scatter = (scaled.T @ scaled).astype(np.float64)
    # SciPy's LAPACK runs on its own BLAS, whose threads would then spin
    # (OpenBLAS waits busily for more work) on the cores that NumPy's BLAS
    # needs for the next products: on 2 cores this doubled the time of a
    # residual fit on load_digits (0.42 s -> 0.72-0.87 s).  One thread does
    # a d x d eigenproblem as fast.
    with BLAS_HOLD:
        _, vectors = linalg.eigh(scatter)
    return mean, np.ascontiguousarray(vectors[:, ::-1])


def progressive_dims(n_features, n_steps):
    """The dimensions of ``n_steps`` progressive steps: sizes growing
    geometrically to ``n_features`` (distinct, increasing)."""
    dims = {
        max(1, int(n_features ** ((step + 1) / n_steps))) for step in range(n_steps - 1)
    }
    return sorted(dims - {n_features}) + [n_features]


def split_empty_cells(counts, sums, distortions):
    """Cell means; each empty cell takes half of the cell of largest weight
    at that moment (its code and a copy are moved apart along the cell's
    spread, by ``SPLIT_SPREAD`` of it), float64."""
    counts = counts.astype(np.float64)
    filled = counts > 0
    if filled.all():  # the common case: no masks, no spreads
        return sums / counts[:, None]
    codes = np.zeros_like(sums, dtype=np.float64)
    codes[filled] = sums[filled] / counts[filled, None]
    spread = np.zeros(counts.shape[0])
    spread[filled] = np.sqrt(distortions[filled] / counts[filled] / sums.shape[1])
    # Alternating signs: the copy and the original move apart on every axis.
    pattern = np.where(np.arange(sums.shape[1]) % 2 == 0, 1.0, -1.0)
    for empty in np.flatnonzero(~filled):
        largest = int(np.argmax(counts))
        if not counts[largest] > 0:
            break
        step = SPLIT_SPREAD * max(spread[largest], np.abs(codes[largest]).max())
        codes[empty] = codes[largest] + step * pattern
        codes[largest] -= step * pattern
        counts[largest] /= 2.0
        counts[empty] = counts[largest]
        spread[empty] = spread[largest]
    return codes
