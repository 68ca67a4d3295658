"""Code relocation and the relative dead-code rule."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from skvq import VQCodebookTransformer
from skvq._relocation import (
    CellSplits,
    apply_relocations,
    cell_members,
    merge_costs,
    merge_members,
    plan_relocations,
    split_cell,
    whole_cells,
)


def sse(X, w=None):
    """Weighted sum of squared distances of the rows of X to their mean."""
    w = np.ones(X.shape[0]) if w is None else w
    mean = np.average(X, axis=0, weights=w)
    return float(np.sum(w[:, None] * (X - mean) ** 2))


def three_clusters(n=300, seed=0):
    """Three tight, far apart clusters of n rows each, at x = 0, 10, 20."""
    rng = np.random.RandomState(seed)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    return np.vstack([c + 0.3 * rng.normal(size=(n, 2)) for c in centers])


# ----------------------------------------------------------------- kernels
def test_merge_cost_is_the_increase_of_the_distortion():
    rng = np.random.RandomState(0)
    a = rng.normal(size=(40, 3))
    b = rng.normal(size=(25, 3)) + [3.0, 0.0, 1.0]
    far = np.full((1, 3), 50.0)
    codebook = np.vstack([a.mean(axis=0), b.mean(axis=0), far])
    counts = np.array([40.0, 25.0, 1.0])
    into, cost = merge_costs(codebook, counts, np.array([0, 1]))
    assert_array_equal(into, [1, 0])
    expected = sse(np.vstack([a, b])) - sse(a) - sse(b)
    assert_allclose(cost, [expected, expected], rtol=1e-10)


def test_split_finds_the_two_blobs_of_a_cell_and_their_gain():
    rng = np.random.RandomState(0)
    left = rng.normal(size=(200, 2)) * 0.5 + [-4.0, 1.0]
    right = rng.normal(size=(200, 2)) * 0.5 + [4.0, 1.0]
    Y = rng.permutation(np.vstack([left, right]))
    code = Y.mean(axis=0)
    gain, (a, b, b_share, remaining) = split_cell(Y, np.ones(400), code)
    children = sorted([tuple(a), tuple(b)])
    assert_allclose(children, [left.mean(axis=0), right.mean(axis=0)], atol=1e-12)
    assert b_share == pytest.approx(0.5)
    whole, parts = sse(Y), sse(left) + sse(right)
    assert remaining == pytest.approx(parts / whole)
    # The held-out gain is an honest estimate of whole - parts.
    assert gain == pytest.approx(whole - parts, rel=0.02)


def test_a_cell_of_equal_rows_cannot_be_split():
    Y = np.ones((20, 3))
    gain, split = split_cell(Y, np.ones(20), Y[0])
    assert split is None and gain == 0.0


def test_split_gain_of_a_single_gaussian_is_not_overestimated():
    # On few rows, the gain measured on the rows that placed the children is
    # biased upwards; the cross-fitted estimate is not.
    rng = np.random.RandomState(0)
    gains, in_sample = [], []
    for _ in range(200):
        Y = rng.normal(size=(16, 8))
        gains.append(split_cell(Y, np.ones(16), np.zeros(8))[0])
        _, (a, b, _, _) = split_cell(Y, np.ones(16), np.zeros(8))
        near = np.minimum(((Y - a) ** 2).sum(1), ((Y - b) ** 2).sum(1))
        in_sample.append((Y**2).sum() - near.sum())
    # The population gain of splitting N(0, I) is 16 * 2 / pi ~ 10.2 per cell.
    assert np.mean(gains) < 16 * 2 / np.pi < np.mean(in_sample)


def test_cell_members_depend_only_on_the_weighted_rows():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 2))
    labels = rng.randint(3, size=60)
    counts = rng.randint(0, 4, size=60)
    weighted = cell_members(X, counts.astype(float), labels, [0, 2])
    repeated = cell_members(
        np.repeat(X, counts, axis=0),
        np.ones(counts.sum()),
        np.repeat(labels, counts),
        [0, 2],
    )
    assert weighted.keys() == repeated.keys() == {0, 2}
    for p in (0, 2):
        assert_array_equal(weighted[p][0], repeated[p][0])
        assert_array_equal(weighted[p][1], repeated[p][1])


def test_members_of_parts_merge_into_the_members_of_the_whole(monkeypatch):
    import skvq._relocation as relocation

    monkeypatch.setattr(relocation, "MAX_SPLIT_ROWS", 7)  # caps are exercised
    rng = np.random.RandomState(1)
    X = rng.normal(size=(90, 2))
    labels = rng.randint(2, size=90)
    w = rng.uniform(0.5, 2, size=90)
    parts = [
        cell_members(X[s], w[s], labels[s], [0, 1])
        for s in np.array_split(range(90), 4)
    ]
    whole = cell_members(X, w, labels, [0, 1])
    merged = merge_members(parts)
    for p in (0, 1):
        assert_allclose(merged[p][0], whole[p][0])
        assert_allclose(merged[p][1], whole[p][1])


def test_a_relocation_keeps_the_total_count_and_moves_three_codes():
    X = three_clusters()
    # Codes 0 and 1 share the first cluster; code 2 serves the two others.
    codebook = np.array([[-0.1, 0.0], [0.1, 0.0], [15.0, 0.0]])
    labels = np.repeat([0, 2, 2], 300)
    labels[:300:2] = 1
    counts = np.bincount(labels, minlength=3).astype(float)
    state = (codebook, counts, codebook * counts[:, None], np.ones(3))
    rows = {2: (X[300:], np.ones(600))}
    moves = plan_relocations(CellSplits(codebook, rows), counts, np.arange(3), 1, 1.0)
    assert len(moves) == 1
    move = moves[0]
    assert (move.split, {move.code, move.into}) == (2, {0, 1})
    new_codebook, new_counts, new_sums, _ = apply_relocations(state, moves)
    assert new_counts.sum() == pytest.approx(counts.sum())
    assert_allclose(new_codebook[move.into], [0.0, 0.0], atol=1e-12)
    assert_allclose(
        sorted(new_codebook[[move.code, 2], 0]),
        [X[300:600, 0].mean(), X[600:, 0].mean()],
        atol=1e-12,
    )
    assert_allclose(new_sums / new_counts[:, None], new_codebook)
    assert_array_equal(state[0], codebook)  # inputs untouched


def test_no_move_when_the_split_gains_less_than_the_merge_costs():
    X = three_clusters()
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    counts = np.full(3, 300.0)
    rows = {k: (X[300 * k : 300 * (k + 1)], np.ones(300)) for k in range(3)}
    assert (
        plan_relocations(CellSplits(codebook, rows), counts, np.arange(3), 3, 1.0) == []
    )


# -------------------------------------------------------------------- fit
def test_fit_relocates_out_of_a_local_minimum():
    X = three_clusters()
    init = np.array([[-0.5, 0.0], [0.5, 0.0], [15.0, 0.0]])  # Lloyd's trap
    params = dict(n_codes=3, init=init, batch_size=X.shape[0], random_state=0)
    stuck = VQCodebookTransformer(relocate=False, **params).fit(X)
    moved = VQCodebookTransformer(**params).fit(X)
    assert stuck.codebook_[2, 0] == pytest.approx(15.0, abs=0.1)
    expected = sum(sse(X[300 * k : 300 * (k + 1)]) for k in range(3)) / X.shape[0]
    assert -moved.score(X) == pytest.approx(expected, rel=1e-12)
    assert moved.n_codes_relocated_ == 1


def test_fit_undoes_relocations_that_do_not_help():
    X = three_clusters()
    means = X.reshape(3, 300, 2).mean(axis=1)
    params = dict(n_codes=3, init=means, batch_size=X.shape[0], random_state=0)
    plain = VQCodebookTransformer(relocate=False, **params).fit(X)
    relocated = VQCodebookTransformer(**params).fit(X)
    assert relocated.n_codes_relocated_ == 0
    assert_array_equal(relocated.codebook_, plain.codebook_)


def test_verbose_reports_relocation_rounds(capsys):
    X = three_clusters()
    init = np.array([[-0.5, 0.0], [0.5, 0.0], [15.0, 0.0]])
    VQCodebookTransformer(
        n_codes=3, init=init, batch_size=X.shape[0], verbose=1, random_state=0
    ).fit(X)
    out = capsys.readouterr().out
    assert "Relocated 1 codes (certain): distortion " in out and ", kept." in out


def test_a_move_into_a_whole_cell_is_certain_with_the_exact_gain():
    X = three_clusters()
    codebook = np.array([[-0.1, 0.0], [0.1, 0.0], [15.0, 0.0]])
    counts = np.array([150.0, 150.0, 600.0])
    rows = {2: (X[300:], np.ones(600))}
    (move,) = plan_relocations(
        CellSplits(codebook, rows), counts, np.arange(3), 1, 0.0, whole={2}
    )
    assert move.certain and move.split == 2
    # The fitted gain of the two blobs, not a cross-fitted estimate.
    cell = X[300:]
    exact = float(np.sum((cell - codebook[2]) ** 2)) - sse(X[300:600]) - sse(X[600:])
    assert move.gain == pytest.approx(exact, rel=1e-12)
    (trial,) = plan_relocations(
        CellSplits(codebook, rows), counts, np.arange(3), 1, 0.0
    )
    assert not trial.certain and trial.gain != pytest.approx(exact, rel=1e-6)


def test_no_certain_move_when_the_exact_gain_is_below_the_cost():
    X = three_clusters()
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    counts = np.full(3, 300.0)
    rows = {k: (X[300 * k : 300 * (k + 1)], np.ones(300)) for k in range(3)}
    # At ratio 0 any positive cross-fitted gain makes a trial move ...
    assert plan_relocations(CellSplits(codebook, rows), counts, np.arange(3), 1, 0.0)
    # ... but a whole cell's split must pay for the merge.
    whole = plan_relocations(
        CellSplits(codebook, rows), counts, np.arange(3), 1, 0.0, whole={0, 1, 2}
    )
    assert whole == []


def test_a_rounds_two_plans_fit_each_cell_once(monkeypatch):
    import skvq._relocation as relocation

    X = three_clusters()
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    counts = np.full(3, 300.0)
    rows = {k: (X[300 * k : 300 * (k + 1)], np.ones(300)) for k in range(3)}
    fresh = [
        plan_relocations(CellSplits(codebook, rows), counts, np.arange(3), 1, 0.0, **w)
        for w in ({"whole": {0, 1, 2}}, {})
    ]
    fits = []
    two_means = relocation._two_means
    monkeypatch.setattr(
        relocation, "_two_means", lambda Y, v: fits.append(len(Y)) or two_means(Y, v)
    )
    shared = CellSplits(codebook, rows)
    plans = [
        plan_relocations(shared, counts, np.arange(3), 1, 0.0, **w)
        for w in ({"whole": {0, 1, 2}}, {})
    ]
    # The same moves as from fresh candidates; each cell's children on all
    # 300 rows fitted once, then once on each of the two folds of 150.
    assert [[(m.code, m.split, m.gain) for m in p] for p in plans] == [
        [(m.code, m.split, m.gain) for m in p] for p in fresh
    ]
    assert sorted(fits) == [150] * 6 + [300] * 3


def test_only_cells_below_the_row_cap_are_whole(monkeypatch):
    import skvq._relocation as relocation

    monkeypatch.setattr(relocation, "MAX_SPLIT_ROWS", 5)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(12, 2))
    labels = np.repeat([0, 1], [4, 8])
    members = cell_members(X, np.ones(12), labels, [0, 1])
    assert members[1][0].shape[0] == 5  # capped
    assert whole_cells(members) == {0}


# ----------------------------------------------------------------- streams
def crowded_stream(n_steps=300, n_codes=16, **params):
    rng = np.random.RandomState(0)
    a, b = np.zeros(8), np.full(8, 20.0)
    vq = VQCodebookTransformer(
        n_codes=n_codes,
        init=a + rng.normal(size=(n_codes, 8)),
        random_state=0,
        **params,
    )
    for _ in range(n_steps):
        centers = np.where(rng.rand(256, 1) < 0.5, a, b)
        vq.partial_fit(centers + rng.normal(size=(256, 8)))
    to_b = np.linalg.norm(vq.codebook_ - b, axis=1)
    return vq, int(np.sum(to_b < np.linalg.norm(vq.codebook_ - a, axis=1)))


def test_partial_fit_relocates_crowded_codes_to_the_underserved_cluster():
    vq, near_b = crowded_stream()
    _, near_b_off = crowded_stream(relocate=False)
    assert near_b_off == 1
    assert near_b >= 6 and vq.perplexity_ >= 12
    assert vq.n_codes_relocated_ >= near_b - 1
    assert_allclose(vq.ema_sum_ / vq.ema_counts_[:, None], vq.codebook_)


def test_partial_fit_verbose_reports_relocated_codes(capsys):
    crowded_stream(n_steps=40, verbose=1)
    assert "relocated codes" in capsys.readouterr().out


def test_ema_distortion_follows_the_ema_rule():
    rng = np.random.RandomState(0)
    X = three_clusters()
    init = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    vq = VQCodebookTransformer(
        n_codes=3, init=init, ema_momentum=0.5, dead_code_threshold=0, relocate=False
    )
    expected = np.zeros(3)
    for _ in range(4):
        batch = X[rng.choice(X.shape[0], 100)]
        codebook = getattr(vq, "codebook_", init)
        d2 = ((batch[:, None, :] - codebook[None]) ** 2).sum(axis=2)
        labels = d2.argmin(axis=1)
        per_code = np.bincount(labels, weights=d2.min(axis=1), minlength=3)
        expected = 0.5 * expected + 0.5 * per_code
        vq.partial_fit(batch)
    assert_allclose(vq.ema_distortion_, expected, rtol=1e-10)


@pytest.mark.parametrize("batch_size", [64, 4096])
def test_dead_code_rule_spares_healthy_codes_at_any_batch_size(batch_size):
    # 64 equally likely clusters, one code on each: at 64 rows a batch a
    # code wins one row on average and often none, yet none is dead.
    rng = np.random.RandomState(0)
    centers = rng.uniform(-20, 20, size=(64, 4))
    vq = VQCodebookTransformer(n_codes=64, init=centers, random_state=0)
    for _ in range(200):
        rows = rng.randint(64, size=batch_size)
        vq.partial_fit(centers[rows] + 0.1 * rng.normal(size=(batch_size, 4)))
    assert vq.n_codes_reassigned_ == 0


def test_a_code_that_stops_winning_dies_after_the_same_number_of_steps():
    points = np.array([[0.0, 0.0], [5.0, 0.0], [9.0, 9.0]])

    def steps_to_death(batch_size):
        vq = VQCodebookTransformer(n_codes=3, init=points, relocate=False)
        for _ in range(1000):  # every code wins a third of each batch
            vq.partial_fit(np.repeat(points, batch_size // 3, axis=0))
        for t in range(1, 1000):  # then code 2 wins nothing
            vq.partial_fit(np.repeat(points[:2], batch_size // 2, axis=0))
            if vq.dead_codes_[2]:
                return t

    # Counts tend to the weight won per batch, so code 2 decays from a third
    # to 0.05 times the mean count: 0.99 ** t < 0.05, t = 299, at any size.
    assert steps_to_death(66) == steps_to_death(8190) == 299


def test_copies_of_a_code_are_dead():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [6.0, 5.0]])
    init = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    vq = VQCodebookTransformer(n_codes=3, init=init, relocate=False, random_state=0)
    vq.partial_fit(X)
    assert_array_equal(vq.dead_codes_, [False, True, False])
    assert len(np.unique(vq.codebook_, axis=0)) == 3
