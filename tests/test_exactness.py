"""Exact at every scale, order-free relocation, invariances, beam search."""

import itertools
import tracemalloc
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import NotFittedError

from skvq import ProductVQTransformer, ResidualVQTransformer, VQCodebookTransformer
from skvq._arrays import clamp_negatives, row_sq_norms
from skvq._relocation import split_cell
from skvq._residual import beam_search
from skvq._search import CodebookIndex

ESTIMATORS = {
    "vq": lambda: VQCodebookTransformer(n_codes=16, random_state=0),
    "pq": lambda: ProductVQTransformer(n_codes=16, n_subspaces=4, random_state=0),
    "rvq": lambda: ResidualVQTransformer(n_codes=16, n_stages=3, random_state=0),
    "rvq-beam": lambda: ResidualVQTransformer(
        n_codes=16, n_stages=3, beam_size=3, random_state=0
    ),
}
# Powers of two across each dtype's range at which the scaled data stay
# exact (every value of the normal sample stays a normal number).
SCALES = {np.float32: [-120, -60, 0, 60, 124], np.float64: [-1000, -300, 300, 1020]}


def sample(n=600, n_features=8, seed=0):
    return np.random.RandomState(seed).normal(size=(n, n_features))


def nearest(X, codebook):
    """The nearest code by a plain float64 loop, ties to the lowest index."""
    d2 = ((X[:, None, :] - codebook[None]) ** 2).sum(axis=2)
    return d2.argmin(axis=1)


def reference_codes(est, X, codebooks):
    """Codes of ``X`` (float64, unit scale) by a direct float64 search."""
    if isinstance(est, VQCodebookTransformer):
        return nearest(X, codebooks[0])[:, None]
    if isinstance(est, ProductVQTransformer):
        b = est.subspace_bounds_
        return np.column_stack(
            [nearest(X[:, b[j] : b[j + 1]], c) for j, c in enumerate(codebooks)]
        )
    out = []
    for x in X:
        paths = [((), x)]
        for codebook in codebooks:
            candidates = []
            for path, residual in paths:
                d2 = ((residual - codebook) ** 2).sum(axis=1)
                candidates += [
                    (d2[k], path + (k,), residual - codebook[k])
                    for k in range(codebook.shape[0])
                ]
            candidates.sort(key=lambda c: c[0])
            paths = [(c[1], c[2]) for c in candidates[: est.beam_size]]
        out.append(paths[0][0])
    return np.array(out)


def codebooks_of(est):
    if isinstance(est, VQCodebookTransformer):
        return [est.codebook_]
    return est.codebooks_


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize(
    "dtype, k", [(d, k) for d, ks in SCALES.items() for k in ks], ids=str
)
def test_codes_equal_a_float64_search_on_rescaled_data(name, dtype, k):
    X = np.ldexp(sample(), k).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = ESTIMATORS[name]().fit(X)
        codes = est.transform(X)
    unit_X = np.ldexp(X.astype(np.float64), -k)
    unit_codebooks = [np.ldexp(c.astype(np.float64), -k) for c in codebooks_of(est)]
    assert_array_equal(codes, reference_codes(est, unit_X, unit_codebooks))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize(
    "dtype, scales", [(np.float32, [-100, 70]), (np.float64, [-700, 700])], ids=str
)
def test_fit_of_rescaled_data_is_the_rescaled_fit(name, dtype, scales):
    # A power of two only changes exponents: every decision of the fit is the
    # same, so the code books are the unit-scale ones, rescaled, to the bit.
    X = sample().astype(dtype)
    reference = codebooks_of(ESTIMATORS[name]().fit(X))
    for k in scales:
        scaled = codebooks_of(ESTIMATORS[name]().fit(np.ldexp(X, k).astype(dtype)))
        for a, b in zip(scaled, reference, strict=True):
            assert_array_equal(a, np.ldexp(b, k).astype(dtype))


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_scores_are_finite_and_nonzero_far_from_unit_scale(scale):
    X = (sample() * scale).astype(np.float32)
    vq = VQCodebookTransformer(n_codes=16, random_state=0).fit(X)
    expected = np.mean(
        ((X.astype(np.float64) - vq.codebook_[vq.predict(X)]) ** 2).sum(axis=1)
    )
    assert vq.score(X) == pytest.approx(-expected, rel=1e-5)
    assert np.all(np.isfinite(vq.ema_distortion_)) and vq.ema_distortion_.max() > 0


