"""The multi-codebook quantisers' stage trainer and the residual quantiser's
beam-aware greedy training."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.decomposition import PCA

import skvq._residual as residual
import skvq._stage_trainer as stage_trainer
from skvq import ProductVQTransformer, ResidualVQTransformer
from skvq._kernels import kmeans_plusplus, kmeans_plusplus_many
from skvq._residual import beam_pool
from skvq._search import CodebookIndex
from skvq._stage_trainer import (
    StageTrainer,
    principal_axes,
    progressive_dims,
    split_empty_cells,
)


@pytest.fixture
def trained_sizes(monkeypatch):
    """The number of rows each stage trainer's fit is given, in order."""
    sizes = []
    fit_many = StageTrainer.fit_many

    def recording(self, pools, weights, rngs):
        sizes.extend(pool.shape[0] for pool in pools)
        return fit_many(self, pools, weights, rngs)

    monkeypatch.setattr(StageTrainer, "fit_many", recording)
    return sizes


def blobs(n_per=200, n_features=6, seed=0):
    rng = np.random.RandomState(seed)
    centres = 20.0 * np.eye(4, n_features)
    X = np.repeat(centres, n_per, axis=0) + rng.normal(size=(4 * n_per, n_features))
    return X, centres


@pytest.mark.parametrize(
    "n_features, n_steps, expected",
    [
        (192, 10, [1, 2, 4, 8, 13, 23, 39, 67, 113, 192]),
        (3, 10, [1, 2, 3]),
        (1, 10, [1]),
        (24, 1, [24]),
    ],
)
def test_progressive_dims_grow_geometrically_to_all_features(
    n_features, n_steps, expected
):
    assert progressive_dims(n_features, n_steps) == expected


def test_principal_axes_are_pca_components_and_weights_repeat_rows():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 5)) * [5.0, 3.0, 2.0, 1.0, 0.5]
    mean, axes = principal_axes(X, np.ones(300))
    assert_allclose(axes.T @ axes, np.eye(5), atol=1e-12)
    pca = PCA().fit(X)
    assert_allclose(mean, X.mean(axis=0))
    assert_allclose(np.abs(axes.T @ pca.components_.T), np.eye(5), atol=1e-6)
    weights = rng.randint(1, 4, size=300).astype(float)
    mean_w, axes_w = principal_axes(X, weights)
    mean_r, axes_r = principal_axes(
        np.repeat(X, weights.astype(int), axis=0), np.ones(int(weights.sum()))
    )
    assert_allclose(mean_w, mean_r)
    assert_allclose(np.abs(axes_w.T @ axes_r), np.eye(5), atol=1e-6)


def test_an_empty_cell_takes_half_of_the_largest():
    counts = np.array([4.0, 0.0, 2.0])
    sums = np.array([[4.0, 8.0], [0.0, 0.0], [6.0, 6.0]])
    distortions = np.array([8.0, 0.0, 0.0])  # spread of cell 0: 1 per axis
    codes = split_empty_cells(counts, sums, distortions)
    step = stage_trainer.SPLIT_SPREAD * 2.0  # the code's largest entry, 2
    assert_allclose(codes[0], [1.0 - step, 2.0 + step])
    assert_allclose(codes[1], [1.0 + step, 2.0 - step])
    assert_allclose(codes[2], [3.0, 3.0])


@pytest.mark.parametrize(
    "make",
    [
        StageTrainer,
        lambda **kw: StageTrainer(progressive_steps=1, step_iterations=25, **kw),
    ],
)
def test_stage_trainer_finds_separated_clusters(make):
    X, centres = blobs()
    fit = make(n_codes=4).fit(X, np.ones(X.shape[0]), np.random.RandomState(0))
    found = CodebookIndex(fit.codes, "brute").nearest(centres)[0]
    assert sorted(found) == [0, 1, 2, 3]
    assert_allclose(fit.codes[found], centres, atol=0.3)
    assert fit.codes.dtype == X.dtype and fit.n_iter >= 1


def test_stage_trainer_is_the_same_for_any_thread_count():
    X = np.random.RandomState(0).normal(size=(3000, 12)).astype(np.float32)
    fits = [
        StageTrainer(32, n_jobs=n_jobs).fit(X, np.ones(3000), np.random.RandomState(5))
        for n_jobs in (1, 2)
    ]
    assert_array_equal(fits[0].codes, fits[1].codes)


