"""Product and residual quantisers, against independent computations."""

import io
import itertools
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse

import skvq._residual as residual
from skvq import ProductVQTransformer, ResidualVQTransformer
from skvq._residual import beam_search
from skvq._search import CodebookIndex


def data(n=400, n_features=6, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-5, 5, size=(5, n_features))
    return centers[rng.randint(5, size=n)] + rng.normal(size=(n, n_features))


def nearest(X, codebook):
    d2 = ((X[:, None, :] - codebook[None]) ** 2).sum(axis=2)
    return d2.argmin(axis=1)


# ------------------------------------------------------------------ product
def test_product_split_sizes_differ_by_at_most_one():
    X = data(n_features=10)
    pq = ProductVQTransformer(n_codes=4, n_subspaces=3, random_state=0).fit(X)
    assert_array_equal(pq.subspace_bounds_, [0, 4, 7, 10])
    assert [c.shape for c in pq.codebooks_] == [(4, 4), (4, 3), (4, 3)]
    assert pq.bits_per_vector_ == 6.0 and pq.perplexity_.shape == (3,)


def test_product_uses_at_most_one_subspace_per_feature():
    X = data(n_features=3)
    pq = ProductVQTransformer(n_codes=4, n_subspaces=8, random_state=0).fit(X)
    assert pq.n_subspaces_ == 3
    assert_array_equal(pq.subspace_bounds_, [0, 1, 2, 3])


def test_product_codes_are_the_nearest_code_of_each_subspace():
    X = data(n_features=7)
    pq = ProductVQTransformer(n_codes=6, n_subspaces=3, random_state=0).fit(X)
    codes = pq.transform(X)
    assert codes.dtype == np.int64 and codes.shape == (X.shape[0], 3)
    bounds = pq.subspace_bounds_
    for j, codebook in enumerate(pq.codebooks_):
        expected = nearest(X[:, bounds[j] : bounds[j + 1]], codebook)
        assert_array_equal(codes[:, j], expected)
    decoded = np.hstack([pq.codebooks_[j][codes[:, j]] for j in range(3)])
    assert_array_equal(pq.inverse_transform(codes), decoded)
    assert pq.score(X) == pytest.approx(-np.mean(np.sum((X - decoded) ** 2, axis=1)))


def test_product_partial_fit_is_the_ema_rule_per_subspace():
    X = data(n_features=4)
    pq = ProductVQTransformer(
        n_codes=3,
        n_subspaces=2,
        ema_momentum=0.5,
        dead_code_threshold=0,
        relocate=False,
        init="random",
        random_state=0,
    )
    batches = np.array_split(X, 4)
    pq.partial_fit(batches[0])
    # Reference: the EMA rule on each half of the features, from the
    # state after the first step.
    state = [
        (q.ema_counts_.copy(), q.ema_sum_.copy(), q.codebook_.copy())
        for q in pq.quantizers_
    ]
    for batch in batches[1:]:
        pq.partial_fit(batch)
        for j, (counts, sums, codebook) in enumerate(state):
            part = batch[:, 2 * j : 2 * j + 2]
            labels = nearest(part, codebook)
            won = np.bincount(labels, minlength=3).astype(float)
            total = np.zeros_like(sums)
            np.add.at(total, labels, part)
            counts = 0.5 * counts + 0.5 * won
            sums = 0.5 * sums + 0.5 * total
            codebook = np.where(won[:, None] > 0, sums / counts[:, None], codebook)
            state[j] = (counts, sums, codebook)
    for q, (counts, sums, codebook) in zip(pq.quantizers_, state, strict=True):
        assert_allclose(q.ema_counts_, counts)
        assert_allclose(q.ema_sum_, sums)
        assert_allclose(q.codebook_, codebook)


# ----------------------------------------------------------------- residual
def test_greedy_residual_codes_follow_the_residual_chain():
    X = data()
    rvq = ResidualVQTransformer(n_codes=5, n_stages=3, random_state=0).fit(X)
    codes = rvq.transform(X)
    residual = X.copy()
    for s, codebook in enumerate(rvq.codebooks_):
        assert_array_equal(codes[:, s], nearest(residual, codebook))
        residual -= codebook[codes[:, s]]
    assert_allclose(rvq.inverse_transform(codes), X - residual)
    assert rvq.score(X) == pytest.approx(-np.mean(np.sum(residual**2, axis=1)))