def test_a_score_beyond_float64_raises_a_clear_error():
    X = np.ldexp(sample(), 600)  # squared distances near 2**1200
    vq = VQCodebookTransformer(n_codes=16, random_state=0).fit(X)
    assert np.all(np.isfinite(vq.codebook_))
    with pytest.raises(OverflowError, match="exceeds float64's range"):
        vq.score(X)
    # Attributes in squared units are infinite rather than wrong.
    assert np.all(np.isinf(vq.ema_distortion_[vq.ema_distortion_ > 0]))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_fit_does_not_change_with_a_uniform_weight_scale(name):
    rng = np.random.RandomState(0)
    X = np.vstack(
        [rng.normal(loc=rng.normal(size=8) * 3, size=(150, 8)) for _ in range(6)]
    )
    w = rng.uniform(0.5, 2.0, size=X.shape[0])
    reference = np.vstack(codebooks_of(ESTIMATORS[name]().fit(X, sample_weight=w)))
    for c in (1e-6, 1e-3, 1e3, 1e6):
        est = ESTIMATORS[name]().fit(X, sample_weight=c * w)
        assert_allclose(
            np.vstack(codebooks_of(est)),
            reference,
            rtol=0,
            atol=1e-9 * np.abs(reference).max(),
        )


# ------------------------------------------------------------- relocation
def test_split_gain_depends_on_the_rows_as_a_set_not_their_order_or_rounding():
    rng = np.random.RandomState(0)
    Y = np.vstack([rng.normal(size=(60, 16)), rng.normal(loc=1.0, size=(54, 16))])
    v = rng.uniform(0.5, 2.0, size=Y.shape[0])
    code = Y.mean(axis=0)
    gain = split_cell(Y, v, code)[0]
    for seed in range(5):
        perm = np.random.RandomState(seed).permutation(Y.shape[0])
        assert split_cell(Y[perm], v[perm], code)[0] == pytest.approx(gain, rel=1e-12)
    # The same rows computed another way (1e-15 apart): the same estimate.
    jitter = Y * (1 + 1e-15 * rng.choice([-1, 1], size=Y.shape))
    assert split_cell(jitter, v, code)[0] == pytest.approx(gain, rel=1e-9)


# ------------------------------------------------------------ beam search
@pytest.mark.parametrize("algorithm", ["brute", "kd_tree"])
def test_k_nearest_codes_are_exact_with_ties_to_the_lowest_index(algorithm):
    rng = np.random.RandomState(0)
    codes = rng.randint(-3, 4, size=(60, 3)).astype(float)  # many exact ties
    X = rng.randint(-3, 4, size=(300, 3)).astype(float) + 0.5
    labels, sq = CodebookIndex(codes, algorithm).nearest_k(X, 4)
    distinct = CodebookIndex(codes, algorithm).ids
    allowed = np.arange(60) if distinct is None else distinct
    d2 = ((X[:, None, :] - codes[allowed][None]) ** 2).sum(axis=2)
    order = np.lexsort((np.broadcast_to(allowed, d2.shape), d2), axis=1)[:, :4]
    assert_array_equal(labels, allowed[order])
    assert_allclose(sq, np.take_along_axis(d2, order, axis=1))


