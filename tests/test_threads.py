"""Threads: the default thread count, BLAS limits, concurrent calls, bounds."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import make_blobs
from threadpoolctl import threadpool_info, threadpool_limits

import skvq._threads as threads
from skvq import VQCodebookTransformer
from skvq._kernels import LloydBounds
from skvq._rows import canonical_sample
from skvq._search import CodebookIndex


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def data(n=20_000, n_features=8, seed=0):
    X, _ = make_blobs(n, n_features=n_features, centers=20, random_state=seed)
    return X.astype(np.float32)


def test_default_threads_follow_threadpool_limits():
    with threadpool_limits(limits=1, user_api="blas"):
        assert threads.n_threads(None) == 1
    with threadpool_limits(limits=2, user_api="blas"):
        assert threads.n_threads(None) == min(2, threads.n_cores())
    assert threads.n_threads(None) == min([threads.n_cores(), *blas_threads()])


def test_one_blas_thread_keeps_skvq_in_the_calling_thread(monkeypatch):
    X = data()
    vq = VQCodebookTransformer(n_codes=64, algorithm="brute", random_state=0)
    vq.fit(X[:2000])
    expected = vq.predict(X)

    def no_pool(n_threads):
        raise AssertionError("the thread pool was used under a limit of 1")

    monkeypatch.setattr(threads, "thread_pool", no_pool)
    with threadpool_limits(limits=1):
        assert_array_equal(vq.predict(X), expected)


def test_concurrent_predicts_agree_and_leave_blas_settings_alone():
    X = data(60_000)
    vq = VQCodebookTransformer(
        n_codes=128, algorithm="brute", n_jobs=-1, random_state=0
    ).fit(X[:5000])
    expected = vq.predict(X)
    before = blas_threads()
    start = threading.Barrier(8)

    def call(_):
        start.wait()
        return vq.predict(X)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    for codes in results:
        assert_array_equal(codes, expected)
    assert blas_threads() == before


def test_concurrent_fits_give_the_codebooks_of_sequential_fits():
    X = data(40_000)
    params = dict(n_codes=32, batch_size=512, random_state=0)
    expected = VQCodebookTransformer(**params).fit(X).codebook_
    before = blas_threads()
    with ThreadPoolExecutor(4) as pool:
        fits = list(
            pool.map(lambda _: VQCodebookTransformer(**params).fit(X), range(4))
        )
    for vq in fits:
        assert_array_equal(vq.codebook_, expected)
    assert blas_threads() == before


def test_the_blas_hold_is_released_when_a_search_fails(monkeypatch):
    X = data(60_000)
    vq = VQCodebookTransformer(n_codes=64, algorithm="brute", n_jobs=2)
    vq.fit(X[:3000])
    before = blas_threads()

    def broken(self, X, prep):
        raise RuntimeError("boom")

    monkeypatch.setattr(CodebookIndex, "_brute_block", broken)
    with pytest.raises(RuntimeError, match="boom"):
        vq.predict(X)
    assert blas_threads() == before


@pytest.mark.parametrize("n_jobs", [1, 2, None])
def test_fit_does_not_depend_on_the_thread_count(n_jobs):
    X = data(50_000)
    params = dict(n_codes=40, batch_size=256, random_state=0)
    reference = VQCodebookTransformer(n_jobs=1, **params).fit(X)
    vq = VQCodebookTransformer(n_jobs=n_jobs, **params).fit(X)
    assert_array_equal(vq.codebook_, reference.codebook_)
    assert_array_equal(vq.ema_counts_, reference.ema_counts_)


def test_statistics_in_many_chunks_do_not_depend_on_the_threads(monkeypatch):
    import skvq._kernels as kernels

    # Chunks of 2**12 rows: 50,000 rows of 3 features make 13 of them.
    monkeypatch.setattr(kernels, "_STATISTICS_CHUNK_VALUES", 2**12)
    monkeypatch.setattr(kernels, "_STATISTICS_CHUNK_ROWS", 2**12)
    assert kernels.statistics_chunk(3) == 2**12
    X = data(50_000, n_features=3)
    rng = np.random.RandomState(0)
    labels, w = rng.randint(7, size=50_000), rng.uniform(0.5, 2.0, size=50_000)
    one = kernels.code_statistics(X, labels, w, 7, n_jobs=1)
    two = kernels.code_statistics(X, labels, w, 7, n_jobs=2)
    assert_array_equal(one[0], two[0])
    assert_array_equal(one[1], two[1])
    expected = np.zeros((7, 3))
    np.add.at(expected, labels, w[:, None] * X.astype(np.float64))
    np.testing.assert_allclose(one[1], expected, rtol=1e-12)


@pytest.mark.parametrize("reused_rows", [2**14, 100])
def test_statistics_of_batches_of_one_shape_are_their_own(monkeypatch, reused_rows):
    # The assignment matrix of a small batch's shape is reused (of a large
    # one, its index buffer): each call must see only its own labels and
    # weights, in the calling thread and in others.
    import skvq._kernels as kernels

    monkeypatch.setattr(kernels, "_REUSED_ASSIGNMENT_ROWS", reused_rows)

    rng = np.random.RandomState(0)
    batches = [
        (
            rng.normal(size=(300, 4)).astype(np.float32),
            rng.randint(5, size=300),
            rng.uniform(0.5, 2.0, size=300),
        )
        for _ in range(4)
    ]
    batches[2][1][:] = 0  # codes 1-4 get no row at all

    def expected(X, labels, w):
        sums = np.zeros((5, 4))
        np.add.at(sums, labels, w[:, None] * X.astype(np.float64))
        return sums

    for X, labels, w in batches:
        _, sums = kernels.code_statistics(X, labels, w, 5, n_jobs=1)
        np.testing.assert_allclose(sums, expected(X, labels, w), rtol=1e-12)
    with ThreadPoolExecutor(4) as pool:
        found = list(
            pool.map(lambda b: kernels.code_statistics(*b, 5, n_jobs=1)[1], batches)
        )
    for sums, (X, labels, w) in zip(found, batches, strict=True):
        np.testing.assert_allclose(sums, expected(X, labels, w), rtol=1e-12)


# ----------------------------------------------------------- Lloyd bounds
def assign_as_a_full_search(bounds, codes, X):
    """Assign ``X`` to ``codes`` through ``bounds``, check the labels and
    distances against a full search, and return the labels."""
    index = CodebookIndex(codes, "brute")
    labels, sq_dist = bounds.assign(index, X)
    full, full_sq = index.nearest(X, return_sq_dist=True)
    assert_array_equal(labels, full)
    assert_array_equal(sq_dist, full_sq)
    return labels


def bounded_rows(dtype, rng):
    """5,000 rows of 5 features, 30 codes drawn from them, fresh bounds."""
    X = data(5000, n_features=5).astype(dtype)
    codes = X[rng.choice(5000, 30, replace=False)].astype(dtype)
    return X, codes, LloydBounds(5, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lloyd_bounds_give_the_labels_of_a_full_search(dtype):
    rng = np.random.RandomState(0)
    X, codes, bounds = bounded_rows(dtype, rng)
    n_searched = []
    for step in range(8):
        assign_as_a_full_search(bounds, codes, X)
        if step:
            n_searched.append(bounds.last_searched)
        # Small moves (the tail of Lloyd's algorithm), and now and then a
        # large one (a re-seeded code), after which every row is unsure.
        moved = codes + rng.normal(scale=1e-3, size=codes.shape).astype(dtype)
        if step == 4:
            moved[0] += 5.0
        codes = moved
    assert max(n_searched[:3]) < 0.1 * X.shape[0]
    assert n_searched[4] > 0.5 * X.shape[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lloyd_bounds_follow_codes_that_jump_across_the_rows(dtype):
    # A relocation: code 3 jumps onto rows that others serve, code 7 onto
    # code 3's old place (its rows go to 7), the others move a little.
    rng = np.random.RandomState(1)
    X, codes, bounds = bounded_rows(dtype, rng)
    bounds.assign(CodebookIndex(codes, "brute"), X)
    moved = codes + rng.normal(scale=1e-3, size=codes.shape).astype(dtype)
    moved[3], moved[7] = X[10], codes[3]
    for step in range(3):
        labels = assign_as_a_full_search(bounds, moved, X)
        if step == 0:
            assert np.isin(labels, [3, 7]).any()
        moved = moved + rng.normal(scale=1e-3, size=codes.shape).astype(dtype)


def test_lloyd_bounds_remember_a_code_that_jumped_next_to_a_row():
    # Code 3 jumps to just beyond row 0, mirrored through it from the row's
    # own code; a step later it moves 0.02 closer and takes the row, while
    # the others move a little.
    X, codes, bounds = bounded_rows(np.float64, np.random.RandomState(1))
    labels, _ = bounds.assign(CodebookIndex(codes, "brute"), X)
    own = codes[labels[0]]
    away = (X[0] - own) / np.linalg.norm(X[0] - own)
    jumped = codes.copy()
    jumped[3] = 2 * X[0] - own + 0.005 * away
    bounds.assign(CodebookIndex(jumped, "brute"), X)
    rng = np.random.RandomState(2)
    closer = jumped + rng.normal(scale=1e-3, size=jumped.shape)
    closer[3] = jumped[3] - 0.02 * away
    assert assign_as_a_full_search(bounds, closer, X)[0] == 3


def test_lloyd_bounds_search_again_after_duplicate_codes():
    X = data(2000, n_features=3)
    codes = X[:10].copy()
    codes[3] = codes[2]  # a duplicate ties with its twin: no bound
    bounds = LloydBounds(3, X.dtype)
    index = CodebookIndex(codes, "brute")
    bounds.assign(index, X)
    moved = codes + 1e-4
    labels, _ = bounds.assign(CodebookIndex(moved, "brute"), X)
    assert_array_equal(labels, CodebookIndex(moved, "brute").nearest(X)[0])


# ------------------------------------------------------- canonical order
def test_canonical_sample_merges_signed_zeros_and_duplicates():
    X = np.array([[0.0, 1.0], [-0.0, 1.0], [2.0, 3.0], [2.0, 3.0], [5.0, 5.0]])
    w = np.array([1.0, 2.0, 1.0, 1.0, 0.0])
    sample = canonical_sample(X, w)
    points, weights = sample.points, sample.weights
    order = np.lexsort(points.T[::-1])
    assert_array_equal(points[order], [[0.0, 1.0], [2.0, 3.0]])
    assert_array_equal(weights[order], [3.0, 2.0])


def test_small_projections_have_the_bits_of_the_column_loop(monkeypatch):
    import skvq._rows as rows_module

    rng = np.random.RandomState(0)
    X = rng.normal(size=(40, 64)) * 10.0 ** rng.randint(-8, 8, size=(40, 64))
    X[0] = -0.0  # an all-zero row projects to +0.0 either way
    X = np.vstack([X, X[::-1]])
    direction = rows_module._directions(64)[0]
    accumulated = rows_module.project(X, direction)
    monkeypatch.setattr(rows_module, "_ACCUMULATE_VALUES", -1)
    looped = rows_module.project(X, direction)
    assert_array_equal(accumulated.view(np.uint64), looped.view(np.uint64))
    # The same row gives the same bits wherever it sits.
    assert_array_equal(accumulated[:40], accumulated[40:][::-1])


def test_rows_are_found_among_points_by_value():
    from skvq._rows import positions_in

    points = np.array([[1.0, 2.0], [0.0, 3.0], [5.0, 5.0]], dtype=np.float32)
    rows = np.array(
        [[0.0, 3.0], [-0.0, 3.0], [9.0, 9.0], [1.0, 2.0], [5.0, 5.0], [1.0, 2.0]],
        dtype=np.float32,
    )
    assert_array_equal(positions_in(rows, points), [1, 1, -1, 0, 2, 0])
    assert_array_equal(positions_in(rows, points[:0]), [-1] * 6)


def test_rows_of_points_sharing_a_projection_are_left_unmatched(monkeypatch):
    import skvq._rows as rows_module

    # (1, 2) and (2, 1) project to the same key along (1, 1): the second
    # point's rows are not matched (rather than matched to the first).
    monkeypatch.setattr(rows_module, "_directions", lambda n: np.ones((2, n)))
    points = np.array([[1.0, 2.0], [2.0, 1.0], [0.0, 7.0]])
    rows = np.array([[2.0, 1.0], [1.0, 2.0], [0.0, 7.0]])
    position = rows_module.positions_in(rows, points)
    assert_array_equal(position[1:], [0, 2])
    assert position[0] in (-1, 1)


def test_distinct_rows_sharing_a_canonical_key_are_not_grouped(monkeypatch):
    import skvq._rows as rows_module

    X = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    # Every row gets the same key: the key alone cannot tell the rows apart.
    monkeypatch.setattr(rows_module, "project", lambda rows, d: np.zeros(len(rows)))
    assert rows_module._groups_by_key(X) is None
    _, first, inverse = rows_module.group_rows(X)
    assert_array_equal(inverse[[0, 1, 4]], np.unique(inverse))  # three groups
    assert inverse[2] == inverse[0] and inverse[3] == inverse[1]
    assert_array_equal(np.sort(first), [0, 1, 4])


def test_canonical_sample_order_ignores_row_order_and_hash_collisions(monkeypatch):
    rng = np.random.RandomState(1)
    X = rng.randint(0, 4, size=(300, 3)).astype(float)
    w = rng.uniform(size=300)
    sample = canonical_sample(X, w)
    perm = rng.permutation(300)
    permuted = canonical_sample(X[perm], w[perm])
    assert_array_equal(permuted.points, sample.points)
    np.testing.assert_allclose(permuted.weights, sample.weights)
    # Should two distinct rows share a canonical key, they are grouped by a
    # hash; should they share a hash too, exactly by np.unique; the sample
    # stays the same.
    import skvq._rows as rows_module

    monkeypatch.setattr(rows_module, "_groups_by_key", lambda rows: None)
    hashed = canonical_sample(X[perm], w[perm])
    assert_array_equal(hashed.points, sample.points)
    np.testing.assert_allclose(hashed.weights, sample.weights)

    def colliding(rows):
        _, first, inverse = np.unique(
            rows, axis=0, return_index=True, return_inverse=True
        )
        return first, inverse.reshape(-1)

    monkeypatch.setattr(rows_module, "_equal_rows", colliding)
    collided = canonical_sample(X[perm], w[perm])
    assert_array_equal(collided.points, sample.points)
    np.testing.assert_allclose(collided.weights, sample.weights)