def test_beam_search_finds_what_greedy_misses():
    # Greedy takes 0.9 first (closer to 0 than -1.0), then can only reach
    # -0.4; the beam keeps -1.0 and completes it exactly with +1.0.
    X = np.zeros((1, 1))
    stages = [
        CodebookIndex(np.array([[0.9], [-1.0]]), "brute"),
        CodebookIndex(np.array([[1.0], [-0.5]]), "brute"),
    ]
    greedy, greedy_err = beam_search(X, stages, 1)
    beam, beam_err = beam_search(X, stages, 2)
    assert_array_equal(greedy, [[0, 1]]) and greedy_err[0] == pytest.approx(0.16)
    assert_array_equal(beam, [[1, 0]]) and beam_err[0] == 0.0


def test_a_full_beam_is_exhaustive_search():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(50, 3))
    vectors = [rng.normal(size=(4, 3)) * scale for scale in (1.0, 0.5, 0.25)]
    stages = [CodebookIndex(v, "brute") for v in vectors]
    _, err = beam_search(X, stages, 4**3)
    best = np.full(50, np.inf)
    for a, b, c in itertools.product(range(4), repeat=3):
        r = X - vectors[0][a] - vectors[1][b] - vectors[2][c]
        best = np.minimum(best, np.sum(r**2, axis=1))
    assert_allclose(err, best)


def _reference_beam(X, vectors, beam):
    """Beam search row by row: every path extended by every code, the
    ``beam`` best kept by (error, path rank, code)."""
    codes, errors = [], []
    for x in X:
        kept = [((), x)]
        for stage in vectors:
            ranked = sorted(
                (float(np.sum((r - v) ** 2)), p, c, path + (c,), r - v)
                for p, (path, r) in enumerate(kept)
                for c, v in enumerate(stage)
            )
            kept = [(path, r) for _, _, _, path, r in ranked[:beam]]
        codes.append(kept[0][0])
        errors.append(float(np.sum(kept[0][1] ** 2)))
    return np.array(codes), np.array(errors)


@pytest.mark.parametrize("beam", [2, 3, 5])
def test_beam_search_keeps_the_best_paths_with_ties_to_the_lowest_path_and_code(beam):
    # Small integers: many exactly equal errors, all computed exactly.  The
    # codes of a stage are distinct (a duplicate code is one candidate).
    rng = np.random.RandomState(beam)
    X = rng.randint(-3, 4, size=(60, 3)).astype(float)
    grid = np.array(list(itertools.product(range(-2, 3), repeat=3)), dtype=float)
    vectors = [grid[rng.choice(len(grid), 16, replace=False)] for _ in range(3)]
    codes, err = beam_search(X, [CodebookIndex(v, "brute") for v in vectors], beam)
    expected_codes, expected_err = _reference_beam(X, vectors, beam)
    assert_array_equal(codes, expected_codes)
    assert_array_equal(err, expected_err)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ["brute", "kd_tree"])
def test_beam_search_is_the_row_by_row_beam_at_every_scale(scale, dtype, algorithm):
    rng = np.random.RandomState(0)
    X = (rng.normal(size=(40, 3)) * scale).astype(dtype)
    vectors = [
        (rng.normal(size=(12, 3)) * scale * 0.5**s).astype(dtype) for s in range(3)
    ]
    codes, err = beam_search(X, [CodebookIndex(v, algorithm) for v in vectors], 4)
    expected_codes, expected_err = _reference_beam(
        X.astype(np.float64), [v.astype(np.float64) for v in vectors], 4
    )
    assert_array_equal(codes, expected_codes)
    assert_allclose(err, expected_err, rtol=1e-12)


def test_wider_beams_never_encode_worse_on_average():
    X = data(n=300)
    rvq = ResidualVQTransformer(n_codes=4, n_stages=4, random_state=0).fit(X)
    errors = []
    for beam in (1, 2, 8):
        rvq.set_params(beam_size=beam)
        errors.append(-rvq.score(X))
    assert errors[2] <= errors[1] <= errors[0]


def _held_out_error(rvq, X):
    rows = X[residual.held_out(X)]
    decoded = rvq.inverse_transform(rvq.transform(rows))
    return float(((rows - decoded) ** 2).sum(axis=1).mean())


def test_kept_refinement_passes_lower_the_held_out_error(monkeypatch):
    X = data(n=3000, n_features=3)
    params = dict(n_codes=8, n_stages=3, random_state=0)
    refined = ResidualVQTransformer(**params).fit(X)
    monkeypatch.setattr(residual, "REFINE_PASSES", 0)
    greedy = ResidualVQTransformer(**params).fit(X)
    assert refined.n_refinements_ >= 1 and greedy.n_refinements_ == 0
    assert _held_out_error(refined, X) < _held_out_error(greedy, X)