def test_bounded_k_nearest_lists_the_nearest_codes_or_bounds_those_left_out():
    rng = np.random.RandomState(0)
    grid = np.array(list(itertools.product(range(-2, 3), repeat=4)), dtype=np.float32)
    codes = grid[rng.choice(len(grid), 200, replace=False)]  # distinct, many ties
    X = rng.randint(-2, 3, size=(400, 4)) + rng.choice([0.0, 0.5], size=(400, 4))
    found = CodebookIndex(codes, "brute").nearest_k_bounded(X, 5)
    d2 = ((X[:, None, :] - codes.astype(float)[None]) ** 2).sum(axis=2)
    listed = np.take_along_axis(d2, found.labels, axis=1)
    assert np.all(np.abs(found.sq_dist - listed) <= found.slack[:, None] + 1e-12)
    certain = np.isinf(found.floor)
    nearest = np.lexsort((np.broadcast_to(np.arange(200), d2.shape), d2), axis=1)
    assert_array_equal(
        np.sort(found.labels[certain], axis=1), np.sort(nearest[certain, :5], axis=1)
    )
    left_out = np.ones_like(d2, dtype=bool)
    np.put_along_axis(left_out, found.labels, False, axis=1)
    nearest_left_out = np.where(left_out, d2, np.inf).min(axis=1)
    assert np.all(nearest_left_out[~certain] >= found.floor[~certain])
    assert 0 < np.count_nonzero(~certain) < 400
    assert found.slack.max() > 0  # bounds, not exact distances, for most rows


def test_beam_search_finds_a_nearer_code_that_float32_scores_leave_out():
    # Four codes at distance 1 of the origin: the row's float32 scores tie
    # them (1 +- 2e-9), the bounded search lists the two lowest indices, yet
    # the last is the nearest.
    codes = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [5, 5]], dtype=np.float32)
    X = np.array([[0.0, -1e-9]])
    codes_found, sq_err = beam_search(X, [CodebookIndex(codes, "brute")], 2)
    assert_array_equal(codes_found, [[3]])
    assert sq_err[0] == (1 - 1e-9) ** 2


def test_beam_search_never_forms_rows_times_codes_per_path():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 4))
    indexes = [CodebookIndex(rng.normal(size=(2**15, 4)), "kd_tree") for _ in range(2)]
    trees = [index.tree for index in indexes]  # built outside the measurement
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        codes, _ = beam_search(X, indexes, 3)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 0.05 * X.shape[0] * 3 * 2**15 * 8
    assert codes.shape == (200, 2) and len(trees) == 2


def test_beam_search_is_exhaustive_at_full_width_with_many_codes():
    rng = np.random.RandomState(1)
    X = rng.normal(size=(40, 2))
    vectors = [rng.normal(size=(64, 2)), 0.3 * rng.normal(size=(64, 2))]
    _, err = beam_search(X, [CodebookIndex(v, "kd_tree") for v in vectors], 64)
    best = np.full(40, np.inf)
    for a, b in itertools.product(range(64), repeat=2):
        best = np.minimum(best, ((X - vectors[0][a] - vectors[1][b]) ** 2).sum(1))
    assert_allclose(err, best)


# ------------------------------------------------------------ rough edges
@pytest.mark.parametrize(
    "make, attributes",
    [
        (
            lambda: VQCodebookTransformer(),
            ["codebook_", "ema_counts_", "perplexity_", "n_iter_", "n_steps_"],
        ),
        (
            lambda: ProductVQTransformer(),
            ["codebooks_", "perplexity_", "n_iter_", "bits_per_vector_", "quantizers_"],
        ),
        (
            lambda: ResidualVQTransformer(),
            ["codebooks_", "perplexity_", "n_iter_", "n_refinements_"],
        ),
    ],
)
def test_fitted_attributes_of_an_unfitted_estimator_raise_not_fitted(make, attributes):
    est = make()
    for name in attributes:
        with pytest.raises(NotFittedError):
            getattr(est, name)
        assert not hasattr(est, name)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
