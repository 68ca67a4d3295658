"""Sparse input: VQCodebookTransformer on SciPy sparse rows, never densified."""

import tracemalloc

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse

from skvq import ProductVQTransformer, ResidualVQTransformer, VQCodebookTransformer
from skvq._kernels import ema_update
from skvq._search import CodebookIndex
from skvq._sources import in_memory_source
from skvq._sparse import ScatteredSums, code_sums, head

FORMATS = ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "lil_array"]


def documents(n=600, n_features=80, density=0.08, seed=0, dtype=np.float64):
    """Sparse non-negative rows in three groups, L2-normalised."""
    rng = np.random.RandomState(seed)
    X = sparse.random(
        n, n_features, density=density, format="csr", random_state=rng, dtype=dtype
    )
    group = rng.randint(3, size=n)
    boost = sparse.csr_matrix(
        (np.full(n, 2.0, dtype=dtype), (np.arange(n), group)), shape=X.shape
    )
    X = (X + boost).tocsr()
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    return sparse.diags(1.0 / norms).dot(X).astype(dtype).tocsr()


def as_format(X, name):
    return getattr(sparse, name)(X)


def brute_nearest(X, codebook):
    d2 = ((X[:, None, :] - codebook[None]) ** 2).sum(axis=2)
    return d2.argmin(axis=1), d2.min(axis=1)