@pytest.mark.parametrize("seed", range(4))
def test_refinement_never_raises_the_held_out_error(monkeypatch, seed):
    # Few rows per code: the solve fits the training rows' noise, and the
    # held-out check must undo such passes.
    X = data(n=300, n_features=8, seed=seed)
    params = dict(n_codes=16, n_stages=3, random_state=seed)
    refined = ResidualVQTransformer(**params).fit(X)
    monkeypatch.setattr(residual, "REFINE_PASSES", 0)
    greedy = ResidualVQTransformer(**params).fit(X)
    assert _held_out_error(refined, X) <= _held_out_error(greedy, X)


def test_stage_by_stage_refinement_learns_from_the_rows_not_held_out(monkeypatch):
    # Code books too large for a joint solve are refined by a Lloyd step per
    # stage: the held-out rows that judge each pass take no part in it.
    monkeypatch.setattr(residual, "JOINT_SOLVE_MAX", 0)
    step = residual.full_update
    weights = []

    def recording(config, state, stats, *args):
        weights.append(stats.weight)
        return (yield from step(config, state, stats, *args))

    monkeypatch.setattr(residual, "full_update", recording)
    X = data(n=400, n_features=8)
    ResidualVQTransformer(n_codes=8, n_stages=3, random_state=0).fit(X)
    assert len(weights) >= 3  # at least one pass over the three stages
    assert_allclose(weights, np.count_nonzero(~residual.held_out(X)))


def test_no_refinement_with_fewer_rows_than_codes_in_all(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an underdetermined solve was attempted")

    monkeypatch.setattr(residual, "solve_codebooks", refuse)
    X = data(n=40, n_features=8)
    rvq = ResidualVQTransformer(n_codes=16, n_stages=3, random_state=0).fit(X)
    assert rvq.n_refinements_ == 0
    with pytest.raises(AssertionError, match="underdetermined"):
        ResidualVQTransformer(n_codes=4, n_stages=3, random_state=0).fit(data(n=400))


def test_held_out_rows_are_an_eighth_chosen_by_value():
    X = np.random.RandomState(0).normal(size=(8000, 5))
    held = residual.held_out(X)
    assert abs(held.mean() - 1 / 8) < 0.02
    # The same rows at any position, in any array.
    order = np.random.RandomState(1).permutation(8000)
    assert_array_equal(residual.held_out(X[order]), held[order])


def test_residual_partial_fit_steps_every_stage_from_the_joint_codes():
    X = data(n=300, n_features=3)
    params = dict(
        n_codes=4,
        n_stages=2,
        ema_momentum=0.5,
        dead_code_threshold=0,
        relocate=False,
        random_state=0,
    )
    rvq = ResidualVQTransformer(**params).partial_fit(X[:100])
    before = [(q.ema_counts_.copy(), q.ema_sum_.copy()) for q in rvq.quantizers_]
    vectors = [c.copy() for c in rvq.codebooks_]
    batch = X[100:200]
    codes = rvq.transform(batch)
    rvq.partial_fit(batch)
    decoded = vectors[0][codes[:, 0]] + vectors[1][codes[:, 1]]
    for s, (counts, sums) in enumerate(before):
        target = batch - decoded + vectors[s][codes[:, s]]
        won = np.bincount(codes[:, s], minlength=4).astype(float)
        total = np.zeros_like(sums)
        np.add.at(total, codes[:, s], target)
        counts, sums = 0.5 * counts + 0.5 * won, 0.5 * sums + 0.5 * total
        expected = np.where(won[:, None] > 0, sums / counts[:, None], vectors[s])
        assert_allclose(rvq.codebooks_[s], expected)


# ------------------------------------------------------------------- shared
@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_compress_uses_the_smallest_unsigned_type(Estimator):
    X = data(n=700)
    small = Estimator(4, 2, random_state=0).fit(X)
    assert small.compress(X).dtype == np.uint8
    assert_array_equal(
        small.inverse_transform(small.compress(X)),
        small.inverse_transform(small.transform(X)),
    )
    large = Estimator(300, 2, max_iter=2, random_state=0).fit(X)
    assert large.compress(X).dtype == np.uint16


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_onehot_has_one_code_per_codebook_and_decodes(Estimator):
    X = data()
    est = Estimator(5, 3, encode="onehot", random_state=0).fit(X)
    onehot = est.transform(X)
    assert sparse.issparse(onehot) and onehot.shape == (X.shape[0], 15)
    blocks = onehot.toarray().reshape(-1, 3, 5)
    assert_array_equal(blocks.sum(axis=2), 1)
    codes = blocks.argmax(axis=2)
    decoded = est.set_params(encode="index").inverse_transform(codes)
    assert_allclose(est.set_params(encode="onehot").inverse_transform(onehot), decoded)
    names = est.get_feature_names_out()
    assert names[0].endswith("_code0_0") and names[-1].endswith("_code2_4")


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
@pytest.mark.parametrize(
    "codes, message",
    [
        (np.array([[0, 9]]), "lie in"),
        (np.array([[0, 1, 2]]), "shape"),
        (np.array([[0.5, 1.0]]), "integers"),
    ],
)
def test_bad_codes_are_rejected(Estimator, codes, message):
    est = Estimator(4, 2, random_state=0).fit(data())
    with pytest.raises(ValueError, match=message):
        est.inverse_transform(codes)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_a_failed_partial_fit_changes_nothing(Estimator):
    est = Estimator(4, 2, random_state=0).partial_fit(data())
    before = pickle.dumps(est)
    bad = data()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad)
    assert pickle.dumps(est) == before


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_pickling_mid_stream_continues_bit_for_bit(Estimator):
    batches = np.array_split(data(n=1200), 12)
    straight = Estimator(6, 2, ema_momentum=0.9, random_state=0)
    for batch in batches:
        straight.partial_fit(batch)
    resumed = Estimator(6, 2, ema_momentum=0.9, random_state=0)
    for batch in batches[:6]:
        resumed.partial_fit(batch)
    resumed = pickle.loads(pickle.dumps(resumed))
    for batch in batches[6:]:
        resumed.partial_fit(batch)
    for a, b in zip(straight.codebooks_, resumed.codebooks_, strict=True):
        assert_array_equal(a, b)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_skops_round_trip_trusts_only_the_estimator_class(Estimator):
    import skops.io as sio

    X = data()
    est = Estimator(4, 2, random_state=0).fit(X)
    payload = sio.dumps(est)
    untrusted = sorted(sio.get_untrusted_types(data=payload))
    assert untrusted == [f"skvq._multi.{Estimator.__name__}"]
    loaded = sio.loads(payload, trusted=untrusted)
    assert_array_equal(loaded.transform(X), est.transform(X))