@pytest.mark.parametrize("encode", ["index", "onehot"])
def test_inverse_transform_of_no_rows_gives_no_rows(Estimator, encode):
    X = sample(n=200, n_features=6)
    est = Estimator(8, 3, encode=encode, random_state=0).fit(X)
    width = 3 if encode == "index" else 24
    decoded = est.inverse_transform(np.zeros((0, width), dtype=np.int64))
    assert decoded.shape == (0, 6)
    vq = VQCodebookTransformer(n_codes=8, random_state=0).fit(X)
    assert vq.inverse_transform(np.zeros((0, 1), dtype=np.int64)).shape == (0, 6)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_n_iter_counts_fit_steps_and_is_zero_after_partial_fit_alone(Estimator):
    X = sample(n=300, n_features=6)
    assert Estimator(8, 2, random_state=0).partial_fit(X).n_iter_ == 0
    assert Estimator(8, 2, random_state=0).fit(X).n_iter_ > 0


# ------------------------------------------------------------ one feature
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_feature_search_is_exact_with_ties_to_the_lowest_index(dtype):
    rng = np.random.RandomState(0)
    codes = (rng.randint(-6, 7, size=(40, 1)) / 2).astype(dtype)  # duplicates
    X = (rng.randint(-16, 17, size=(500, 1)) / 4).astype(dtype)  # midpoints
    index = CodebookIndex(codes, "auto")
    labels, sq, second = index.nearest(X, return_sq_dist=True, return_second=True)
    d2 = (X.astype(float) - codes.astype(float).T) ** 2
    assert_array_equal(labels, nearest(X.astype(float), codes.astype(float)))
    assert_allclose(sq, d2.min(axis=1))
    # A lower bound on the distance to every other code.
    others = np.where(np.arange(40) == labels[:, None], np.inf, d2)
    assert np.all(second <= others.min(axis=1))


def test_one_feature_search_breaks_rounded_ties_like_the_float64_search():
    # 0.5 - c rounds to 0.5 for every one of these tiny codes: all tie, and
    # the lowest index wins, as in the float64 search.
    codes = np.array([[3e-18], [-2e-17], [1e-17], [2.5e-17]])
    X = np.array([[0.5], [-0.5], [0.0]])
    labels, _ = CodebookIndex(codes, "auto").nearest(X)
    assert_array_equal(labels, CodebookIndex(codes, "brute").nearest(X)[0])
    assert_array_equal(labels[:2], [0, 0])


def test_one_feature_search_is_exact_at_extreme_scales():
    rng = np.random.RandomState(1)
    # Subnormal values: their squared differences underflow unscaled.
    codes = np.ldexp(rng.normal(size=(30, 1)), -1060)
    X = np.ldexp(rng.normal(size=(200, 1)), -1060)
    labels, _ = CodebookIndex(codes, "auto").nearest(X)
    scaled = nearest(np.ldexp(X, 1060), np.ldexp(codes, 1060))
    assert_array_equal(labels, scaled)


@pytest.mark.parametrize("n_codes", [1, 3])
def test_identical_codes_far_from_unit_scale_get_a_search_scale(n_codes):
    # No spread: the scale comes from the code itself, as for any code book.
    codes = np.full((n_codes, 4), 2.0**600)
    assert (
        CodebookIndex(codes, "brute").scale == CodebookIndex(codes * 1.5, "brute").scale
    )
    assert CodebookIndex(codes, "brute").scale != 1.0


def window_scale(spread, exponent):
    """1 inside [2**-exponent, 2**exponent], else the power of two that
    brings ``spread`` into [0.5, 1)."""
    if 2.0**-exponent <= spread <= 2.0**exponent:
        return 1.0
    return 2.0 ** -int(np.frexp(spread)[1])


