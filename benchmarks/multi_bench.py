"""Multi-codebook quantisers against faiss and nanopq.

Same training rows for everyone, 8 code books of 256 codes (64-bit codes),
relative MSE (mean squared reconstruction error over the total variance) on
held-out rows, training time and encode throughput, on:

- load_digits (64-d; 1,437 training rows, 360 held out);
- 8x8 patches of scikit-learn's two sample images (192-d, 40,000 rows:
  32,000 training, 8,000 held out);
- ``make_low_rank_matrix(60000, 128, effective_rank=16)`` (48,000 / 12,000).

Encode throughput is measured on 100,000 rows (the held-out rows repeated),
best of three calls.

faiss-cpu and nanopq are optional (``pip install faiss-cpu nanopq``); the
contenders that are missing are skipped.

Training is timed once, or, for the contenders whose fit takes under a
second (the small fits, whose times move most between calls), best of five
rounds in which each of them fits once in turn.

With ``--seeds N``, every contender is also fitted with N seeds (skvq's
``random_state``, faiss's ``cp.seed`` from its default 1234, nanopq's
``seed``), and the mean, standard error and range of the held-out errors
are printed, with each skvq quantiser's difference from its faiss peer
seed by seed (mean and standard error): on load_digits one seed's error
moves by a few per cent.

    python benchmarks/multi_bench.py [--quick] [--sets digits patches lowrank]
        [--only PQ ...] [--seeds N]
"""

import argparse
import time
import warnings

import numpy as np
from bench import machine
from sklearn.datasets import load_digits, load_sample_images, make_low_rank_matrix
from sklearn.feature_extraction.image import extract_patches_2d

from skvq import ProductVQTransformer, ResidualVQTransformer, VQCodebookTransformer

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None
try:
    import nanopq
except ImportError:  # pragma: no cover
    nanopq = None

M, NBITS = 8, 8
# Rows of the encode timing (the held-out rows repeated), and its repeats.
ENCODE_ROWS = 100_000
ENCODE_REPEATS = 3
# Fits faster than this (seconds) are timed best of TRAIN_REPEATS rounds,
# interleaved with the other quick contenders.
QUICK_FIT = 1.0
TRAIN_REPEATS = 5
# Seconds of pause between contenders.
PAUSE = 0.5
# faiss's default k-means seed: seed s of --seeds is FAISS_SEED + s.
FAISS_SEED = 1234


def split(X, n_test, seed=0):
    order = np.random.RandomState(seed).permutation(X.shape[0])
    X = np.ascontiguousarray(X[order], dtype=np.float32)
    return X[n_test:], X[:n_test]


