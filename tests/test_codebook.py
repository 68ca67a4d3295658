"""Behaviour of VQCodebookTransformer, checked against independent computations."""

import pickle
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn.datasets import load_digits, make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler

from skvq import VQCodebookTransformer
from skvq._kernels import ema_update


def reference_assign(X, codebook):
    """Nearest code of each row by an explicit per-row loop in float64."""
    X, codebook = np.asarray(X, np.float64), np.asarray(codebook, np.float64)
    labels = []
    for x in X:
        dist = [float(np.sum((x - c) ** 2)) for c in codebook]
        labels.append(int(np.argmin(dist)))
    return np.array(labels)


def reference_ema_step(counts, sums, codebook, X, w, momentum):
    """The EMA rule written out code by code; unused codes keep their vector."""
    labels = reference_assign(X, codebook)
    counts, sums, codebook = counts.copy(), sums.copy(), codebook.astype(np.float64)
    for k in range(codebook.shape[0]):
        members = labels == k
        batch_count = float(np.sum(w[members]))
        batch_sum = np.sum(
            w[members, None] * np.asarray(X, np.float64)[members], axis=0
        )
        counts[k] = momentum * counts[k] + (1 - momentum) * batch_count
        sums[k] = momentum * sums[k] + (1 - momentum) * batch_sum
        if batch_count > 0:
            codebook[k] = sums[k] / counts[k]
    return counts, sums, codebook, labels


def blobs(n=300, n_features=4, centers=5, seed=0, dtype=np.float64):
    X, _ = make_blobs(n, n_features=n_features, centers=centers, random_state=seed)
    return X.astype(dtype)


