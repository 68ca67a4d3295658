"""Dask: data-parallel steps, lazy encoding, dask-ml wrappers, optional import."""

import logging
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn.datasets import make_blobs

from skvq import ProductVQTransformer, ResidualVQTransformer, VQCodebookTransformer


@pytest.fixture(scope="module")
def cluster_client():
    """A real cluster: two worker processes on the loopback interface."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(params=["threads", "distributed"])
def scheduler(request):
    if request.param == "threads":
        with dask.config.set(scheduler="threads"):
            yield "threads"
    else:
        client = request.getfixturevalue("cluster_client")
        with dask.config.set(scheduler=client.get):
            yield "distributed"


def data(n=6000, n_features=6, seed=0):
    X, _ = make_blobs(n, n_features=n_features, centers=10, random_state=seed)
    return X


def test_partial_fit_on_dask_equals_partial_fit_on_numpy(scheduler):
    X = data()
    w = np.random.RandomState(0).uniform(0.5, 2.0, size=X.shape[0])
    init = X[:20] + 0.1
    params = dict(n_codes=20, init=init, ema_momentum=0.9)
    eager = VQCodebookTransformer(**params).partial_fit(X, sample_weight=w)
    eager.partial_fit(X[::2], sample_weight=w[::2])
    lazy = VQCodebookTransformer(**params)
    lazy.partial_fit(da.from_array(X, chunks=(700, 6)), sample_weight=w)
    lazy.partial_fit(da.from_array(X[::2], chunks=(900, 3)), sample_weight=w[::2])
    assert lazy.n_steps_ == eager.n_steps_ == 2
    assert_allclose(lazy.codebook_, eager.codebook_, rtol=1e-10)
    assert_allclose(lazy.ema_counts_, eager.ema_counts_, rtol=1e-12)
    assert_allclose(lazy.ema_sum_, eager.ema_sum_, rtol=1e-10)
    assert lazy.commitment_loss_ == pytest.approx(eager.commitment_loss_, rel=1e-10)


def test_fit_on_dask_matches_numpy_quality(scheduler):
    X = data(12_000)
    Xd = da.from_array(X, chunks=(500, 6))
    params = dict(n_codes=32, random_state=0, max_iter=20)
    eager = VQCodebookTransformer(**params).fit(X)
    lazy = VQCodebookTransformer(**params).fit(Xd)
    assert lazy.n_features_in_ == 6
    # Stages of doubling whole chunks, one reduction per step.
    assert lazy.n_steps_ == lazy.n_iter_
    assert -lazy.score(X) <= 1.02 * -eager.score(X)


@pytest.mark.parametrize("encode", ["index", "onehot", "onehot-dense", "distance"])
def test_transforms_on_dask_are_lazy_and_equal_numpy(scheduler, encode):
    X = data(3000)
    Xd = da.from_array(X, chunks=(400, 6))
    vq = VQCodebookTransformer(n_codes=12, encode=encode, random_state=0).fit(X)
    Xt = vq.transform(Xd)
    assert isinstance(Xt, da.Array)
    expected = vq.transform(X)
    got = Xt.compute()
    if encode == "onehot":
        assert sparse.issparse(got)
        got, expected = got.toarray(), expected.toarray()
    assert_allclose(got, expected)
    decoded = vq.inverse_transform(Xt)
    assert isinstance(decoded, da.Array)
    assert_array_equal(decoded.compute(), vq.inverse_transform(vq.transform(X)))


def test_predict_and_score_on_dask_are_lazy_and_equal_numpy(scheduler):
    X = data(3000)
    w = np.random.RandomState(1).uniform(size=3000)
    Xd = da.from_array(X, chunks=(400, 6))
    vq = VQCodebookTransformer(n_codes=12, random_state=0).fit(X)
    codes = vq.predict(Xd)
    assert isinstance(codes, da.Array) and codes.ndim == 1
    assert_array_equal(codes.compute(), vq.predict(X))
    score = vq.score(Xd, sample_weight=w)
    assert isinstance(score, da.Array) and score.shape == ()
    assert float(score.compute()) == pytest.approx(vq.score(X, sample_weight=w))


def test_bad_chunk_fails_at_compute_and_leaves_the_estimator_unchanged(scheduler):
    import pickle

    X = data(2000)
    vq = VQCodebookTransformer(n_codes=8, random_state=0).fit(X)
    before = pickle.dumps(vq)
    bad = X.copy()
    bad[1500, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vq.partial_fit(da.from_array(bad, chunks=(500, 6)))
    with pytest.raises(ValueError, match="X has 5 features"):
        vq.partial_fit(da.from_array(X[:, :5], chunks=(500, 5)))
    with pytest.raises(ValueError, match="Negative"):
        vq.partial_fit(da.from_array(X, chunks=(500, 6)), sample_weight=-np.ones(2000))
    assert pickle.dumps(vq) == before


def test_dead_codes_are_reseeded_on_dask_from_a_weighted_sample(scheduler):
    X = data(4000)
    far = np.full((8, 6), 1e3) + np.arange(8)[:, None]
    init = np.vstack([X[:8], far])  # eight codes that win nothing
    vq = VQCodebookTransformer(n_codes=16, init=init, ema_momentum=0.0)
    vq.partial_fit(da.from_array(X, chunks=(500, 6)))
    assert vq.n_codes_reassigned_ == 8
    assert np.all(np.abs(vq.codebook_) < 100)


def test_incremental_and_parallel_post_fit_wrappers(scheduler):
    from dask_ml.wrappers import Incremental, ParallelPostFit

    X = data(4000)
    Xd = da.from_array(X, chunks=(500, 6))
    init = X[:10]
    inc = Incremental(
        VQCodebookTransformer(n_codes=10, init=init, ema_momentum=0.9),
        shuffle_blocks=False,
    )
    inc.fit(Xd)
    stream = VQCodebookTransformer(n_codes=10, init=init, ema_momentum=0.9)
    for block in np.split(X, 8):  # one partial_fit per block, in order
        stream.partial_fit(block)
    assert_allclose(inc.estimator_.codebook_, stream.codebook_, rtol=1e-12)
    post = ParallelPostFit(VQCodebookTransformer(n_codes=10, random_state=0)).fit(X)
    fitted = post.estimator  # ParallelPostFit fits its estimator in place
    assert_array_equal(post.predict(Xd).compute(), fitted.predict(X))
    assert_array_equal(post.transform(Xd).compute(), fitted.transform(X))


def test_importing_skvq_does_not_import_dask():
    code = (
        "import sys, numpy as np\n"
        "import skvq\n"
        "assert not any(m.split('.')[0] == 'dask' for m in sys.modules), 'dask'\n"
        "vq = skvq.VQCodebookTransformer(n_codes=3, random_state=0)\n"
        "vq.fit(np.random.rand(50, 2)).transform(np.random.rand(5, 2))\n"
        "assert not any(m.split('.')[0] == 'dask' for m in sys.modules), 'dask'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_skvq_works_when_dask_cannot_be_imported():
    code = (
        "import sys, numpy as np\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'distributed'):\n"
        "            raise ImportError('no dask here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import skvq\n"
        "vq = skvq.VQCodebookTransformer(n_codes=3, random_state=0)\n"
        "vq.fit(np.random.rand(50, 2)).partial_fit(np.random.rand(20, 2))\n"
        "print(vq.predict(np.random.rand(4, 2)))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_partial_fit_on_dask_relocates_like_numpy(scheduler):
    rng = np.random.RandomState(0)
    a, b = np.zeros(4), np.full(4, 20.0)
    init = a + rng.normal(size=(8, 4))
    batches = [
        np.where(rng.rand(600, 1) < 0.5, a, b) + rng.normal(size=(600, 4))
        for _ in range(30)
    ]
    params = dict(n_codes=8, init=init, ema_momentum=0.9, dead_code_threshold=0)
    eager, lazy = VQCodebookTransformer(**params), VQCodebookTransformer(**params)
    for batch in batches:
        eager.partial_fit(batch)
        lazy.partial_fit(da.from_array(batch, chunks=(250, 4)))
    assert eager.n_codes_relocated_ > 0
    assert lazy.n_codes_relocated_ == eager.n_codes_relocated_
    assert_allclose(lazy.codebook_, eager.codebook_, rtol=1e-8)
    assert_allclose(lazy.ema_distortion_, eager.ema_distortion_, rtol=1e-8)


def test_fit_on_dask_relocates_out_of_a_local_minimum(scheduler):
    rng = np.random.RandomState(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    X = np.vstack([c + 0.3 * rng.normal(size=(300, 2)) for c in centers])
    init = np.array([[-0.5, 0.0], [0.5, 0.0], [15.0, 0.0]])
    params = dict(n_codes=3, init=init, batch_size=X.shape[0], random_state=0)
    eager = VQCodebookTransformer(**params).fit(X)
    lazy = VQCodebookTransformer(**params).fit(da.from_array(X, chunks=(200, 2)))
    assert lazy.n_codes_relocated_ == eager.n_codes_relocated_ == 1
    assert_allclose(lazy.codebook_, eager.codebook_, rtol=1e-10)


@pytest.mark.parametrize("Estimator", ["ProductVQTransformer", "ResidualVQTransformer"])
def test_multi_codebook_partial_fit_on_dask_equals_numpy(scheduler, Estimator):
    import skvq

    X = data(3000)
    params = dict(n_codes=8, ema_momentum=0.9, dead_code_threshold=0, random_state=0)
    eager = getattr(skvq, Estimator)(**params)
    lazy = getattr(skvq, Estimator)(**params)
    for batch in np.array_split(X, 3):
        eager.partial_fit(batch)
        lazy.partial_fit(da.from_array(batch, chunks=(400, 6)))
    for a, b in zip(lazy.codebooks_, eager.codebooks_, strict=True):
        assert_allclose(a, b, rtol=1e-8)
    Xd = da.from_array(X, chunks=(700, 6))
    codes = lazy.transform(Xd)
    assert isinstance(codes, da.Array)
    assert_array_equal(codes.compute(), eager.transform(X))
    assert_allclose(
        lazy.inverse_transform(codes).compute(),
        eager.inverse_transform(codes.compute()),
    )
    assert float(lazy.score(Xd).compute()) == pytest.approx(eager.score(X))


@pytest.mark.parametrize("Estimator", ["ProductVQTransformer", "ResidualVQTransformer"])
def test_multi_codebook_fit_on_dask_matches_numpy_quality(scheduler, Estimator):
    import skvq

    X = data(6000)
    params = dict(n_codes=16, random_state=0, max_iter=30)
    eager = getattr(skvq, Estimator)(**params).fit(X)
    lazy = getattr(skvq, Estimator)(**params).fit(da.from_array(X, chunks=(1000, 6)))
    assert lazy.n_features_in_ == 6
    assert -lazy.score(X) <= 1.05 * -eager.score(X)


def clustered(n_clusters=12, per_cluster=500, n_features=16, seed=7):
    rng = np.random.RandomState(seed)
    X = np.vstack(
        [
            rng.normal(
                loc=rng.normal(size=n_features) * 3, size=(per_cluster, n_features)
            )
            for _ in range(n_clusters)
        ]
    )
    rng.shuffle(X)
    return X


def all_codebooks(est):
    if hasattr(est, "codebooks_"):
        return np.vstack(est.codebooks_)
    return est.codebook_


ESTIMATORS = {
    "vq": lambda: VQCodebookTransformer(n_codes=16, random_state=0),
    "pq": lambda: ProductVQTransformer(n_codes=16, n_subspaces=4, random_state=0),
    "rvq": lambda: ResidualVQTransformer(n_codes=16, n_stages=3, random_state=0),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_twenty_stream_steps_on_dask_equal_numpy_with_relocation(scheduler, name):
    X = clustered()
    chunkings = (100, 77) if scheduler == "threads" else (77,)
    for chunks in chunkings:
        eager, lazy = ESTIMATORS[name](), ESTIMATORS[name]()
        for i in range(20):
            batch = X[(i * 300) % 5700 : (i * 300) % 5700 + 300]
            eager.partial_fit(batch)
            lazy.partial_fit(da.from_array(batch, chunks=(chunks, -1)))
        views = eager.quantizers_ if name != "vq" else [eager]
        assert sum(q.n_codes_relocated_ for q in views) > 0
        assert_allclose(all_codebooks(lazy), all_codebooks(eager), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_fit_on_dask_is_the_numpy_fit_over_several_stages(scheduler, name):
    # batch_size=100: stages of 3,200, 6,400 and 6,000 rows; the stages hold
    # the same rows whatever the chunks, so the fits are the same.
    X = clustered()
    eager = ESTIMATORS[name]().set_params(batch_size=100).fit(X)
    lazy = ESTIMATORS[name]().set_params(batch_size=100)
    lazy.fit(da.from_array(X, chunks=(1300, -1)))
    assert eager.n_iter_ == lazy.n_iter_
    # Sums over chunks round differently; the residual quantiser's joint
    # least-squares solve amplifies that to about 1e-9 of its code books.
    scale = np.abs(all_codebooks(eager)).max()
    assert_allclose(
        all_codebooks(lazy), all_codebooks(eager), rtol=0, atol=1e-8 * scale
    )
    assert lazy.score(X) == pytest.approx(eager.score(X), rel=1e-9)


@pytest.mark.parametrize("Estimator", [ProductVQTransformer, ResidualVQTransformer])
def test_compress_on_dask_is_lazy_and_equals_numpy(scheduler, Estimator):
    X = data(2000)
    est = Estimator(8, 3, random_state=0).fit(X)
    codes = est.compress(da.from_array(X, chunks=(300, 6)))
    assert isinstance(codes, da.Array) and codes.dtype == np.uint8
    assert_array_equal(codes.compute(), est.compress(X))


def test_a_dask_fit_takes_at_most_two_tasks_per_chunk_per_step():
    from skvq._dask import dask_source
    from skvq._schedule import FitSchedule, run
    from skvq._state import TrainingConfig

    X = da.from_array(clustered(), chunks=(400, -1))
    config = TrainingConfig(n_codes=32, batch_size=100)
    with dask.config.set(scheduler="threads"):
        source = dask_source(X, None, n_jobs=1, batch_size=100, n_codes=32, fit=True)
        outcome = run(
            source, FitSchedule(config, source, np.random.RandomState(0)).run()
        )
    n_chunks = len(X.chunks[0])
    assert source.n_tasks <= 2 * n_chunks * outcome.n_iter