@pytest.mark.parametrize("block_values", [2**18, 7])  # one block; 2 rows a block
def test_beam_pool_holds_every_kept_path_residual_weighted_as_its_row(
    monkeypatch, block_values
):
    monkeypatch.setattr(residual, "_POOL_BLOCK_ELEMENTS", block_values)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(5, 3))
    weights = np.arange(1.0, 6.0)
    codebook = rng.normal(size=(4, 3))
    paths = np.array([[[0], [2]], [[1], [3]], [[2], [1]], [[3], [0]], [[0], [1]]])
    index = CodebookIndex(codebook, "brute")
    pool, pool_weights = beam_pool(X, weights, paths, [index], 100, rng)
    expected = (X[:, None, :] - codebook[paths[:, :, 0]]).reshape(10, 3)
    assert_allclose(pool, expected)
    assert_array_equal(pool_weights, np.repeat(weights, 2))
    few, few_weights = beam_pool(X, weights, paths, [index], 4, rng)
    assert few.shape == (4, 3)
    matches = [np.flatnonzero(np.isclose(expected, row).all(axis=1)) for row in few]
    assert all(m.size == 1 for m in matches)
    assert_array_equal(few_weights, np.repeat(weights, 2)[np.concatenate(matches)])


def test_residual_stages_learn_from_every_kept_path(trained_sizes):
    X = blobs(n_per=50)[0]
    ResidualVQTransformer(n_codes=8, n_stages=3, beam_size=3, random_state=0).fit(X)
    assert trained_sizes == [200, 600, 600]


def test_max_iter_caps_the_lloyd_iterations_of_each_code_book():
    X = blobs(n_per=100)[0]
    rvq = ResidualVQTransformer(n_codes=8, n_stages=3, max_iter=20, random_state=0)
    assert 3 <= rvq.fit(X).n_iter_ <= 3 * 10 * 2
    pq = ProductVQTransformer(n_codes=8, n_subspaces=3, max_iter=2, random_state=0)
    assert 3 * 2 <= pq.fit(X).n_iter_ <= 3 * (2 + 1)


def test_product_fit_trains_on_a_bounded_sample_then_counts_all_rows(
    trained_sizes,
):
    X = np.random.RandomState(0).normal(size=(5000, 4))
    pq = ProductVQTransformer(n_codes=2, n_subspaces=2, random_state=0).fit(X)
    assert trained_sizes == [stage_trainer.MAX_ROWS_PER_CODE * 2] * 2
    # The last full step counts every row (EMA counts per batch_size rows).
    for view in pq.quantizers_:
        assert_allclose(view.ema_counts_.sum(), pq.batch_size)


def test_refinement_holds_out_rows_the_greedy_stages_never_saw(monkeypatch):
    X = np.random.RandomState(0).normal(size=(5000, 3))
    pools = []
    fit = StageTrainer.fit

    def recording(self, pool, weights, rng):
        pools.append(pool.copy())
        return fit(self, pool, weights, rng)

    monkeypatch.setattr(StageTrainer, "fit", recording)
    ResidualVQTransformer(n_codes=2, n_stages=2, random_state=0).fit(X)
    sample = pools[0]  # the first stage learns the sample's rows themselves
    assert sample.shape[0] == stage_trainer.MAX_ROWS_PER_CODE * 2
    assert not residual.held_out(sample).any()
    assert residual.held_out(X).sum() > 500


def _weighted_rows_with_duplicates(seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(600, 4))
    X[550:] = X[:50]  # duplicates: one row each of the training rows
    weights = rng.uniform(0.5, 2.0, size=600)
    weights[[70, 400, 450]] = 0.0  # no training rows at all
    return X, weights