# --------------------------------------------------------------- EMA rule
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("weighted", [False, True])
def test_partial_fit_follows_ema_rule_step_by_step(dtype, momentum, weighted):
    rng = np.random.RandomState(0)
    X = blobs(400, dtype=dtype)
    init = X[:6].astype(np.float64) + 0.5
    vq = VQCodebookTransformer(
        n_codes=6,
        ema_momentum=momentum,
        init=init,
        dead_code_threshold=0,
        relocate=False,
    )
    counts, sums, codebook = np.ones(6), init.astype(dtype).astype(np.float64), init
    codebook = codebook.astype(dtype).astype(np.float64)
    for batch in np.array_split(np.arange(400), 5):
        w = rng.uniform(0, 3, size=batch.size) if weighted else np.ones(batch.size)
        counts, sums, codebook, _ = reference_ema_step(
            counts, sums, codebook, X[batch], w, momentum
        )
        vq.partial_fit(X[batch], sample_weight=w if weighted else None)
        assert vq.codebook_.dtype == dtype
        assert vq.ema_counts_.dtype == vq.ema_sum_.dtype == np.float64
        rtol = 1e-6 if dtype == np.float32 else 1e-12
        # counts of idle codes are floored far below any weight (1e-150)
        assert_allclose(vq.ema_counts_, counts, rtol=1e-12, atol=1e-150)
        assert_allclose(vq.ema_sum_, sums, rtol=rtol, atol=1e-12)
        assert_allclose(vq.codebook_, codebook.astype(dtype), rtol=rtol)
    assert vq.n_steps_ == 5
    ratio = vq.ema_sum_ / vq.ema_counts_[:, None]
    if dtype == np.float32:
        assert_array_equal(vq.codebook_, ratio.astype(dtype))
    else:
        assert_allclose(vq.codebook_, ratio, rtol=2 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("n_won", [1, 3])  # a minority, a majority of 4 codes
@pytest.mark.parametrize("order", ["C", "F"])
def test_ema_step_keeps_idle_codes_and_the_layout_of_the_batch_sums(n_won, order):
    # Large enough (80,000 values) for the step that keeps the sums' layout.
    rng = np.random.RandomState(0)
    codebook = rng.normal(size=(4, 20_000))
    counts = rng.uniform(1, 2, size=4)
    sums = counts[:, None] * codebook
    batch_counts = np.zeros(4)
    batch_counts[:n_won] = rng.uniform(1, 3, size=n_won)
    batch_sums = np.zeros((4, 20_000), order=order)
    batch_sums[:n_won] = rng.normal(size=(n_won, 20_000))
    new_counts, new_sums, new_codes = ema_update(
        counts, sums, codebook, batch_counts, batch_sums, 0.9
    )
    expected = (0.9 * sums + 0.1 * batch_sums) / (0.9 * counts + 0.1 * batch_counts)[
        :, None
    ]
    assert_allclose(new_codes[:n_won], expected[:n_won], rtol=1e-13, atol=1e-15)
    assert_array_equal(new_codes[n_won:], codebook[n_won:])
    layout = "F_CONTIGUOUS" if order == "F" else "C_CONTIGUOUS"
    assert new_codes.flags[layout] and new_sums.flags[layout]


def test_unused_code_keeps_its_vector_at_momentum_zero():
    X = np.array([[0.0, 0.0], [0.2, 0.0]])
    init = np.array([[0.1, 0.0], [9.0, 9.0]])
    vq = VQCodebookTransformer(
        n_codes=2, ema_momentum=0.0, init=init, dead_code_threshold=0
    ).partial_fit(X)
    assert_array_equal(vq.codebook_[1], init[1])
    assert_allclose(vq.codebook_[0], [0.1, 0.0])
    assert np.all(np.isfinite(vq.codebook_))


def test_first_partial_fit_initialises_then_applies_one_step():
    X = blobs(200)
    init = X[:5] + 1.0
    vq = VQCodebookTransformer(
        n_codes=5, ema_momentum=0.9, init=init, dead_code_threshold=0
    ).partial_fit(X)
    counts, sums, codebook, _ = reference_ema_step(
        np.ones(5), init.copy(), init, X, np.ones(200), 0.9
    )
    assert vq.n_steps_ == 1
    assert_allclose(vq.codebook_, codebook, rtol=1e-12)
    assert_allclose(vq.ema_counts_, counts, rtol=1e-12)


def test_fit_with_one_step_at_momentum_zero_equals_first_partial_fit():
    X = blobs(200)
    params = dict(n_codes=8, ema_momentum=0.0, random_state=3)
    one_step = VQCodebookTransformer(**params).partial_fit(X)
    one_fit_step = VQCodebookTransformer(max_iter=1, **params).fit(X)
    assert_array_equal(one_step.codebook_, one_fit_step.codebook_)
    assert_array_equal(one_step.ema_counts_, one_fit_step.ema_counts_)
    assert one_step.n_steps_ == one_fit_step.n_steps_ == 1


def reference_lloyd(X, codebook, n_iter):
    """Lloyd's algorithm written out: assign, then move each code to its mean."""
    codebook = codebook.astype(np.float64)
    for _ in range(n_iter):
        labels = reference_assign(X, codebook)
        for k in range(codebook.shape[0]):
            if np.any(labels == k):
                codebook[k] = X[labels == k].mean(axis=0)
    return codebook


@pytest.mark.parametrize("momentum", [0.0, 0.99])
@pytest.mark.parametrize("max_iter", [1, 4])
def test_fit_on_one_batch_is_lloyds_algorithm(momentum, max_iter):
    # With batch_size >= n_samples and early stopping off, every step of fit
    # is a full step at momentum 0: exactly a Lloyd iteration.
    X = blobs(150, centers=4, seed=2)
    init = X[[0, 1, 2, 3, 4]] + 0.25
    vq = VQCodebookTransformer(
        n_codes=5,
        ema_momentum=momentum,
        init=init,
        max_iter=max_iter,
        tol=0,
        max_no_improvement=None,
        dead_code_threshold=0,
    ).fit(X)
    assert vq.n_iter_ == vq.n_steps_ == max_iter
    assert_allclose(vq.codebook_, reference_lloyd(X, init, max_iter), rtol=1e-12)


def test_fit_leaves_the_state_of_a_stream_of_batch_size_rows():
    X = blobs(3000, seed=4)
    vq = VQCodebookTransformer(
        n_codes=6, batch_size=500, tol=1e-12, random_state=0
    ).fit(X)
    # Counts are in units of weight per batch_size rows, and the code book
    # is the ratio of the EMA sums to the counts.
    assert vq.ema_counts_.sum() == pytest.approx(500)
    assert_allclose(vq.codebook_, vq.ema_sum_ / vq.ema_counts_[:, None], rtol=1e-12)
    labels = reference_assign(X, vq.codebook_)
    assert_allclose(vq.ema_counts_, np.bincount(labels, minlength=6) * 500 / 3000)


def test_fit_runs_its_stages_on_doubling_prefixes():
    from skvq._sources import stage_sizes

    first = 32 * 100  # 32 batches, or 3 * n_codes rows if more
    assert stage_sizes(50_000, 100, 4) == [
        first,
        2 * first,
        4 * first,
        8 * first,
        50_000,
    ]
    assert stage_sizes(100, 100, 4) == [100]
    assert stage_sizes(4000, 5000, 4) == [4000]


def test_max_iter_caps_the_steps_of_all_stages():
    X = blobs(5000, seed=5)
    vq = VQCodebookTransformer(
        n_codes=8, batch_size=100, max_iter=3, random_state=0
    ).fit(X)
    assert vq.n_iter_ == vq.n_steps_ == 3


def test_fit_reaches_kmeans_quality_on_overlapping_blobs():
    from sklearn.cluster import KMeans

    X = blobs(6000, n_features=8, centers=40, seed=6)
    vq = VQCodebookTransformer(n_codes=48, batch_size=256, random_state=0).fit(X)
    km = KMeans(n_clusters=48, n_init=1, random_state=0).fit(X)
    assert -vq.score(X) <= 1.01 * km.inertia_ / X.shape[0]


def test_fit_stops_when_the_assignments_no_longer_change():
    X = blobs(300, centers=3)
    vq = VQCodebookTransformer(
        n_codes=3, max_iter=100, max_no_improvement=None, random_state=0
    ).fit(X)
    # Lloyd converges in a few steps; the last one moves no code.
    assert vq.n_iter_ < 20
    again = VQCodebookTransformer(
        n_codes=3,
        max_iter=vq.n_iter_ + 5,
        tol=0,
        max_no_improvement=None,
        random_state=0,
    ).fit(X)
    assert_array_equal(again.codebook_, vq.codebook_)


def test_fit_stops_early_when_loss_stops_improving():
    X = blobs(300, centers=3)
    vq = VQCodebookTransformer(
        n_codes=3, max_iter=100, tol=0, max_no_improvement=3, random_state=0
    ).fit(X)
    # Converged Lloyd steps bring no improvement: 3 more, then stop.
    assert vq.n_iter_ < 20


def test_fit_stops_early_by_tol():
    X = blobs(3000, centers=30, seed=3)
    loose = VQCodebookTransformer(
        n_codes=30, tol=1e-2, max_no_improvement=None, random_state=0
    ).fit(X)
    tight = VQCodebookTransformer(
        n_codes=30, tol=1e-8, max_no_improvement=None, random_state=0
    ).fit(X)
    assert loose.n_iter_ < tight.n_iter_


def test_fit_discards_previous_state():
    X1, X2 = blobs(200, seed=1), blobs(200, seed=2) + 50
    fresh = VQCodebookTransformer(n_codes=4, random_state=0).fit(X2)
    reused = VQCodebookTransformer(n_codes=4, random_state=0).fit(X1).fit(X2)
    assert_array_equal(reused.codebook_, fresh.codebook_)
    assert reused.n_steps_ == fresh.n_steps_


def test_commitment_loss_is_beta_times_mean_sq_distance_before_the_update():
    rng = np.random.RandomState(1)
    X = blobs(150)
    w = rng.uniform(0.5, 2.0, size=150)
    init = X[:4] + 0.3
    vq = VQCodebookTransformer(n_codes=4, commitment_weight=0.7, init=init)
    vq.partial_fit(X, sample_weight=w)
    labels = reference_assign(X, init)
    sq = np.sum((X - init[labels]) ** 2, axis=1)
    assert vq.commitment_loss_ == pytest.approx(0.7 * np.sum(w * sq) / np.sum(w))


def test_score_is_minus_weighted_mean_sq_distance_to_nearest_code():
    X = blobs(200)
    w = np.random.RandomState(0).uniform(0, 1, 200)
    vq = VQCodebookTransformer(n_codes=6, random_state=0).fit(X)
    labels = reference_assign(X, vq.codebook_)
    sq = np.sum((X - vq.codebook_[labels]) ** 2, axis=1)
    assert vq.score(X, sample_weight=w) == pytest.approx(-np.sum(w * sq) / np.sum(w))
    assert vq.score(X) == pytest.approx(-np.mean(sq))


# ---------------------------------------------------------- invariances
def test_fit_depends_only_on_the_weighted_empirical_distribution():
    rng = np.random.RandomState(0)
    X = blobs(60, n_features=3)
    counts = rng.randint(0, 4, size=60)
    params = dict(n_codes=8, random_state=7)
    weighted = VQCodebookTransformer(**params).fit(X, sample_weight=counts)
    repeated = VQCodebookTransformer(**params).fit(np.repeat(X, counts, axis=0))
    perm = rng.permutation(60)
    shuffled = VQCodebookTransformer(**params).fit(X[perm], sample_weight=counts[perm])
    kept = counts > 0
    trimmed = VQCodebookTransformer(**params).fit(X[kept], sample_weight=counts[kept])
    for other in (repeated, shuffled, trimmed):
        assert_allclose(other.codebook_, weighted.codebook_, rtol=1e-10)
        assert_array_equal(other.predict(X), weighted.predict(X))


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_too_few_rows_warns_at_the_users_call(method):
    vq = VQCodebookTransformer(n_codes=8, random_state=0)
    with pytest.warns(UserWarning, match="Only 1 distinct samples") as record:
        getattr(vq, method)(np.ones((50, 4)))
    assert all(w.filename == __file__ for w in record)


def test_fewer_samples_than_codes_fills_the_code_book_from_the_data():
    X = blobs(10)
    with pytest.warns(UserWarning, match="Only 10 distinct samples"):
        vq = VQCodebookTransformer(n_codes=256, random_state=0).partial_fit(X)
    # every code is one of the rows, and every row is a code
    init_rows = {tuple(r) for r in X}
    assert vq.codebook_.shape == (256, 4)
    assert {tuple(c) for c in vq.codebook_} == init_rows
    # each sample maps to the lowest-indexed code equal to it, whatever the batch
    codes = vq.predict(X)
    for x, k in zip(X, codes, strict=True):
        equal = np.flatnonzero(np.all(vq.codebook_ == x, axis=1))
        assert k == equal.min()
    assert_array_equal(np.concatenate([vq.predict(X[:3]), vq.predict(X[3:])]), codes)
    assert_array_equal(vq.predict(X[::-1]), codes[::-1])


# ---------------------------------------------------------- encodings
@pytest.mark.parametrize("encode", ["index", "onehot", "onehot-dense", "distance"])
def test_inverse_transform_decodes_every_encoding_to_the_nearest_code(encode):
    X = blobs(120)
    vq = VQCodebookTransformer(n_codes=7, encode=encode, random_state=0).fit(X)
    expected = vq.codebook_[reference_assign(X, vq.codebook_)]
    assert_array_equal(vq.inverse_transform(vq.transform(X)), expected)


def test_transform_encodings_agree_with_predict():
    X = blobs(90)
    vq = VQCodebookTransformer(n_codes=5, random_state=0).fit(X)
    codes = vq.predict(X)
    assert codes.dtype == np.int64 and codes.shape == (90,)
    assert_array_equal(codes, reference_assign(X, vq.codebook_))
    assert_array_equal(vq.transform(X), codes[:, None])
    onehot = vq.set_params(encode="onehot").transform(X)
    assert sparse.issparse(onehot) and onehot.format == "csr"
    assert_array_equal(onehot.toarray(), np.eye(5)[codes])
    dense = vq.set_params(encode="onehot-dense").transform(X)
    assert isinstance(dense, np.ndarray)
    assert_array_equal(dense, np.eye(5)[codes])
    dist = vq.set_params(encode="distance").transform(X)
    expected = np.linalg.norm(X[:, None, :] - vq.codebook_[None], axis=2)
    assert_allclose(dist, expected, rtol=1e-9, atol=1e-9)


def test_distance_and_onehot_outputs_keep_float32():
    X = blobs(50, dtype=np.float32)
    vq = VQCodebookTransformer(n_codes=3, encode="distance", random_state=0).fit(X)
    assert vq.codebook_.dtype == np.float32
    assert vq.transform(X).dtype == np.float32
    assert vq.set_params(encode="onehot").transform(X).dtype == np.float32


def test_onehot_follows_sklearn_sparse_interface():
    sklearn = pytest.importorskip("sklearn")
    if "sparse_interface" not in sklearn.get_config():
        pytest.skip("scikit-learn < 1.9 has no sparse_interface setting")
    X = blobs(30)
    vq = VQCodebookTransformer(n_codes=3, encode="onehot", random_state=0).fit(X)
    with sklearn.config_context(sparse_interface="sparray"):
        assert isinstance(vq.transform(X), sparse.csr_array)
    assert isinstance(vq.transform(X), sparse.spmatrix)


@pytest.mark.parametrize(
    "encode, names",
    [
        ("index", ["vqcodebooktransformer_code"]),
        ("onehot", [f"vqcodebooktransformer_code{k}" for k in range(3)]),
        ("distance", [f"vqcodebooktransformer_distance{k}" for k in range(3)]),
    ],
)
def test_get_feature_names_out_names_each_output_column(encode, names):
    vq = VQCodebookTransformer(n_codes=3, encode=encode, random_state=0).fit(blobs(30))
    assert list(vq.get_feature_names_out()) == names


@pytest.mark.parametrize(
    "encode, bad, match",
    [
        ("index", [[0], [3]], r"\[0, n_codes=3\)"),
        ("index", [[-1]], r"\[0, n_codes=3\)"),
        ("index", [[0.5]], "must be integers"),
        ("index", [[0, 1]], "shape"),
        ("onehot-dense", [[1, 1, 0]], "exactly one entry"),
        ("onehot-dense", [[0, 2, 0]], "exactly one entry"),
        ("onehot-dense", [[1, 0]], "3 columns|n_codes=3"),
        ("onehot", sparse.csr_matrix([[0, 0, 0]]), "exactly one entry"),
        ("distance", [[1.0, 2.0]], "n_codes=3"),
    ],
)
def test_inverse_transform_rejects_invalid_codes(encode, bad, match):
    vq = VQCodebookTransformer(n_codes=3, encode=encode, random_state=0).fit(blobs(30))
    with pytest.raises(ValueError, match=match):
        vq.inverse_transform(bad)


def test_inverse_transform_accepts_integral_floats_and_1d_codes():
    vq = VQCodebookTransformer(n_codes=3, random_state=0).fit(blobs(30))
    assert_array_equal(vq.inverse_transform([2.0, 0.0]), vq.codebook_[[2, 0]])
    assert_array_equal(vq.inverse_transform([[1], [2]]), vq.codebook_[[1, 2]])


# ---------------------------------------------------------- search backends
@pytest.mark.parametrize("n_features", [2, 3, 16])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backends_return_the_exact_nearest_code(n_features, dtype):
    rng = np.random.RandomState(n_features)
    X = rng.normal(size=(2000, n_features)).astype(dtype)
    init = rng.normal(size=(40, n_features))
    results = []
    for algorithm in ("kd_tree", "brute"):
        vq = VQCodebookTransformer(n_codes=40, init=init, algorithm=algorithm)
        vq.partial_fit(X[:100])
        results.append(vq.predict(X))
    assert_array_equal(results[0], results[1])
    assert_array_equal(results[0], reference_assign(X, vq.codebook_))


@pytest.mark.parametrize("algorithm", ["kd_tree", "brute"])
def test_ties_go_to_the_lowest_index(algorithm):
    init = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    vq = VQCodebookTransformer(n_codes=4, init=init, algorithm=algorithm)
    vq.partial_fit(init)
    assert_array_equal(vq.predict([[0.0, 0.0], [0.0, 5.0], [-3.0, 0.0]]), [0, 2, 1])


def test_float32_far_from_origin_gets_its_true_nearest_code():
    # values around 1e4 with unit spread: the plain expansion ||x||^2 - 2x.e
    # + ||e||^2 loses the answer to cancellation in float32
    rng = np.random.RandomState(0)
    codes = (1e4 + rng.normal(size=(64, 8))).astype(np.float32)
    X = (1e4 + rng.normal(size=(5000, 8))).astype(np.float32)
    vq = VQCodebookTransformer(n_codes=64, init=codes, algorithm="brute")
    vq.partial_fit(codes)
    assert_array_equal(vq.predict(X), reference_assign(X, vq.codebook_))


@pytest.mark.parametrize("algorithm", ["kd_tree", "brute"])
def test_near_ties_below_float32_resolution_are_resolved_exactly(algorithm):
    # Codes 0 and 1 differ only in feature 0; a third, distant code makes the
    # centred products large, so float32 rounding (~1e-2 here) swamps the gap
    # 4 * |delta| between codes 0 and 1.  Only an exact check gets them right.
    n_features = 16
    codes = np.zeros((3, n_features), dtype=np.float32)
    codes[0, 0], codes[1, 0] = 1.0, -1.0
    codes[2, 1:] = 300.0
    rng = np.random.RandomState(0)
    X = np.zeros((4000, n_features), dtype=np.float32)
    X[:, 0] = rng.choice([-1, 1], 4000) * rng.uniform(1e-4, 1e-2, 4000)
    X[:, 1:] = rng.uniform(-1.0, 1.0, size=(4000, n_features - 1))
    vq = VQCodebookTransformer(n_codes=3, init=codes, algorithm=algorithm)
    vq.partial_fit(codes)
    assert_array_equal(vq.predict(X), reference_assign(X, vq.codebook_))


# ---------------------------------------------------------- robustness
def test_partial_fit_rejects_another_feature_count_and_keeps_state():
    vq = VQCodebookTransformer(n_codes=4, random_state=0).partial_fit(blobs(50))
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match="X has 5 features"):
        vq.partial_fit(blobs(50, n_features=5))
    assert pickle.dumps(vq) == before


