"""Benchmark skvq against its peers, measured in the same run.

Every timing is the best of ``--repeat`` interleaved rounds (each round runs
every contender once, in turn), so slow phases of a noisy machine hit all
contenders alike.  Ratios are skvq's time over the peer's time (below 1: skvq
is faster) or, for throughput, skvq's over the peer's (above 1: faster).

    pip install -e ".[bench]"
    python benchmarks/bench.py [--repeat 5] [--quick]

Sections: 1. encode; 2. partial_fit throughput; 3. fit time and distortion;
4. peak memory of predict under ``working_memory``.
"""

import argparse
import os
import platform
import time
import tracemalloc
import warnings
from functools import partial

import numpy as np
import scipy
import sklearn
from scipy.cluster.vq import vq
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import load_digits, load_sample_image, make_blobs
from threadpoolctl import threadpool_info

import skvq
from skvq import VQCodebookTransformer

try:
    import faiss
except ImportError:  # optional peer
    faiss = None


def interleaved_best(contenders, repeat, pause=0.25):
    """Best time in seconds of each callable, over interleaved rounds.

    The order rotates every round, and a pause between calls lets OpenMP
    worker threads left spinning by one contender (faiss, scikit-learn) go
    idle before the next one is timed.
    """
    names = list(contenders)
    best = {name: np.inf for name in names}
    for round_ in range(repeat):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(pause)
            start = time.perf_counter()
            contenders[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def mixture(n_samples, n_features, seed=0):
    X, _ = make_blobs(
        n_samples=n_samples, n_features=n_features, centers=64, random_state=seed
    )
    return X.astype(np.float32)


def machine():
    blas = ", ".join(
        f"{i['internal_api']} {i.get('version', '')} ({i['num_threads']} threads)"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    )
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"NumPy {np.__version__}, SciPy {scipy.__version__}, scikit-learn "
        f"{sklearn.__version__}, skvq {skvq.__version__}; BLAS: {blas}"
    )


def fitted_codebook(X, n_codes):
    return VQCodebookTransformer(n_codes=n_codes, random_state=0, max_iter=2).fit(X)


def encode_case(n_samples, n_features, n_codes, repeat):
    X = mixture(n_samples, n_features)
    vqt = fitted_codebook(X[:20_000], n_codes).set_params(n_jobs=-1)
    E = vqt.codebook_
    mbk = MiniBatchKMeans(n_clusters=n_codes, init=E, n_init=1, max_iter=1)
    mbk.fit(E)
    mbk.cluster_centers_ = E.copy()
    contenders = {
        "skvq": lambda: vqt.predict(X),
        "mbk": lambda: mbk.predict(X),
        "vq": lambda: vq(X, E, check_finite=True),
        "matmul": lambda: X @ E.T,
    }
    if faiss is not None:
        index = faiss.IndexFlatL2(n_features)
        index.add(E)
        contenders["faiss"] = lambda: index.search(X, 1)
    t = interleaved_best(contenders, repeat)
    ms = {k: 1e3 * v for k, v in t.items()}
    faiss_ms = f"{ms['faiss']:.1f}" if "faiss" in ms else "n/a"
    faiss_ratio = f"{t['skvq'] / t['faiss']:.2f}" if "faiss" in t else "n/a"
    print(
        f"| {n_features} | {ms['skvq']:.1f} | {ms['mbk']:.1f} | {ms['vq']:.1f} "
        f"| {faiss_ms} | {ms['matmul']:.1f} | {t['skvq'] / t['mbk']:.2f} "
        f"| {t['skvq'] / t['vq']:.2f} | {faiss_ratio} "
        f"| {t['skvq'] / t['matmul']:.2f} |"
    )
    agree = np.mean(vqt.predict(X) == mbk.predict(X))
    if agree < 1:
        print(f"  (codes agree with MBK on {100 * agree:.3f}% of rows: near ties)")


