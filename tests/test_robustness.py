"""Codebook health, numerical safety, persistence and bad input."""

import io
import pickle

import joblib
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import make_blobs

from skvq import VQCodebookTransformer
from skvq._kernels import ema_update


def blobs(n=200, n_features=4, seed=0, dtype=np.float64):
    X, _ = make_blobs(n, n_features=n_features, centers=4, random_state=seed)
    return X.astype(dtype)


def fitted(**params):
    params.setdefault("n_codes", 6)
    params.setdefault("random_state", 0)
    return VQCodebookTransformer(**params).fit(blobs())


def stream(n_batches, seed=0, batch_size=128, n_features=4):
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-5, 5, size=(6, n_features))
    for t in range(n_batches):
        if t == n_batches // 2:  # the stream drifts
            centers = rng.uniform(-5, 5, size=(6, n_features))
        rows = rng.randint(6, size=batch_size)
        yield centers[rows] + rng.normal(size=(batch_size, n_features))


# ------------------------------------------------------------ reassignment
def test_dead_codes_are_reseeded_onto_batch_samples_with_fresh_statistics():
    X = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    init = np.array([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0]])
    vq = VQCodebookTransformer(
        n_codes=3, init=init, ema_momentum=0.0, dead_code_threshold=0.5, random_state=0
    ).partial_fit(X)
    # Counts after the step: 3, 0, 0 (floored), mean 1; codes 1 and 2 are
    # below 0.5 times the mean, so both are dead and restart at the mean.
    assert_array_equal(vq.dead_codes_, [False, True, True])
    assert vq.n_codes_reassigned_ == 2
    for k in (1, 2):
        assert vq.ema_counts_[k] == pytest.approx(1.0)
        assert vq.ema_distortion_[k] == 0.0
        assert_allclose(vq.ema_sum_[k], vq.codebook_[k])
    # Squared distances to the code book are 0, 100 and 400: whichever of
    # the two far samples comes first, k-means++ then must take the other.
    assert {tuple(vq.codebook_[1]), tuple(vq.codebook_[2])} == {(10, 0), (20, 0)}


def test_without_reassignment_dead_codes_stay_put():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0]])
    init = np.array([[0.0, 0.0], [50.0, 50.0]])
    vq = VQCodebookTransformer(
        n_codes=2, init=init, ema_momentum=0.0, dead_code_threshold=0, relocate=False
    ).partial_fit(X)
    assert_array_equal(vq.codebook_[1], init[1])
    assert vq.n_codes_reassigned_ == 0 and not vq.dead_codes_.any()


def test_reassignment_depends_only_on_the_weighted_distribution():
    rng = np.random.RandomState(0)
    X = blobs(40, n_features=3)
    counts = rng.randint(0, 4, size=40)
    # six codes far from the data win nothing, die and are re-seeded
    init = np.vstack([X[:6], np.full((6, 3), 100.0) + np.arange(6)[:, None]])
    params = dict(
        n_codes=12, init=init, ema_momentum=0.0, dead_code_threshold=0.5, random_state=3
    )
    weighted = VQCodebookTransformer(**params).fit(X, sample_weight=counts)
    repeated = VQCodebookTransformer(**params).fit(np.repeat(X, counts, axis=0))
    assert weighted.n_codes_reassigned_ > 0
    assert weighted.n_codes_reassigned_ == repeated.n_codes_reassigned_
    assert_allclose(weighted.codebook_, repeated.codebook_, rtol=1e-10)


def test_reassignment_revives_codes_stuck_in_a_minor_cluster():
    # Every code starts in cluster A, which carries 10 % of a two-cluster
    # stream: the codes there starve, die and move to B with the default.
    def run(**params):
        rng = np.random.RandomState(0)
        a, b = np.zeros(8), np.full(8, 20.0)
        vq = VQCodebookTransformer(
            n_codes=64, init=a + rng.normal(size=(64, 8)), random_state=0, **params
        )
        lowest = np.inf
        for _ in range(300):
            centers = np.where(rng.rand(256, 1) < 0.1, a, b)
            vq.partial_fit(centers + rng.normal(size=(256, 8)))
            lowest = min(lowest, vq.perplexity_)
        to_b = np.linalg.norm(vq.codebook_ - b, axis=1) < np.linalg.norm(
            vq.codebook_ - a, axis=1
        )
        return int(to_b.sum()), lowest, vq.perplexity_

    moved_off, _, perplexity_off = run(dead_code_threshold=0, relocate=False)
    moved, _, perplexity = run()  # the defaults
    assert moved_off <= 2
    assert moved >= 16  # at least a quarter of the code book
    assert perplexity > 5 * perplexity_off


def test_perplexity_is_exp_entropy_of_ema_usage():
    vq = fitted(n_codes=8)
    p = vq.ema_counts_ / vq.ema_counts_.sum()
    assert vq.perplexity_ == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert 1.0 <= vq.perplexity_ <= 8.0