def test_failed_fit_leaves_a_fitted_estimator_unchanged():
    vq = VQCodebookTransformer(n_codes=4, random_state=0).fit(blobs(50))
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match="sample_weight"):
        vq.fit(blobs(60, n_features=6), sample_weight=-np.ones(60))
    assert pickle.dumps(vq) == before
    assert vq.n_features_in_ == 4


def test_init_array_of_wrong_shape_is_rejected():
    vq = VQCodebookTransformer(n_codes=3, init=np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"init array has shape \(4, 4\).*\(3, 4\)"):
        vq.fit(blobs(30))


def test_transform_does_not_change_the_estimator():
    vq = VQCodebookTransformer(n_codes=5, random_state=0).fit(blobs(100))
    before = pickle.dumps(vq)
    for encode in ("index", "onehot", "onehot-dense", "distance"):
        vq.set_params(encode=encode).transform(blobs(40, seed=3))
    vq.set_params(encode="index")
    assert pickle.dumps(vq) == before


def test_pickle_leaves_out_the_search_index_and_rebuilds_it():
    vq = VQCodebookTransformer(n_codes=5, algorithm="kd_tree", random_state=0)
    vq.fit(blobs(100, n_features=2))
    vq.predict(blobs(30, n_features=2))  # builds the k-d tree
    state = vq.__getstate__()
    assert all(
        isinstance(v, (np.ndarray, int, float, str))
        for v in state["_states"][0].values()
    )
    loaded = pickle.loads(pickle.dumps(vq))
    assert_array_equal(
        loaded.predict(blobs(30, n_features=2)), vq.predict(blobs(30, n_features=2))
    )


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize("working_memory", [1, 1024])
def test_results_do_not_depend_on_threads_or_working_memory(n_jobs, working_memory):
    import sklearn

    X = blobs(3000, n_features=8, centers=12, dtype=np.float32)
    params = dict(
        n_codes=16, algorithm="brute", random_state=0, batch_size=500, max_iter=3
    )
    reference = VQCodebookTransformer(**params).fit(X)
    with sklearn.config_context(working_memory=working_memory):
        vq = VQCodebookTransformer(n_jobs=n_jobs, **params).fit(X)
        assert_array_equal(vq.codebook_, reference.codebook_)
        assert_array_equal(vq.predict(X), reference.predict(X))