@pytest.mark.parametrize("name", FORMATS)
def test_predict_of_every_sparse_format_equals_a_float64_search(name):
    X = documents()
    vq = VQCodebookTransformer(n_codes=8, random_state=0).fit(X.toarray())
    labels, _ = brute_nearest(X.toarray(), vq.codebook_.astype(np.float64))
    assert_array_equal(vq.predict(as_format(X, name)), labels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_score_and_distances_of_sparse_rows_match_the_dense_rows(dtype):
    X = documents(dtype=dtype)
    vq = VQCodebookTransformer(n_codes=8, encode="distance", random_state=0)
    vq.fit(X.toarray())
    dense = X.toarray().astype(np.float64)
    _, sq = brute_nearest(dense, vq.codebook_.astype(np.float64))
    assert vq.score(X) == pytest.approx(-sq.mean(), rel=1e-6)
    assert_allclose(vq.transform(X), vq.transform(X.toarray()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encode", ["index", "onehot", "onehot-dense"])
def test_transform_of_sparse_rows_equals_that_of_the_dense_rows(encode):
    X = documents()
    vq = VQCodebookTransformer(n_codes=8, encode=encode, random_state=0).fit(X)
    sparse_out, dense_out = vq.transform(X), vq.transform(X.toarray())
    if sparse.issparse(sparse_out):
        sparse_out, dense_out = sparse_out.toarray(), dense_out.toarray()
    assert_array_equal(sparse_out, dense_out)


def test_inverse_transform_of_sparse_codes_gives_dense_code_vectors():
    X = documents()
    vq = VQCodebookTransformer(n_codes=8, encode="onehot", random_state=0).fit(X)
    decoded = vq.inverse_transform(vq.transform(X))
    assert isinstance(decoded, np.ndarray)
    assert_array_equal(decoded, vq.codebook_[vq.predict(X)])


def test_fit_on_sparse_rows_matches_the_fit_on_the_dense_rows():
    # The same stages, samples and seeds (row hashes and priorities are those
    # of the dense rows); the sums differ by rounding only.
    X = documents(n=3000)
    on_sparse = VQCodebookTransformer(n_codes=12, batch_size=64, random_state=0).fit(X)
    on_dense = VQCodebookTransformer(n_codes=12, batch_size=64, random_state=0)
    on_dense.fit(X.toarray())
    assert_allclose(on_sparse.codebook_, on_dense.codebook_, atol=1e-10)
    assert on_sparse.n_iter_ == on_dense.n_iter_


def test_fit_on_sparse_rows_reaches_the_quality_of_kmeans():
    from sklearn.cluster import KMeans

    X = documents(n=2000, seed=3)
    vq = VQCodebookTransformer(n_codes=12, random_state=0).fit(X)
    km = KMeans(n_clusters=12, n_init=1, random_state=0).fit(X)
    assert -vq.score(X) <= km.inertia_ / X.shape[0] * 1.001


@pytest.mark.parametrize(
    "n_features, density, batch, n_codes",
    [
        (80, 0.08, 200, 6),
        # Wide rows in small batches: their sums stay scattered (see below).
        (2000, 0.01, 100, 40),
    ],
)
def test_a_stream_of_sparse_batches_matches_the_stream_of_dense_batches(
    n_features, density, batch, n_codes
):
    X = documents(n=1000, n_features=n_features, density=density)
    on_sparse = VQCodebookTransformer(n_codes=n_codes, random_state=0)
    on_dense = VQCodebookTransformer(n_codes=n_codes, random_state=0)
    for start in range(0, 1000, batch):
        on_sparse.partial_fit(X[start : start + batch])
        on_dense.partial_fit(X[start : start + batch].toarray())
    assert_allclose(on_sparse.codebook_, on_dense.codebook_, atol=1e-10)
    assert_allclose(on_sparse.ema_counts_, on_dense.ema_counts_)


def test_a_sparse_stream_keeps_its_code_book_as_its_product_reads_it():
    # Sums of sparse rows come column by column and the EMA step keeps that
    # layout, so the transposed codes of the sparse product are a view,
    # not a copy of the code book a step (40 x 2,000 codes: a large book).
    X = documents(n=3000, n_features=2000, density=0.01)
    vq = VQCodebookTransformer(n_codes=40, random_state=0)
    for start in range(0, 3000, 1000):
        vq.partial_fit(X[start : start + 1000])
    assert vq.codebook_.flags.f_contiguous
    layout = CodebookIndex(vq.codebook_, "auto")._sparse_layout()
    assert np.shares_memory(layout.codes_t, vq.codebook_)


def test_a_sparse_fit_gathers_its_stages_and_trains_the_last_on_the_rows_given():
    # No copy of the rows sorted by stage: a stage's rows are gathered (the
    # dense fit's stage, rows in their original order), the last stage is
    # the caller's matrix itself.
    X = documents(n=3000)
    weights = np.ones(3000)
    kwargs = dict(n_jobs=1, batch_size=20, n_codes=6, fit=True)
    on_sparse = in_memory_source(X, weights, **kwargs).block
    on_dense = in_memory_source(X.toarray(), weights, **kwargs).block
    stage_rows = on_sparse.stage_rows
    assert len(stage_rows) > 2 and stage_rows == on_dense.stage_rows
    assert on_sparse.rows_of(0, 3000) is X
    # The first stage: the same rows in the same (original) order.
    first = on_sparse.rows_of(0, stage_rows[0])
    assert_array_equal(first.toarray(), on_dense.rows_of(0, stage_rows[0]))
    # A later stage: the same rows, in original order rather than by stage.
    second = on_sparse.rows_of(0, stage_rows[1]).toarray()
    dense = on_dense.rows_of(0, stage_rows[1])
    assert_array_equal(second[np.lexsort(second.T)], dense[np.lexsort(dense.T)])
    assert not np.array_equal(second, dense)


def test_the_first_rows_of_a_sparse_matrix_are_a_view():
    # SciPy copies slices of less than half an array given to its
    # constructor: a stage's rows would be copied at every step.
    X = documents(n=1000)
    first = head(X, 100)
    assert np.shares_memory(first.data, X.data)
    assert np.shares_memory(first.indices, X.indices)
    assert_array_equal(first.toarray(), X[:100].toarray())


def test_sums_of_few_sparse_values_stay_scattered_and_step_like_dense_sums():
    # 50 rows of 2,000 features into 30 codes: far fewer stored values than
    # cells, so the sums stay scattered, and an EMA step adds them cell by
    # cell: the same numbers as with the dense sums.
    rng = np.random.RandomState(0)
    X = documents(n=50, n_features=2000, density=0.01)
    labels = rng.randint(30, size=50)
    weights = rng.uniform(0.5, 2.0, size=50)
    scattered = code_sums(X, labels, weights, 30)
    assert isinstance(scattered, ScatteredSums)
    dense_rows = X.toarray()
    expected = np.zeros((30, 2000))
    for i in range(50):
        expected[labels[i]] += weights[i] * dense_rows[i]
    assert_allclose(np.asarray(scattered), expected, rtol=1e-14, atol=1e-300)
    codebook = rng.normal(size=(30, 2000))
    counts = rng.uniform(1.0, 2.0, size=30)
    batch_counts = np.bincount(labels, weights=weights, minlength=30)
    step = [counts, counts[:, None] * codebook, codebook, batch_counts]
    on_cells = ema_update(*step, scattered, 0.9)
    on_dense = ema_update(*step, np.asarray(scattered), 0.9)
    for a, b in zip(on_cells, on_dense, strict=True):
        assert_array_equal(a, b)


def test_sparse_fit_does_not_depend_on_the_threads():
    X = documents(n=3000)
    one = VQCodebookTransformer(n_codes=12, n_jobs=1, random_state=0).fit(X)
    two = VQCodebookTransformer(n_codes=12, n_jobs=2, random_state=0).fit(X)
    assert_array_equal(one.codebook_, two.codebook_)


def test_wide_sparse_rows_are_never_densified():
    # Dense, these rows would take 1.6 GB; fit and predict stay far below.
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(2000), 20)
    cols = rng.integers(100_000, size=rows.shape[0])
    X = sparse.csr_matrix((rng.random(rows.shape[0]), (rows, cols)), (2000, 100_000))
    tracemalloc.start()
    try:
        vq = VQCodebookTransformer(n_codes=4, random_state=0).fit(X)
        vq.partial_fit(X[:500])
        vq.predict(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150 * 2**20


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_stored_values_are_refused_like_dense_ones(bad):
    X = documents().tolil()
    X[3, 5] = bad
    vq = VQCodebookTransformer(n_codes=4, random_state=0)
    with pytest.raises(ValueError, match="NaN|infinity"):
        vq.fit(X)


def test_a_failed_sparse_call_leaves_the_fitted_estimator_unchanged():
    X = documents()
    vq = VQCodebookTransformer(n_codes=4, random_state=0).fit(X)
    before = vq.codebook_.copy()
    bad = X.tolil()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        vq.partial_fit(bad)
    assert_array_equal(vq.codebook_, before)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_multi_codebook_quantisers_refuse_sparse_input_and_say_what_to_do(Estimator):
    X = documents()
    expected = "does not accept sparse.*VQCodebookTransformer"
    with pytest.raises(TypeError, match=expected):
        Estimator(4, 2).fit(X)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_multi_codebook_queries_refuse_sparse_input(Estimator):
    X = documents()
    fitted = Estimator(4, 2, random_state=0).fit(X.toarray())
    with pytest.raises(TypeError, match="does not accept sparse"):
        fitted.transform(X)


def test_dask_arrays_of_sparse_chunks_are_refused_with_a_way_out():
    da = pytest.importorskip("dask.array")
    X = da.from_array(documents(), chunks=(200, -1), asarray=False)
    with pytest.raises(TypeError, match="sparse chunks.*SciPy sparse matrix"):
        VQCodebookTransformer(n_codes=4).fit(X)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_fit_on_sparse_rows_matches_the_dense_one(dtype):
    X = documents(n=1500, dtype=dtype)
    weights = np.random.RandomState(1).uniform(0, 3, size=X.shape[0])
    on_sparse = VQCodebookTransformer(n_codes=8, random_state=0)
    on_sparse.fit(X, sample_weight=weights)
    on_dense = VQCodebookTransformer(n_codes=8, random_state=0)
    on_dense.fit(X.toarray(), sample_weight=weights)
    assert on_sparse.codebook_.dtype == dtype
    tolerance = 1e-5 if dtype == np.float32 else 1e-10
    assert_allclose(on_sparse.codebook_, on_dense.codebook_, atol=tolerance)
