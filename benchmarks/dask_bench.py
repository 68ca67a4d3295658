"""Out-of-core fit on Dask: throughput with 1 and 2 workers, client memory.

Writes a float32 Gaussian-mixture dataset to a chunked zarr array on disk
(larger than the memory of one chunk by a factor ``n_chunks``), then fits
:class:`skvq.VQCodebookTransformer` on it through a ``distributed``
``LocalCluster`` of worker processes on 127.0.0.1, and reports rows per
second (steps x rows / time: with at most ``32 * batch`` rows, ``fit`` has one
stage and each of its steps reads every row) and the peak resident memory of
the client process above its level before the fit.  A NumPy fit of the same rows held in
memory is the reference.

    pip install -e ".[bench,dask]"
    python benchmarks/dask_bench.py [--rows 2000000] [--chunk 50000]
"""

import argparse
import logging
import os
import tempfile
import threading
import time
import warnings

import dask.array as da
import numpy as np
import psutil
from distributed import Client, LocalCluster
from sklearn.datasets import make_blobs

from skvq import VQCodebookTransformer


def write_dataset(path, n_rows, n_features, chunk):
    """Write the data chunk by chunk, never holding more than one in memory."""
    import zarr

    store = zarr.open(
        path,
        mode="w",
        shape=(n_rows, n_features),
        chunks=(chunk, n_features),
        dtype="float32",
    )
    centers = np.random.RandomState(0).uniform(-10, 10, size=(64, n_features))
    for start in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - start)
        X, _ = make_blobs(rows, centers=centers, random_state=start)
        store[start : start + rows] = X.astype(np.float32)
    return store


class PeakRSS:
    """Samples the resident memory of this process in a background thread."""

    def __enter__(self):
        self.process = psutil.Process(os.getpid())
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def mib(self):
        return (self.peak - self.base) / 2**20


def model(args):
    return VQCodebookTransformer(
        n_codes=args.codes,
        batch_size=args.batch,
        max_iter=args.passes,
        tol=0,
        max_no_improvement=None,
        random_state=0,
    )


def main():
    parser = argparse.ArgumentParser(description="skvq on Dask, out of core")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=200_000, help="rows per EMA step")
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument(
        "--passes", type=int, default=2, help="steps of fit, each over all rows"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.zarr")
        write_dataset(path, args.rows, args.features, args.chunk)
        size = args.rows * args.features * 4
        print(
            f"Dataset: {args.rows} x {args.features} float32 = {size / 2**20:.0f} MiB "
            f"on disk (zarr), chunks of {args.chunk} rows = "
            f"{args.chunk * args.features * 4 / 2**20:.1f} MiB; batch_size={args.batch}"
            f", K={args.codes}, {args.passes} steps of fit, each over all the rows."
        )
        print("\n| run | time (s) | rows/s | client peak RSS (MiB) | distortion |")
        print("|---|---|---|---|---|")
        for n_workers in (1, 2):
            with (
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                ) as cluster,
                Client(cluster),
            ):
                X = da.from_zarr(path)
                vq = model(args)
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    vq.fit(X)
                    elapsed = time.perf_counter() - start
                distortion = float(-vq.score(X).compute())
            rate = args.rows * vq.n_iter_ / elapsed
            print(
                f"| Dask, {n_workers} worker{'s' if n_workers > 1 else ''} "
                f"| {elapsed:.1f} | {rate:,.0f} | {rss.mib:.0f} | {distortion:.4g} |"
            )
        X = da.from_zarr(path).compute()
        vq = model(args)
        with PeakRSS() as rss:
            start = time.perf_counter()
            vq.fit(X)
            elapsed = time.perf_counter() - start
        rate = args.rows * vq.n_iter_ / elapsed
        print(
            f"| NumPy, in memory | {elapsed:.1f} | {rate:,.0f} | {rss.mib:.0f} "
            f"| {-vq.score(X):.4g} |"
        )


if __name__ == "__main__":
    main()
