"""Sparse input: skvq against KMeans and MiniBatchKMeans on TF-IDF-like rows.

The data: documents drawn from a topic model (each document picks one of
``--topics`` topics and draws 88 words from that topic's Zipf distribution
over a random part of the vocabulary), as counts, then ``TfidfTransformer``
(rows L2-normalised); 200,000 x 20,000 at about 0.25 % density by default.
Every contender runs at its default parameters (``random_state`` aside),
``n_codes = n_clusters = 100``; ``KMeans`` with ``n_init=1``.

Reported, in one run: ``fit`` time and distortion (mean squared distance of
the training rows to their code, computed the same way for all), ``predict``
time (best of ``--repeat`` interleaved rounds), ``partial_fit`` throughput at
batches of 1,024 rows (best of ``2 * --repeat`` interleaved rounds, and the
median of the per-round ratios), and the peak traced memory
(``tracemalloc``) of skvq's ``fit`` and ``predict`` against the size of the
matrix.

    python benchmarks/sparse_bench.py [--quick] [--repeat 3]
"""

import argparse
import time
import tracemalloc
import warnings

import numpy as np
from bench import interleaved_best, machine
from scipy import sparse
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.feature_extraction.text import TfidfTransformer

from skvq import VQCodebookTransformer

N_CODES = 100
BATCH = 1024
WORDS_PER_DOC = 88
# Each topic's words: a random share of the vocabulary, Zipf-weighted.
TOPIC_VOCABULARY = 0.05
ZIPF = 1.1


def tfidf_documents(n_docs, n_terms, n_topics, seed=0):
    """A CSR TF-IDF matrix of ``n_docs`` topic-model documents."""
    rng = np.random.default_rng(seed)
    per_topic = max(10, int(TOPIC_VOCABULARY * n_terms))
    vocab = np.stack([rng.permutation(n_terms)[:per_topic] for _ in range(n_topics)])
    ranks = np.arange(1, per_topic + 1) ** -ZIPF
    cumulative = np.cumsum(ranks / ranks.sum())
    topic = rng.integers(n_topics, size=n_docs)
    draws = np.searchsorted(cumulative, rng.random((n_docs, WORDS_PER_DOC)))
    draws = np.minimum(draws, per_topic - 1)
    words = vocab[topic[:, None], draws]
    rows = np.repeat(np.arange(n_docs), WORDS_PER_DOC)
    counts = sparse.csr_matrix(
        (np.ones(rows.shape[0]), (rows, words.ravel())), shape=(n_docs, n_terms)
    )
    counts.sum_duplicates()
    return TfidfTransformer().fit_transform(counts).tocsr()


def distortion(X, labels, centers):
    """Mean ``||x - c||^2`` of the rows and their centers, one formula for all."""
    centers = np.asarray(centers, dtype=np.float64)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    x_sq = np.bincount(rows, X.data * X.data, X.shape[0])
    dots = np.bincount(rows, X.data * centers[labels[rows], X.indices], X.shape[0])
    c_sq = np.einsum("ij,ij->i", centers, centers)[labels]
    return float(np.mean(np.maximum(x_sq - 2 * dots + c_sq, 0.0)))


def contenders():
    return {
        "skvq": lambda: VQCodebookTransformer(N_CODES, random_state=0),
        "KMeans(n_init=1)": lambda: KMeans(N_CODES, n_init=1, random_state=0),
        "MiniBatchKMeans": lambda: MiniBatchKMeans(N_CODES, random_state=0),
    }


def centers_of(model):
    return getattr(model, "codebook_", getattr(model, "cluster_centers_", None))