# ---------------------------------------------------------- in pipelines
def test_onehot_codes_feed_a_linear_model_in_a_pipeline():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    pipe = make_pipeline(
        MinMaxScaler(),
        VQCodebookTransformer(n_codes=128, encode="onehot", random_state=0),
        LogisticRegression(max_iter=1000),
    )
    accuracy = pipe.fit(X_train, y_train).score(X_test, y_test)
    assert accuracy > 0.9


def test_grid_search_prefers_more_codes_by_score():
    X = blobs(300, centers=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        search = GridSearchCV(
            VQCodebookTransformer(random_state=0, max_iter=20),
            {"n_codes": [1, 2, 8]},
            cv=3,
        ).fit(X)
    assert search.best_params_ == {"n_codes": 8}
    scores = search.cv_results_["mean_test_score"]
    assert scores[0] < scores[1] < scores[2] <= 0


@pytest.mark.parametrize(
    "n_features, n_codes, expected",
    [
        (2, 1023, False),
        (2, 1024, True),
        (12, 1024, True),
        (13, 1024, False),
        (13, 4096, True),
        (16, 4096, True),
        (17, 100_000, False),
    ],
)
def test_auto_rule_follows_the_documented_thresholds(n_features, n_codes, expected):
    from skvq._search import kd_tree_pays_off

    assert kd_tree_pays_off(n_features, n_codes) is expected


def test_small_code_book_search_keeps_to_working_memory():
    import tracemalloc

    import sklearn

    # 32 codes: scores laid out code by code, with an indicator of the
    # minima as large as them; the blocks must count it.
    X = blobs(400_000, n_features=8, dtype=np.float32)
    vq = VQCodebookTransformer(n_codes=32, algorithm="brute", random_state=0)
    vq.partial_fit(X[:2000])
    with sklearn.config_context(working_memory=1):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            labels = vq.predict(X)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert peak - labels.nbytes < 1.5 * 2**20


def test_predict_never_materialises_the_full_distance_matrix():
    import tracemalloc

    import sklearn

    X = blobs(40_000, n_features=8, dtype=np.float32)
    vq = VQCodebookTransformer(n_codes=1024, algorithm="brute", random_state=0)
    vq.partial_fit(X[:2000])
    full = X.shape[0] * 1024 * 4
    with sklearn.config_context(working_memory=1):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            vq.predict(X)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert peak < 0.1 * full