def test_float32_stays_float32():
    X = data().astype(np.float32)
    rvq = ResidualVQTransformer(4, 2, random_state=0).fit(X)
    assert all(c.dtype == np.float32 for c in rvq.codebooks_)
    assert rvq.inverse_transform(rvq.transform(X)).dtype == np.float32
    buffer = io.BytesIO()
    pickle.dump(rvq, buffer)
    assert buffer.tell() > 0


def test_least_squares_code_books_reach_the_lstsq_optimum():
    from skvq._residual import least_squares_codebooks

    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 3))
    codes = np.column_stack([rng.randint(4, size=200), rng.randint(3, size=200)])
    codes[:3, 1] = [0, 1, 2]  # every code used
    current = [rng.normal(size=(4, 3)), rng.normal(size=(4, 3))]
    current[1][3] = 7.0  # code 3 of stage 2 is never used
    solved = least_squares_codebooks(X, np.ones(200), codes, current)
    decoded = solved[0][codes[:, 0]] + solved[1][codes[:, 1]]
    onehot = np.hstack([np.eye(4)[codes[:, 0]], np.eye(4)[codes[:, 1]]])
    best, *_ = np.linalg.lstsq(onehot, X, rcond=None)
    optimum = np.sum((X - onehot @ best) ** 2)
    assert np.sum((X - decoded) ** 2) == pytest.approx(optimum, rel=1e-6)
    assert_allclose(solved[1][3], 7.0, atol=1e-6)  # unused: kept in place


@pytest.mark.parametrize(
    "fit",
    [
        lambda X: ResidualVQTransformer(4, 2, random_state=0).fit(X),
        lambda X: ResidualVQTransformer(4, 2, random_state=0).partial_fit(X),
        lambda X: ProductVQTransformer(4, 2, random_state=0).fit(X),
        lambda X: ProductVQTransformer(4, 2, random_state=0).partial_fit(X),
    ],
)
def test_too_few_rows_warns_at_the_users_call(fit):
    with pytest.warns(UserWarning, match="Only 1 distinct samples") as record:
        fit(np.ones((50, 4)))
    assert all(w.filename == __file__ for w in record)