def bench_fit(X):
    print("\n| contender | fit (s) | distortion | vs KMeans | n_iter |")
    print("|---|---|---|---|---|")
    fitted, rows = {}, {}
    for name, make in contenders().items():
        model = make()
        time.sleep(0.5)
        start = time.perf_counter()
        model.fit(X)
        seconds = time.perf_counter() - start
        fitted[name] = model
        rows[name] = (seconds, distortion(X, model.predict(X), centers_of(model)))
        print(f"<!-- {name}: fit {seconds:.2f} s, distortion {rows[name][1]:.5f} -->")
    reference = rows["KMeans(n_init=1)"][1]
    for name, (seconds, value) in rows.items():
        n_iter = getattr(fitted[name], "n_iter_", "")
        print(
            f"| {name} | {seconds:.2f} | {value:.5f} | {value / reference:.4f} "
            f"| {n_iter} |"
        )
    ratio = rows["skvq"][0] / rows["KMeans(n_init=1)"][0]
    print(f"\nfit time skvq / KMeans: {ratio:.2f}")
    return fitted


def bench_predict(X, fitted, repeat):
    best = interleaved_best(
        {
            "skvq": lambda: fitted["skvq"].predict(X),
            "MiniBatchKMeans": lambda: fitted["MiniBatchKMeans"].predict(X),
        },
        repeat,
    )
    print(
        f"\npredict ({X.shape[0]:,} rows): skvq {best['skvq']:.3f} s, "
        f"MiniBatchKMeans {best['MiniBatchKMeans']:.3f} s, "
        f"ratio {best['skvq'] / best['MiniBatchKMeans']:.2f}"
    )


def bench_partial_fit(X, n_batches, repeat):
    """Throughput of a 50-batch stream, in interleaved rounds (the order
    alternating): the best time of each, and the median of the per-round
    ratios, which a drifting machine moves less."""
    batches = [X[i * BATCH : (i + 1) * BATCH] for i in range(n_batches)]
    makers = {
        "skvq": lambda: VQCodebookTransformer(N_CODES, random_state=0),
        "MiniBatchKMeans": lambda: MiniBatchKMeans(N_CODES, random_state=0),
    }
    best = dict.fromkeys(makers, np.inf)
    ratios = []
    for round_ in range(2 * repeat):
        seconds = {}
        for name in list(makers)[:: 1 if round_ % 2 else -1]:
            model = makers[name]()
            time.sleep(0.25)
            start = time.perf_counter()
            for batch in batches:
                model.partial_fit(batch)
            seconds[name] = time.perf_counter() - start
            best[name] = min(best[name], seconds[name])
        ratios.append(seconds["MiniBatchKMeans"] / seconds["skvq"])
    rows = n_batches * BATCH
    low, median, high = np.percentile(ratios, [25, 50, 75])
    print(
        f"\npartial_fit, {n_batches} batches of {BATCH}: skvq "
        f"{rows / best['skvq']:,.0f} rows/s, MiniBatchKMeans "
        f"{rows / best['MiniBatchKMeans']:,.0f} rows/s (best of {len(ratios)}), "
        f"ratio {best['MiniBatchKMeans'] / best['skvq']:.2f}; per round: median "
        f"{median:.2f} (quartiles {low:.2f}-{high:.2f})"
    )


def bench_memory(X):
    size = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    codebook = N_CODES * X.shape[1] * 8
    tracemalloc.start()
    model = VQCodebookTransformer(N_CODES, random_state=0).fit(X)
    fit_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    model.predict(X)
    predict_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"\npeak traced memory: matrix {size / 2**20:.0f} MiB, code book "
        f"{codebook / 2**20:.1f} MiB; fit {fit_peak / 2**20:.0f} MiB "
        f"({fit_peak / (size + codebook):.2f} x matrix + code book), predict "
        f"{predict_peak / 2**20:.0f} MiB ({predict_peak / (size + codebook):.2f} x)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--terms", type=int, default=20_000)
    parser.add_argument("--topics", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    n_rows = 20_000 if args.quick else args.rows
    X = tfidf_documents(n_rows, args.terms, args.topics)
    print(f"# Sparse input on {machine()}")
    print(
        f"TF-IDF-like CSR: {X.shape[0]:,} x {X.shape[1]:,}, density "
        f"{X.nnz / (X.shape[0] * X.shape[1]):.3%}, {X.dtype}; n_codes={N_CODES}"
    )
    fitted = bench_fit(X)
    bench_predict(X, fitted, args.repeat)
    bench_partial_fit(X, min(50, X.shape[0] // BATCH), args.repeat)
    bench_memory(X)


if __name__ == "__main__":
    main()