def datasets(names, quick=False):
    if "digits" in names:
        yield "load_digits", *split(load_digits().data, 360)
    if "patches" in names:
        rows = 4_000 if quick else 20_000
        patches = [
            extract_patches_2d(image, (8, 8), max_patches=rows, random_state=i)
            for i, image in enumerate(load_sample_images().images)
        ]
        X = np.concatenate(patches).reshape(2 * rows, -1) / 255.0
        yield "8x8x3 patches", *split(X, X.shape[0] // 5)
    if "lowrank" in names:
        n = 12_000 if quick else 60_000
        X = make_low_rank_matrix(n, 128, effective_rank=16, random_state=0)
        yield "low rank 128-d", *split(X, n // 5)


class _Skvq:
    def __init__(self, estimator):
        self.estimator = estimator

    def train(self, X):
        self.estimator.fit(X)

    def encode(self, X):
        return self.estimator.compress(X)

    def decode(self, codes):
        return self.estimator.inverse_transform(codes)


class _FaissPQ:
    def __init__(self, d, seed=0):
        self.pq = faiss.ProductQuantizer(d, M, NBITS)
        self.pq.cp.seed = FAISS_SEED + seed

    def train(self, X):
        self.pq.train(X)

    def encode(self, X):
        return self.pq.compute_codes(X)

    def decode(self, codes):
        return self.pq.decode(codes)


class _FaissRQ(_FaissPQ):
    def __init__(self, d, beam, seed=0):
        self.pq = faiss.ResidualQuantizer(d, M, NBITS)
        self.pq.max_beam_size = beam
        self.pq.cp.seed = FAISS_SEED + seed


class _NanoPQ:
    def __init__(self, seed=0):
        self.pq = nanopq.PQ(M=M, Ks=2**NBITS, verbose=False)
        self.seed = seed

    def train(self, X):
        self.pq.fit(X, seed=self.seed)

    def encode(self, X):
        return self.pq.encode(X)

    def decode(self, codes):
        return self.pq.decode(codes)


def contenders(d, seed=0):
    found = {
        "skvq PQ": lambda: _Skvq(ProductVQTransformer(256, M, random_state=seed)),
        "skvq RVQ beam 1": lambda: _Skvq(
            ResidualVQTransformer(256, M, random_state=seed)
        ),
        "skvq RVQ beam 5": lambda: _Skvq(
            ResidualVQTransformer(256, M, beam_size=5, random_state=seed)
        ),
        "skvq single VQ (8 bits)": lambda: _Skvq(
            _single(VQCodebookTransformer(256, random_state=seed))
        ),
    }
    if faiss is not None:
        found["faiss PQ"] = lambda: _FaissPQ(d, seed)
        found["faiss RQ beam 1"] = lambda: _FaissRQ(d, 1, seed)
        found["faiss RQ beam 5"] = lambda: _FaissRQ(d, 5, seed)
    if nanopq is not None:
        found["nanopq PQ"] = lambda: _NanoPQ(seed)
    return found


def selected(d, only, seed=0):
    """The contenders whose label holds one of the words of ``only`` (all
    without it), made with ``seed``."""
    return {
        label: make
        for label, make in contenders(d, seed).items()
        if not only or any(word in label for word in only)
    }


def relative_error(model, test):
    """Mean squared error of the held-out rows over their total variance."""
    total = float(np.sum(test.var(axis=0)))
    codes = model.encode(test)
    return np.mean(np.sum((test - model.decode(codes)) ** 2, axis=1)) / total


def _single(vq):
    """A one-code-book quantiser with the compress/decode interface."""
    vq.compress = lambda X: vq.predict(X)[:, None]
    vq.inverse_transform = lambda codes: vq.codebook_[np.asarray(codes)[:, 0]]
    return vq


def timed_fit(make, train):
    """A freshly trained contender and its training time."""
    model = make()
    start = time.perf_counter()
    model.train(train)
    return model, time.perf_counter() - start


def trained(makers, train):
    """Every contender trained, with its training time: one fit each, then
    ``TRAIN_REPEATS - 1`` more rounds of the contenders whose fit took under
    ``QUICK_FIT`` seconds, interleaved (each round fits each of them once,
    with a pause between contenders), best time kept."""
    models, times = {}, {}
    for label, make in makers.items():
        models[label], times[label] = timed_fit(make, train)
        time.sleep(PAUSE)
    quick = [label for label, seconds in times.items() if seconds < QUICK_FIT]
    for _ in range(TRAIN_REPEATS - 1):
        for label in quick:
            times[label] = min(times[label], timed_fit(makers[label], train)[1])
            time.sleep(PAUSE)
    return models, times


def run(name, train, test, only=None):
    print(
        f"\n## {name}: {train.shape[0]} training rows, {test.shape[0]} held out, "
        f"{train.shape[1]} features"
    )
    print(
        "\n| contender | relative MSE (held out) | training (s) "
        f"| encode {ENCODE_ROWS:,} rows (rows/s) |"
    )
    print("|---|---|---|---|")
    many = np.ascontiguousarray(np.resize(test, (ENCODE_ROWS, test.shape[1])))
    models, train_times = trained(selected(train.shape[1], only), train)
    for label, model in models.items():
        error = relative_error(model, test)
        encode_time = np.inf
        for _ in range(ENCODE_REPEATS):
            start = time.perf_counter()
            model.encode(many)
            encode_time = min(encode_time, time.perf_counter() - start)
        print(
            f"| {label} | {error:.4f} | {train_times[label]:.3f} "
            f"| {ENCODE_ROWS / encode_time:,.0f} |",
            flush=True,
        )
        time.sleep(PAUSE)


# The faiss contender each skvq contender is compared with, seed by seed.
FAISS_PEER = {
    "skvq PQ": "faiss PQ",
    "skvq RVQ beam 1": "faiss RQ beam 1",
    "skvq RVQ beam 5": "faiss RQ beam 5",
}


def _standard_error(values):
    values = np.asarray(values)
    return values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else np.nan


def run_seeds(train, test, only, n_seeds):
    """The held-out error of every contender over ``n_seeds`` seeds, and
    skvq's difference from its faiss peer seed by seed (mean and standard
    error: a difference within two standard errors is the seed's noise)."""
    print(
        f"\n| contender | relative MSE, mean of {n_seeds} seeds | standard error "
        "| range | minus faiss's, paired |"
    )
    print("|---|---|---|---|---|")
    errors = {}
    for seed in range(n_seeds):
        for label, make in selected(train.shape[1], only, seed).items():
            model = make()
            model.train(train)
            errors.setdefault(label, []).append(relative_error(model, test))
    for label, values in errors.items():
        spread = f"{min(values):.4f}-{max(values):.4f}"
        paired = ""
        peer = errors.get(FAISS_PEER.get(label))
        if peer is not None:
            diff = np.subtract(values, peer)
            paired = f"{diff.mean():+.5f} +- {_standard_error(diff):.5f}"
        print(
            f"| {label} | {np.mean(values):.5f} | {_standard_error(values):.5f} "
            f"| {spread} | {paired} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets")
    parser.add_argument("--sets", nargs="+", default=["digits", "patches", "lowrank"])
    parser.add_argument(
        "--only", nargs="+", help="contenders whose label holds one of these words"
    )
    parser.add_argument(
        "--seeds", type=int, default=0, help="also the errors over this many seeds"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    print(f"# Multi-codebook quantisers on {machine()}")
    print(
        f"faiss: {'installed' if faiss else 'missing'}; "
        f"nanopq: {'installed' if nanopq else 'missing'}"
    )
    for name, train, test in datasets(args.sets, args.quick):
        run(name, train, test, args.only)
        if args.seeds:
            run_seeds(train, test, args.only, args.seeds)


if __name__ == "__main__":
    main()
