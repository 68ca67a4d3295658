"""Measure the kd_tree / brute crossover behind ``algorithm="auto"``.

For each (n_features, n_codes, n_samples) this times ``predict`` with both
backends, interleaved and best-of-N, and prints the ratio kd_tree / brute
(below 1: the k-d tree wins).  Data: float32 Gaussian mixtures.

    python benchmarks/auto_rule.py [--repeat 5] [--n-jobs -1]
"""

import argparse
import time

import numpy as np
from sklearn.datasets import make_blobs

from skvq import VQCodebookTransformer

CENTERS = 64


def timed(func, repeat):
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def crossover(n_features, n_codes, n_samples, repeat, n_jobs):
    X, _ = make_blobs(
        n_samples=max(n_samples, n_codes),
        n_features=n_features,
        centers=CENTERS,
        random_state=0,
    )
    X = X.astype(np.float32)
    codes = X[np.random.RandomState(0).choice(X.shape[0], n_codes, replace=False)]
    query = X[:n_samples]
    models = {
        algorithm: VQCodebookTransformer(
            n_codes=n_codes, init=codes, algorithm=algorithm, n_jobs=n_jobs
        ).partial_fit(codes)
        for algorithm in ("kd_tree", "brute")
    }
    times = {name: np.inf for name in models}
    for _ in range(repeat):  # interleaved rounds
        for name, model in models.items():
            times[name] = min(times[name], timed(lambda m=model: m.predict(query), 1))
    return times["kd_tree"] / times["brute"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n-jobs", type=int, default=-1)
    parser.add_argument(
        "--n-samples", type=int, nargs="+", default=[1024, 8192, 100_000]
    )
    args = parser.parse_args()
    features = [2, 3, 4, 6, 8, 12, 16]
    for n_samples in args.n_samples:
        print(f"\nkd_tree time / brute time, predict on {n_samples} rows")
        print("n_codes  " + "".join(f"C={c:<7}" for c in features))
        for n_codes in (16, 64, 256, 1024, 4096):
            ratios = [
                crossover(c, n_codes, n_samples, args.repeat, args.n_jobs)
                for c in features
            ]
            print(f"{n_codes:<9}" + "".join(f"{r:<9.2f}" for r in ratios))


if __name__ == "__main__":
    main()