def bench_encode(n_samples, n_codes, repeat):
    print(f"\n## 1. Encode {n_samples} float32 rows, K={n_codes}")
    print("\nTimes in ms; ratio = skvq time / peer time.")
    print(
        "\n| C | skvq predict | MBK.predict | scipy vq | faiss | X @ E.T "
        "| vs MBK | vs vq | vs faiss | vs X @ E.T |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_features in (64, 3):
        encode_case(n_samples, n_features, n_codes, repeat)


def partial_fit_case(n_features, n_codes, batch_size, n_batches, repeat):
    X = mixture(batch_size * n_batches, n_features, seed=1)
    batches = np.split(X, n_batches)
    init = X[np.random.RandomState(0).choice(X.shape[0], n_codes, replace=False)]
    models = {
        "skvq": VQCodebookTransformer(n_codes=n_codes, init=init),
        "mbk": MiniBatchKMeans(n_clusters=n_codes, init=init, n_init=1),
    }
    for model in models.values():  # initialise outside the timing
        model.partial_fit(batches[0])

    def stream(model):
        for batch in batches:
            model.partial_fit(batch)

    t = interleaved_best(
        {name: partial(stream, model) for name, model in models.items()}, repeat
    )
    rate = {k: n_batches / v for k, v in t.items()}
    print(
        f"| {n_features} | {rate['skvq']:.0f} | {rate['mbk']:.0f} "
        f"| {rate['skvq'] / rate['mbk']:.2f} |"
    )


def bench_partial_fit(n_codes, batch_size, n_batches, repeat):
    print(f"\n## 2. partial_fit throughput, batches of {batch_size}, K={n_codes}")
    print("\n| C | skvq batches/s | MBK batches/s | skvq / MBK |")
    print("|---|---|---|---|")
    for n_features in (64, 3):
        partial_fit_case(n_features, n_codes, batch_size, n_batches, repeat)


def fit_case(name, X, n_codes, repeat):
    models = {
        "skvq": VQCodebookTransformer(n_codes=n_codes, random_state=0),
        "km": KMeans(n_clusters=n_codes, n_init=1, random_state=0),
        "mbk": MiniBatchKMeans(n_clusters=n_codes, n_init=1, random_state=0),
    }
    t = interleaved_best({n: partial(m.fit, X) for n, m in models.items()}, repeat)
    dist = {"skvq": -models["skvq"].score(X)}
    for peer in ("km", "mbk"):  # their score is minus the total inertia
        dist[peer] = -models[peer].score(X) / X.shape[0]
    print(
        f"| {name} | {n_codes} | {t['skvq']:.2f} | {t['km']:.2f} | {t['mbk']:.2f} "
        f"| {dist['skvq']:.4g} | {dist['skvq'] / dist['km']:.3f} "
        f"| {dist['skvq'] / dist['mbk']:.3f} |"
    )


def bench_fit(repeat):
    print("\n## 3. fit at default settings")
    print("\nTime in s; distortion = mean squared distance to the nearest code.")
    print(
        "\n| data | K | skvq time | KMeans time | MBK time | skvq distortion "
        "| vs KMeans | vs MBK |"
    )
    print("|---|---|---|---|---|---|---|---|")
    pixels = (load_sample_image("china.jpg").reshape(-1, 3) / 255).astype(np.float32)
    rows = np.random.RandomState(0).choice(pixels.shape[0], 50_000, replace=False)
    fit_case("load_digits", load_digits().data, 32, repeat)
    fit_case("china.jpg 50k px", pixels[rows], 64, repeat)


def bench_memory(n_samples, n_codes, working_memory):
    print(
        f"\n## 4. Peak memory of predict, n={n_samples}, K={n_codes}, C=64, "
        f"working_memory={working_memory} MB"
    )
    X = mixture(n_samples, 64)
    vqt = fitted_codebook(X[:20_000], n_codes)
    full = n_samples * n_codes * X.itemsize
    tracemalloc.start()
    with sklearn.config_context(working_memory=working_memory):
        for n_jobs in (None, -1):
            vqt.set_params(n_jobs=n_jobs)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            codes = vqt.predict(X)
            peak = tracemalloc.get_traced_memory()[1] - base
            print(
                f"\n- n_jobs={n_jobs}: peak {peak / 2**20:.1f} MiB (output "
                f"{codes.nbytes / 2**20:.1f} MiB) = {100 * peak / full:.2f}% of the "
                f"full float32 distance matrix ({full / 2**20:.0f} MiB)"
            )
    tracemalloc.stop()


def main():
    parser = argparse.ArgumentParser(description="skvq benchmarks")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke test")
    parser.add_argument("--only", nargs="+", type=int, choices=[1, 2, 3, 4])
    args = parser.parse_args()
    sections = set(args.only or [1, 2, 3, 4])
    n = 20_000 if args.quick else 200_000
    print(f"Machine: {machine()}")
    print(f"faiss: {'installed' if faiss is not None else 'not installed'}")
    warnings.simplefilter("ignore", UserWarning)
    if 1 in sections:
        bench_encode(n, 256, args.repeat)
    if 2 in sections:
        bench_partial_fit(256, 1024, 20 if args.quick else 100, args.repeat)
    if 3 in sections:
        bench_fit(1 if args.quick else min(args.repeat, 3))
    if 4 in sections:
        bench_memory(n, 512 if args.quick else 4096, 64)


if __name__ == "__main__":
    main()