def test_verbose_reports_step_distortion_perplexity_and_reassignments(capsys):
    X = blobs()
    VQCodebookTransformer(n_codes=4, max_iter=3, tol=0, verbose=1, random_state=0).fit(
        X
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"Step 1 (stage 1, {X.shape[0]} rows): distortion ")
    assert "perplexity" in lines[0] and "codes reassigned" in lines[0]
    assert len([ln for ln in lines if ln.startswith("Step")]) == 3


# ------------------------------------------------------- numerical safety
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_idle_code_keeps_its_vector_through_count_underflow(momentum):
    # 0.99 ** 80_000 underflows float64: the naive s / n would be 0 / 0.
    n_steps = 80_000 if momentum == 0.99 else 2_000
    codebook = np.array([[1.0, 2.0], [3.0e-5, -7.0e12]])
    counts, sums = np.ones(2), codebook.copy()
    batch_counts, batch_sums = np.array([2.0, 0.0]), np.array([[2.0, 4.0], [0.0, 0.0]])
    for _ in range(n_steps):
        counts, sums, codebook = ema_update(
            counts, sums, codebook, batch_counts, batch_sums, momentum
        )
    assert np.all(np.isfinite(codebook)) and np.all(np.isfinite(sums))
    assert np.all(counts > 0)
    assert_array_equal(codebook[1], [3.0e-5, -7.0e12])
    assert_allclose(sums / counts[:, None], codebook, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_stream_never_produces_nan_or_inf(dtype):
    init = np.array([[0.0, 0.0], [100.0, 100.0]])
    vq = VQCodebookTransformer(
        n_codes=2, init=init, ema_momentum=0.5, dead_code_threshold=0
    )
    X = np.array([[0.5, 0.0]], dtype=dtype)
    for _ in range(1_200):  # 0.5 ** 1075 underflows
        vq.partial_fit(X)
    assert vq.codebook_.dtype == dtype
    assert np.all(np.isfinite(vq.codebook_)) and np.all(np.isfinite(vq.ema_sum_))
    assert_array_equal(vq.codebook_[1], [100.0, 100.0])
    assert_allclose(vq.codebook_[0], [0.5, 0.0])


# ------------------------------------------------------------ persistence
@pytest.mark.parametrize("dumper", ["pickle", "joblib"])
def test_pickling_mid_stream_continues_bit_for_bit(dumper):
    batches = list(stream(120))
    params = dict(n_codes=16, ema_momentum=0.9, dead_code_threshold=0.5, random_state=0)
    straight = VQCodebookTransformer(**params)
    for batch in batches:
        straight.partial_fit(batch)
    resumed = VQCodebookTransformer(**params)
    for batch in batches[:60]:
        resumed.partial_fit(batch)
    if dumper == "pickle":
        resumed = pickle.loads(pickle.dumps(resumed))
    else:
        buffer = io.BytesIO()
        joblib.dump(resumed, buffer)
        buffer.seek(0)
        resumed = joblib.load(buffer)
    for batch in batches[60:]:
        resumed.partial_fit(batch)
    assert straight.n_codes_reassigned_ > 0 and straight.n_codes_relocated_ > 0
    assert resumed.n_codes_reassigned_ == straight.n_codes_reassigned_
    assert resumed.n_codes_relocated_ == straight.n_codes_relocated_
    assert_array_equal(resumed.codebook_, straight.codebook_)
    assert_array_equal(resumed.ema_counts_, straight.ema_counts_)
    assert_array_equal(resumed.ema_distortion_, straight.ema_distortion_)


def test_skops_round_trip_trusts_only_skvq_and_rebuilds_the_index():
    sio = pytest.importorskip("skops.io")
    batches = list(stream(40))
    vq = VQCodebookTransformer(n_codes=8, algorithm="kd_tree", random_state=0)
    for batch in batches[:20]:
        vq.partial_fit(batch)
    data = sio.dumps(vq)
    assert sio.get_untrusted_types(data=data) == [
        "skvq._codebook.VQCodebookTransformer"
    ]
    loaded = sio.loads(data, trusted=["skvq._codebook.VQCodebookTransformer"])
    assert_array_equal(loaded.predict(batches[0]), vq.predict(batches[0]))
    for batch in batches[20:]:
        vq.partial_fit(batch)
        loaded.partial_fit(batch)
    assert_array_equal(loaded.codebook_, vq.codebook_)


def test_pickle_does_not_carry_the_search_index():
    vq = fitted(n_codes=64, algorithm="kd_tree")
    assert b"cKDTree" not in pickle.dumps(vq)


# -------------------------------------------------------------- bad input
BAD_X = {
    "nan": (np.array([[np.nan, 0, 0, 0]]), "NaN"),
    "inf": (np.array([[np.inf, 0, 0, 0]]), "infinity"),
    "1-D": (np.zeros(4), "Expected 2D array"),
    "3-D": (np.zeros((2, 4, 1)), "dim 3"),
    "no rows": (np.zeros((0, 4)), "0 sample"),
    "complex": (np.zeros((2, 4)) + 1j, "[Cc]omplex"),
    "strings": (np.array([["a", "b", "c", "d"]], dtype=object), "convert|string"),
    "features": (np.zeros((2, 5)), "X has 5 features"),
}


METHODS = ["fit", "partial_fit", "transform", "predict", "score"]
# fit starts afresh, so any feature count is valid there
BAD_X_CASES = [
    (method, case)
    for method in METHODS
    for case in sorted(BAD_X)
    if not (method == "fit" and case == "features")
]


@pytest.mark.parametrize("method, case", BAD_X_CASES)
def test_bad_x_gets_a_clear_error_and_changes_nothing(method, case):
    X, message = BAD_X[case]
    vq = fitted()
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match=message):
        getattr(vq, method)(X)
    assert pickle.dumps(vq) == before