def _rows_searched(monkeypatch, X, weights, lookup=True, **params):
    """Rows that ``fit`` hands to beam search, in all."""
    searched = []
    search = residual.beam_search

    def counting(rows, *args, **kwargs):
        searched.append(rows.shape[0])
        return search(rows, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(residual, "beam_search", counting)
        if not lookup:
            patch.setattr(
                residual.SampleCodes, "encode", lambda self, rows, search: search(rows)
            )
        ResidualVQTransformer(**params).fit(X, sample_weight=weights)
    return sum(searched)


@pytest.mark.parametrize("n_codes, spared", [(4, 547), (2, 0)])
def test_fit_takes_the_training_rows_codes_from_a_complete_sample(
    monkeypatch, n_codes, spared
):
    # 547 distinct training rows: four codes a stage sample them all, and
    # the first encoding searches none; two codes sample 512 of them, and
    # the rows are all searched (a lookup would spare few).
    X, weights = _weighted_rows_with_duplicates()
    params = dict(n_codes=n_codes, n_stages=3, beam_size=3, random_state=0)
    with_lookup = _rows_searched(monkeypatch, X, weights, **params)
    without = _rows_searched(monkeypatch, X, weights, lookup=False, **params)
    assert without - with_lookup == spared


def test_fit_with_the_sample_codes_equals_fit_searching_every_row(monkeypatch):
    X, weights = _weighted_rows_with_duplicates(1)
    params = dict(n_codes=4, n_stages=3, beam_size=3, random_state=1)
    reused = ResidualVQTransformer(**params).fit(X, sample_weight=weights)
    monkeypatch.setattr(
        residual.SampleCodes, "encode", lambda self, rows, search: search(rows)
    )
    searched = ResidualVQTransformer(**params).fit(X, sample_weight=weights)
    assert reused.n_refinements_ == searched.n_refinements_
    for mine, theirs in zip(reused.codebooks_, searched.codebooks_, strict=True):
        assert_array_equal(mine, theirs)
    assert_array_equal(reused.transform(X), searched.transform(X))


def seeding_samples(seed=0):
    """Samples of different sizes: four of 3 features, one of 5."""
    rng = np.random.RandomState(seed)
    shapes = [(300, 3), (57, 3), (1000, 3), (5, 3), (200, 5)]
    points = [rng.normal(size=shape) * rng.uniform(0.1, 10) for shape in shapes]
    weights = [rng.uniform(0.5, 2.0, size=p.shape[0]) for p in points]
    return points, weights


@pytest.mark.parametrize("n_trials", [1, 3, 14])
def test_stacked_seeding_equals_each_sample_seeded_alone(n_trials):
    points, weights = seeding_samples()
    rngs = [np.random.RandomState(i) for i in range(len(points))]
    together = kmeans_plusplus_many(points, weights, 16, rngs, n_trials=n_trials)
    for i, (p, w) in enumerate(zip(points, weights, strict=True)):
        alone_rng = np.random.RandomState(i)
        alone = kmeans_plusplus(p, w, 16, alone_rng, n_trials=n_trials)
        assert_array_equal(together[i], alone)
        assert together[i].shape == (min(16, p.shape[0]),)
        # Each generator is left where seeding alone leaves it.
        assert rngs[i].randint(2**31) == alone_rng.randint(2**31)


@pytest.mark.parametrize("n_trials", [1, 14])
def test_one_feature_seeding_equals_seeding_with_a_zero_feature_added(n_trials):
    # One feature takes a broadcast product instead of np.matmul; a zero
    # column adds exact zeros to the general path's products and norms.
    rng = np.random.RandomState(3)
    points = rng.normal(size=(400, 1)) * rng.uniform(0.1, 10.0)
    weights = rng.uniform(0.5, 2.0, size=400)
    padded = np.hstack([points, np.zeros_like(points)])
    one = kmeans_plusplus(
        points, weights, 32, np.random.RandomState(0), n_trials=n_trials
    )
    two = kmeans_plusplus(
        padded, weights, 32, np.random.RandomState(0), n_trials=n_trials
    )
    assert_array_equal(one, two)
    assert np.unique(one).size == 32


def test_fit_many_equals_each_sample_fitted_alone():
    points, weights = seeding_samples(seed=1)
    trainer = StageTrainer(8, progressive_steps=1, step_iterations=5)
    fits = trainer.fit_many(
        points, weights, [np.random.RandomState(i) for i in range(len(points))]
    )
    for i, (p, w) in enumerate(zip(points, weights, strict=True)):
        alone = trainer.fit(p, w, np.random.RandomState(i))
        assert_array_equal(fits[i].codes, alone.codes)
        assert fits[i].n_iter == alone.n_iter
