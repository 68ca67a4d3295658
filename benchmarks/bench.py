"""Benchmark skvq against its peers, measured in the same run.

Every timing is the best of ``--repeat`` interleaved rounds (each round runs
every contender once, in turn), so slow phases of a noisy machine hit all
contenders alike.  Ratios are skvq's time over the peer's time (below 1: skvq
is faster) or, for throughput, skvq's over the peer's (above 1: faster).

    pip install -e ".[bench]"
    python benchmarks/bench.py [--repeat 5] [--quick]

Sections: 0. the floor (one thread: the bare product, skvq's search);
1. encode; 2. partial_fit throughput; 3. fit time and distortion;
4. peak memory of predict under ``working_memory``; 5. thread scaling.
Every contender runs at its default parameters (``random_state`` aside).
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
from threadpoolctl import threadpool_info, threadpool_limits

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


def mixture(n_samples, n_features, seed=0, centers=64):
    X, _ = make_blobs(
        n_samples=n_samples, n_features=n_features, centers=centers, random_state=seed
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
    vqt = fitted_codebook(X[:20_000], n_codes)  # default n_jobs: all cores
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


def floor_case(n_samples, n_features, n_codes, repeat):
    """One thread: skvq's brute search against the bare product, same blocks."""
    from skvq._search import _BLOCK_ELEMENTS, CodebookIndex

    X = mixture(n_samples, n_features)
    codes = fitted_codebook(X[:20_000], n_codes).codebook_
    index = CodebookIndex(codes, "brute")
    block = max(16, _BLOCK_ELEMENTS // n_codes)
    product = np.ascontiguousarray(codes.T)
    out = np.empty((block, n_codes), dtype=np.float32)

    def bare():
        for start in range(0, n_samples, block):
            rows = X[start : start + block]
            np.matmul(rows, product, out=out[: rows.shape[0]])

    def argmin():
        for start in range(0, n_samples, block):
            rows = X[start : start + block]
            np.matmul(rows, product, out=out[: rows.shape[0]])
            out[: rows.shape[0]].argmin(axis=1)

    with threadpool_limits(limits=1):
        t = interleaved_best(
            {
                "product": bare,
                "argmin": argmin,
                "search": lambda: index.nearest(X, n_jobs=1),
            },
            repeat,
        )
    print(
        f"| {n_codes} | {n_features} | {1e3 * t['product']:.1f} "
        f"| {1e3 * t['argmin']:.1f} | {1e3 * t['search']:.1f} "
        f"| {t['search'] / t['product']:.2f} | {t['search'] / t['argmin']:.2f} |"
    )


def bench_floor(n_samples, repeat):
    print(f"\n## 0. The floor: one thread, {n_samples} float32 rows")
    print(
        "\nTimes in ms over the same cache-sized blocks: the bare float32 "
        "product, the product and one argmin, skvq's exact brute search "
        "(from 64 codes down, its scores are laid out code by code)."
    )
    print(
        "\n| K | C | product | product + argmin | skvq search "
        "| search / product | search / (product + argmin) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n_codes in (256, 32):
        for n_features in (64, 3):
            floor_case(n_samples, n_features, n_codes, repeat)


def partial_fit_case(n_features, n_codes, batch_size, n_batches, repeat):
    X = mixture(batch_size * n_batches, n_features, seed=1)
    batches = np.split(X, n_batches)
    init = X[np.random.RandomState(0).choice(X.shape[0], n_codes, replace=False)]
    models = {
        "skvq": VQCodebookTransformer(n_codes=n_codes, init=init),
        "mbk": MiniBatchKMeans(n_clusters=n_codes, init=init, n_init=1),
        "skvq, plain EMA": VQCodebookTransformer(
            n_codes=n_codes, init=init, dead_code_threshold=0, relocate=False
        ),
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
    off = rate["skvq, plain EMA"]
    print(
        f"| {batch_size} | {n_features} | {rate['skvq']:.0f} | {rate['mbk']:.0f} "
        f"| {rate['skvq'] / rate['mbk']:.2f} | {off:.0f} | {off / rate['mbk']:.2f} "
        f"| {models['skvq'].n_codes_reassigned_} "
        f"| {models['skvq'].n_codes_relocated_} |"
    )


def bench_partial_fit(n_codes, n_batches, repeat):
    print(f"\n## 2. partial_fit throughput, K={n_codes}")
    print(
        "\nBatches per second after a first call that initialises both from the "
        "same code book; the plain EMA columns switch skvq's upkeep of the "
        "code book off (`relocate=False, dead_code_threshold=0`)."
    )
    print(
        "\n| batch | C | skvq | MBK | skvq / MBK | skvq, plain EMA "
        "| plain EMA / MBK | codes re-seeded | codes relocated |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch_size in (1024, 256):
        for n_features in (64, 3):
            partial_fit_case(n_features, n_codes, batch_size, n_batches, repeat)


def fit_case(name, X, n_codes, repeat):
    models = {
        "skvq": VQCodebookTransformer(n_codes=n_codes, random_state=0),
        "skvq, no relocation": VQCodebookTransformer(
            n_codes=n_codes, relocate=False, random_state=0
        ),
        "km": KMeans(n_clusters=n_codes, random_state=0),
        "mbk": MiniBatchKMeans(n_clusters=n_codes, random_state=0),
    }
    t = interleaved_best({n: partial(m.fit, X) for n, m in models.items()}, repeat)
    dist = {n: -models[n].score(X) for n in ("skvq", "skvq, no relocation")}
    for peer in ("km", "mbk"):  # their score is minus the total inertia
        dist[peer] = -models[peer].score(X) / X.shape[0]
    for variant in ("skvq", "skvq, no relocation"):
        print(
            f"| {name} | {n_codes} | {variant} | {t[variant]:.3f} | {t['km']:.3f} "
            f"| {t['mbk']:.3f} | {t[variant] / t['km']:.2f} | {dist[variant]:.5g} "
            f"| {dist[variant] / dist['km']:.4f} | {dist[variant] / dist['mbk']:.4f} |"
        )


def bench_fit(repeat, quick=False):
    print("\n## 3. fit at default settings")
    print("\nTime in s; distortion = mean squared distance to the nearest code.")
    print(
        "\n| data | K | skvq | skvq time | KMeans time | MBK time "
        "| time vs KMeans | skvq distortion | vs KMeans | vs MBK |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, X, n_codes in fit_datasets(quick):
        fit_case(name, X, n_codes, repeat)


def fit_datasets(quick=False):
    pixels = (load_sample_image("china.jpg").reshape(-1, 3) / 255).astype(np.float32)
    rows = np.random.RandomState(0).choice(pixels.shape[0], 50_000, replace=False)
    n_mixture = 30_000 if quick else 300_000
    return [
        ("load_digits", load_digits().data, 32),
        ("china.jpg 50k px", pixels[rows], 64),
        (f"{n_mixture} x 32 mixture", mixture(n_mixture, 32, centers=200), 256),
    ]


def bench_scaling(n_samples, repeat, quick):
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores} & set(range(1, cores + 1)))
    print("\n## 5. Thread scaling (threadpool_limits caps every contender)")
    print(
        f"\nencode {n_samples} float32 rows, K=256 (ms), and the fit of the "
        "mixture of section 3 (s)."
    )
    print(
        "\n| threads | skvq C=64 | MBK C=64 | skvq C=3 | MBK C=3 | skvq fit "
        "| KMeans fit |"
    )
    print("|---|---|---|---|---|---|---|")
    encoders = {}
    for n_features in (64, 3):
        X = mixture(n_samples, n_features)
        vqt = fitted_codebook(X[:20_000], 256)
        mbk = MiniBatchKMeans(n_clusters=256, init=vqt.codebook_, n_init=1, max_iter=1)
        mbk.fit(vqt.codebook_)
        mbk.cluster_centers_ = vqt.codebook_.copy()
        encoders[n_features] = (X, vqt, mbk)
    _, X_fit, k_fit = fit_datasets(quick)[-1]
    for n_threads in counts:
        with threadpool_limits(limits=n_threads):
            contenders = {}
            for n_features, (X, vqt, mbk) in encoders.items():
                contenders[f"skvq{n_features}"] = partial(vqt.predict, X)
                contenders[f"mbk{n_features}"] = partial(mbk.predict, X)
            t = interleaved_best(contenders, repeat)
            fits = interleaved_best(
                {
                    "skvq": partial(
                        VQCodebookTransformer(n_codes=k_fit, random_state=0).fit,
                        X_fit,
                    ),
                    "km": partial(KMeans(n_clusters=k_fit, random_state=0).fit, X_fit),
                },
                1,
            )
        print(
            f"| {n_threads} | {1e3 * t['skvq64']:.1f} | {1e3 * t['mbk64']:.1f} "
            f"| {1e3 * t['skvq3']:.1f} | {1e3 * t['mbk3']:.1f} "
            f"| {fits['skvq']:.2f} | {fits['km']:.2f} |"
        )


def bench_memory(n_samples, n_codes, working_memory):
    print(
        f"\n## 4. Peak memory of predict, n={n_samples}, K={n_codes}, C=64, "
        f"working_memory={working_memory} MB"
    )
    X = mixture(n_samples, 64)
    vqt = fitted_codebook(X[:20_000], n_codes)
    full = n_samples * n_codes * X.itemsize
    # The first call builds the code book's search structure, which the
    # fitted estimator keeps: measure the calls after it.
    vqt.predict(X[:1])
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
    parser.add_argument("--only", nargs="+", type=int, choices=[0, 1, 2, 3, 4, 5])
    args = parser.parse_args()
    sections = set(args.only or [0, 1, 2, 3, 4, 5])
    n = 20_000 if args.quick else 200_000
    print(f"Machine: {machine()}")
    print(f"faiss: {'installed' if faiss is not None else 'not installed'}")
    warnings.simplefilter("ignore", UserWarning)
    if 0 in sections:
        bench_floor(n, args.repeat)
    if 1 in sections:
        bench_encode(n, 256, args.repeat)
    if 2 in sections:
        bench_partial_fit(256, 20 if args.quick else 100, args.repeat)
    if 3 in sections:
        bench_fit(1 if args.quick else min(args.repeat, 3), args.quick)
    if 4 in sections:
        bench_memory(n, 512 if args.quick else 4096, 64)
    if 5 in sections:
        bench_scaling(n, 1 if args.quick else min(args.repeat, 3), args.quick)


if __name__ == "__main__":
    main()