# Binary exponents of code spreads near the edges of every safe window (and
# far beyond), within each dtype's range.
WINDOW_EDGES = [-42, -40, -38, 0, 38, 40, 42]
SPREAD_EXPONENTS = [(np.float32, e) for e in [-110, *WINDOW_EDGES, 100]] + [
    (np.float64, e) for e in [-1000, -401, -399, -300, *WINDOW_EDGES, 300, 398, 400]
]


@pytest.mark.parametrize("shift", [None, 12])
@pytest.mark.parametrize("dtype, exponent", SPREAD_EXPONENTS)
def test_search_scales_follow_the_spread_of_the_codes(dtype, exponent, shift):
    # The index tells the common case from two cheap bounds; near every
    # window's edge, and for codes far from the origin (a shift of 2**12
    # spreads), its scales must still be those of the spread itself.
    rng = np.random.RandomState(0)
    codes = rng.uniform(-1.0, 1.0, size=(7, 5))
    if shift is not None:
        codes += 2.0**shift
    codes = np.ldexp(codes, exponent).astype(dtype)
    codes64 = codes.astype(np.float64)
    spread = float(np.abs(codes64 - codes64.mean(axis=0)).max())
    index = CodebookIndex(codes, "brute")
    expected_tree = window_scale(spread, 400)
    expected = window_scale(spread, 40 if dtype == np.float32 else 400)
    if not 2.0**-126 <= expected <= 2.0**126:
        expected = expected_tree  # float32 codes searched in float64
    assert index.tree_scale == expected_tree
    assert index.scale == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (300, 257), (3, 4, 70_001)])
def test_clamp_negatives_zeroes_exactly_the_negative_entries(dtype, shape):
    values = np.random.RandomState(0).normal(size=shape).astype(dtype)
    values.reshape(-1)[:3] = [np.nan, -0.0, -np.inf]
    expected = np.where(values < 0, 0.0, values).astype(dtype)
    out = clamp_negatives(values)
    assert out is values
    assert_array_equal(values, expected)  # NaN stays NaN
    strided = np.random.RandomState(1).normal(size=(50, 40)).astype(dtype)[:, ::3]
    expected = np.where(strided < 0, 0.0, strided)
    assert_array_equal(clamp_negatives(strided), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_codes", [2, 40, 64, 65, 150])  # either layout
def test_nearest_code_is_exact_with_ties_and_bounds_the_second(dtype, n_codes):
    rng = np.random.RandomState(n_codes)
    # Distinct integer codes and half-integer rows: many exact ties.
    grid = np.array(list(itertools.product(range(-3, 4), repeat=3)))
    codes = grid[rng.choice(grid.shape[0], n_codes, replace=False)].astype(dtype)
    X = (rng.randint(-3, 4, size=(500, 3)) + 0.5).astype(dtype)
    index = CodebookIndex(codes, "brute")
    labels, sq, second = index.nearest(X, return_sq_dist=True, return_second=True)
    d2 = ((X[:, None, :].astype(float) - codes[None].astype(float)) ** 2).sum(axis=2)
    assert_array_equal(labels, d2.argmin(axis=1))  # ties to the lowest code
    assert_array_equal(sq, d2.min(axis=1))
    others = d2.copy()
    others[np.arange(500), labels] = np.inf
    assert np.all(second <= others.min(axis=1))


@pytest.mark.parametrize("n_columns", [1, 2, 3, 4, 7])
def test_row_sq_norms_are_the_squared_norms_within_rounding(n_columns):
    values = np.random.RandomState(n_columns).normal(size=(1000, n_columns + 1))
    for block in (values, values[:, :n_columns], values[:, :n_columns].astype("f4")):
        exact = (block.astype(np.longdouble) ** 2).sum(axis=1)
        norms = row_sq_norms(block)
        assert norms.dtype == block.dtype
        eps = np.finfo(block.dtype).eps
        assert np.all(np.abs(norms - exact) <= block.shape[1] * eps * exact)
