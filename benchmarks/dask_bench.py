"""skvq's fits on Dask against the same fits in NumPy, on the same cores.

For each case the data are generated once, held by a ``distributed``
``LocalCluster`` of ``--workers`` worker processes (one thread each, on
127.0.0.1; default: one per core) as a persisted Dask array with the given
chunks, and fitted with default parameters by the NumPy path (in this
process, on every core) and by the Dask path, in interleaved rounds (best of
``--repeat``).  Printed: both times and their ratio, the ratio of the
distortions (the two fits train on the same rows, stage by stage, so it is 1
to rounding), and the scheduler tasks per chunk per full step of the fit
(``get_task_stream``; the step count is ``n_iter_``).

    pip install -e ".[bench,dask]"
    python benchmarks/dask_bench.py [--repeat 2] [--quick] [--scaling 1 2 4 8]
        [--dask-ml]

``--scaling`` fits the first case with each number of workers (the 16-core
target: 8 workers at least 6 times faster than one).  ``--dask-ml`` adds
dask-ml's ``KMeans`` (its defaults, ``n_clusters=256``) on the first case.
"""

import argparse
import logging
import os
import sys
import time
import warnings

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, get_task_stream, wait
from sklearn.datasets import make_blobs

sys.path.insert(0, os.path.dirname(__file__))
from bench import machine  # noqa: E402

from skvq import (  # noqa: E402
    ProductVQTransformer,
    ResidualVQTransformer,
    VQCodebookTransformer,
)


def mixture(n_rows, n_features=32, n_centers=64, chunk=125_000):
    """A float32 Gaussian mixture, generated chunk by chunk."""
    centers = np.random.RandomState(0).uniform(-10, 10, size=(n_centers, n_features))
    parts = [
        make_blobs(min(chunk, n_rows - start), centers=centers, random_state=start)[0]
        for start in range(0, n_rows, chunk)
    ]
    return np.vstack(parts).astype(np.float32)


def cases(quick):
    scale = 10 if quick else 1
    return [
        (
            "VQ, K=256",
            lambda: VQCodebookTransformer(256, random_state=0),
            2_000_000 // scale,
            125_000 // scale,
        ),
        (
            "ProductVQ, 64 x 4",
            lambda: ProductVQTransformer(64, 4, random_state=0),
            150_000 // scale,
            25_000 // scale,
        ),
        (
            "ResidualVQ, 64 x 4",
            lambda: ResidualVQTransformer(64, 4, random_state=0),
            150_000 // scale,
            25_000 // scale,
        ),
    ]


def cluster(n_workers):
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )


def timed_fit(make, X):
    start = time.perf_counter()
    model = make().fit(X)
    return time.perf_counter() - start, model


def compare(name, make, n_rows, chunk, client, repeat):
    X = mixture(n_rows, chunk=chunk)
    Xd = da.from_array(X, chunks=(chunk, -1)).persist()
    wait(Xd)
    best = {"numpy": np.inf, "dask": np.inf}
    for round_ in range(repeat):
        order = ["numpy", "dask"] if round_ % 2 == 0 else ["dask", "numpy"]
        for backend in order:
            time.sleep(0.5)
            if backend == "numpy":
                elapsed, numpy_model = timed_fit(make, X)
            else:
                with get_task_stream(client) as stream:
                    elapsed, dask_model = timed_fit(make, Xd)
                n_tasks = len(stream.data)
            best[backend] = min(best[backend], elapsed)
    n_chunks = len(Xd.chunks[0])
    per_step = n_tasks / (n_chunks * max(1, dask_model.n_iter_))
    print(
        f"| {name} | {n_rows:,} x 32, {n_chunks} chunks | {best['numpy']:.1f} "
        f"| {best['dask']:.1f} | **{best['dask'] / best['numpy']:.2f}** "
        f"| {dask_model.score(X) / numpy_model.score(X):.6f} | {per_step:.2f} |"
    )
    return X, Xd


def scaling(make, X, chunk, counts):
    print("\n| workers | Dask fit (s) | speed-up over 1 worker |")
    print("|---|---|---|")
    base = None
    for n_workers in counts:
        with cluster(n_workers) as local, Client(local):
            Xd = da.from_array(X, chunks=(chunk, -1)).persist()
            wait(Xd)
            elapsed, _ = timed_fit(make, Xd)
        base = base or elapsed
        print(f"| {n_workers} | {elapsed:.1f} | {base / elapsed:.2f} |")


def dask_ml_kmeans(X, Xd):
    from dask_ml.cluster import KMeans

    start = time.perf_counter()
    model = KMeans(n_clusters=256, random_state=0).fit(Xd)
    elapsed = time.perf_counter() - start
    codes = model.predict(Xd).compute()
    mse = float(np.mean(np.sum((X - model.cluster_centers_[codes]) ** 2, axis=1)))
    skvq = VQCodebookTransformer(256, random_state=0).fit(Xd)
    print(
        f"\ndask-ml KMeans(n_clusters=256): {elapsed:.0f} s, MSE {mse:.4g}; "
        f"skvq on Dask: MSE {-float(skvq.score(X)):.4g}"
    )


def main():
    parser = argparse.ArgumentParser(description="skvq on Dask against NumPy")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows")
    parser.add_argument("--scaling", type=int, nargs="*", default=[])
    parser.add_argument("--dask-ml", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    print(machine())
    print(
        f"\nLocalCluster of {args.workers} worker processes x 1 thread; NumPy on "
        f"{os.cpu_count()} cores; best of {args.repeat} interleaved rounds."
    )
    print(
        "\n| case | data | NumPy fit (s) | Dask fit (s) | Dask / NumPy "
        "| distortion Dask / NumPy | tasks per chunk per step |"
    )
    print("|---|---|---|---|---|---|---|")
    first = None
    with cluster(args.workers) as local, Client(local) as client:
        for name, make, n_rows, chunk in cases(args.quick):
            data = compare(name, make, n_rows, chunk, client, args.repeat)
            first = first or (make, chunk, *data)
        if args.dask_ml:
            dask_ml_kmeans(first[2], first[3])
    if args.scaling:
        scaling(first[0], first[2], first[1], args.scaling)


if __name__ == "__main__":
    main()