BAD_WEIGHTS = {
    "negative": (-np.ones(200), "[Nn]egative"),
    "nan": (np.full(200, np.nan), "NaN"),
    "all zero": (np.zeros(200), "non-zero"),
    "length": (np.ones(7), r"sample_weight.shape == \(7,\), expected \(200,\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
@pytest.mark.parametrize("method", ["fit", "partial_fit", "score"])
def test_bad_sample_weight_gets_a_clear_error_and_changes_nothing(method, case):
    weights, message = BAD_WEIGHTS[case]
    vq = fitted()
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match=message):
        getattr(vq, method)(blobs(), sample_weight=weights)
    assert pickle.dumps(vq) == before


@pytest.mark.parametrize(
    "init, message",
    [
        (np.zeros((5, 4)), r"init array has shape \(5, 4\)"),
        (np.full((6, 4), np.nan), "init contains NaN"),
        ("kmeans", "'init' parameter"),
        (np.zeros((6, 3)), r"init array has shape \(6, 3\)"),
    ],
)
def test_bad_init_gets_a_clear_error_and_changes_nothing(init, message):
    vq = fitted()
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match=message):
        vq.set_params(init=init).fit(blobs())
    vq.set_params(init="k-means++")
    assert pickle.dumps(vq) == before


@pytest.mark.parametrize(
    "codes, message",
    [
        ([[6]], r"\[0, n_codes=6\)"),
        ([[-1]], r"\[0, n_codes=6\)"),
        ([[1.5]], "must be integers"),
        ([[np.nan]], "NaN"),
        ([["a"]], "convert|string"),
        ([[1 + 1j]], "[Cc]omplex"),
    ],
)
def test_bad_codes_get_a_clear_error_in_inverse_transform(codes, message):
    vq = fitted()
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match=message):
        vq.inverse_transform(
            np.array(codes, dtype=object if codes == [["a"]] else None)
        )
    assert pickle.dumps(vq) == before


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, bool])
def test_float16_integer_and_boolean_input_is_computed_in_float64(dtype):
    X = (blobs() > 0) if dtype is bool else blobs()
    X = X.astype(dtype)
    vq = VQCodebookTransformer(n_codes=4, encode="distance", random_state=0).fit(X)
    assert vq.codebook_.dtype == np.float64
    assert vq.transform(X).dtype == np.float64
    assert vq.predict(X).shape == (200,)


# ------------------------------------------------------ partial_fit checks
def test_partial_fit_validates_parameters_changed_after_fitting():
    from sklearn.utils._param_validation import InvalidParameterError

    vq = fitted()
    vq.partial_fit(blobs())
    vq.set_params(ema_momentum=1.5)
    with pytest.raises(InvalidParameterError, match="ema_momentum"):
        vq.partial_fit(blobs())


def test_partial_fit_warns_on_an_array_after_fitting_on_named_features():
    pd = pytest.importorskip("pandas")
    X = blobs()
    vq = VQCodebookTransformer(n_codes=4, random_state=0)
    vq.fit(pd.DataFrame(X, columns=["a", "b", "c", "d"]))
    with pytest.warns(UserWarning, match="feature names"):
        vq.partial_fit(X)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((5, 4), np.nan), "NaN"),
        (np.ones((5, 3)), "features"),
        (np.ones((5, 4), dtype=np.float32)[:, ::1].T.copy().T, None),
        (np.asfortranarray(np.ones((5, 4))), None),
    ],
)
def test_partial_fit_on_a_fitted_estimator_checks_every_batch(bad, message):
    vq = fitted(n_codes=3)
    if message is None:  # non-contiguous or Fortran-ordered: accepted
        vq.partial_fit(bad)
        assert vq.n_steps_ > 1
        return
    before = pickle.dumps(vq)
    with pytest.raises(ValueError, match=message):
        vq.partial_fit(bad)
    assert pickle.dumps(vq) == before


def test_seeding_far_beyond_float32_range_draws_as_at_unit_scale():
    # k-means++ computes its distances in float32 only when that is safe;
    # its draws are scale-invariant, so scaled data give the same seeds.
    from skvq._kernels import kmeans_plusplus

    points = blobs(300, seed=3)
    weights = np.ones(300)

    def seeds_of(X):
        return kmeans_plusplus(X, weights, 8, np.random.RandomState(0), n_trials=6)

    expected = seeds_of(points)
    for scale in (1e-20, 1e20):
        seeds = seeds_of(points * scale)
        assert_array_equal(seeds, expected)
