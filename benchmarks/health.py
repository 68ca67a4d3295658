"""Codebook health: relocation and the dead-code rule, measured.

Sections (each prints a Markdown table; ``docs/health.rst`` quotes them):

1. ``fit`` against ``KMeans(n_init=10)`` on load_digits (K=32), 50,000
   china.jpg pixels (K=64) and a mixture of Gaussians of unequal sizes and
   spreads (K=32): distortion and time ratios over 5 seeds, with relocation
   on (default) and off;
2. crowded codes: a stream of two equal clusters, all 16 codes initialised
   in the first, 300 ``partial_fit`` steps of 256 rows;
3. the dead-code rule across batch sizes and code book sizes: a stationary
   64-cluster stream in 16-D, 300 steps, for several thresholds;
4. a bad start: every code in cluster A of a stream where A carries 10 %;
5. the drifting stream of the gallery's drift example (8 clusters in 16-D
   jumping every 100 batches of 512, K=32, momentum 0.9).

    python benchmarks/health.py [--quick]

Run it against an older checkout (``PYTHONPATH=old/ python ...``) for a
before/after comparison; parameters the old release lacks are skipped.
"""

import argparse
import inspect
import time
import warnings

import numpy as np
from bench import machine
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, load_sample_image

from skvq import VQCodebookTransformer

HAS_RELOCATE = "relocate" in inspect.signature(VQCodebookTransformer).parameters


def vq(**params):
    if not HAS_RELOCATE:
        params.pop("relocate", None)
    return VQCodebookTransformer(**params)


# ------------------------------------------------------------------ 1. fit
def unequal_mixture(n_samples=100_000, n_clusters=32, n_features=8, seed=0):
    """Gaussians with Zipf sizes (1/rank) and spreads from 0.2 to 2."""
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-10, 10, size=(n_clusters, n_features))
    weights = 1.0 / np.arange(1, n_clusters + 1)
    spreads = np.exp(rng.uniform(np.log(0.2), np.log(2.0), size=n_clusters))
    labels = rng.choice(n_clusters, size=n_samples, p=weights / weights.sum())
    noise = rng.normal(size=(n_samples, n_features)) * spreads[labels, None]
    return centers[labels] + noise


def fit_datasets():
    pixels = (load_sample_image("china.jpg").reshape(-1, 3) / 255).astype(np.float32)
    pixels = pixels[np.random.RandomState(0).choice(len(pixels), 50_000, replace=False)]
    return [
        ("load_digits", load_digits().data, 32),
        ("china.jpg 50k px", pixels, 64),
        ("unequal mixture 100k x 8", unequal_mixture(), 32),
    ]


def timed(model, X):
    start = time.perf_counter()
    model.fit(X)
    return model, time.perf_counter() - start


def fit_table(seeds):
    print(f"\n## 1. fit against KMeans(n_init=10), seeds 0-{seeds - 1}")
    print(
        "\n| data | K | relocate | distortion / KMeans(n_init=10): mean, max "
        "| time / KMeans(n_init=10): mean | codes relocated (mean) |"
    )
    print("|---|---|---|---|---|---|")
    for name, X, k in fit_datasets():
        km_time, km_dist = [], []
        for seed in range(seeds):  # KMeans(n_init=10) timed once per seed too
            km, t = timed(KMeans(k, n_init=10, random_state=seed), X)
            km_time.append(t)
            km_dist.append(-km.score(X) / X.shape[0])
        km_dist, km_time = np.mean(km_dist), np.median(km_time)
        for relocate in (True, False) if HAS_RELOCATE else (False,):
            ratios, times, moved = [], [], []
            for seed in range(seeds):
                time.sleep(0.2)
                model, t = timed(vq(n_codes=k, relocate=relocate, random_state=seed), X)
                ratios.append(-model.score(X) / km_dist)
                times.append(t / km_time)
                moved.append(getattr(model, "n_codes_relocated_", 0))
            print(
                f"| {name} | {k} | {relocate} | {np.mean(ratios):.4f}, "
                f"{np.max(ratios):.4f} | {np.mean(times):.2f} | {np.mean(moved):.1f} |"
            )


# -------------------------------------------------------------- 2. crowded
def crowded(params, n_steps=300, n_codes=16, batch_size=256, n_features=8, seed=0):
    """Two equal clusters 20 apart; every code starts in the first."""
    rng = np.random.RandomState(seed)
    a, b = np.zeros(n_features), np.full(n_features, 20.0)
    init = a + rng.normal(size=(n_codes, n_features))
    model = vq(n_codes=n_codes, init=init, random_state=0, **params)
    for _ in range(n_steps):
        centers = np.where(rng.rand(batch_size, 1) < 0.5, a, b)
        model.partial_fit(centers + rng.normal(size=(batch_size, n_features)))
    to_b = np.linalg.norm(model.codebook_ - b, axis=1)
    near_b = to_b < np.linalg.norm(model.codebook_ - a, axis=1)
    return int(near_b.sum()), model


def crowded_table():
    print("\n## 2. crowded codes: 16 codes in cluster A of two equal clusters")
    print("\n| relocate | codes serving B after 300 steps | perplexity | relocated |")
    print("|---|---|---|---|")
    for relocate in (True, False) if HAS_RELOCATE else (False,):
        near_b, model = crowded({"relocate": relocate})
        print(
            f"| {relocate} | {near_b} | {model.perplexity_:.1f} "
            f"| {getattr(model, 'n_codes_relocated_', 0)} |"
        )


# ---------------------------------------------------------- 3. dead codes
def stationary(params, batch_size, n_codes, n_steps=300, n_features=16, seed=0):
    """A stationary stream of 64 unit Gaussians; distortion on held-out rows."""
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-10, 10, size=(64, n_features))

    def draw(n):
        return centers[rng.randint(64, size=n)] + rng.normal(size=(n, n_features))

    test = draw(20_000)
    model = vq(n_codes=n_codes, random_state=0, **params)
    for _ in range(n_steps):
        model.partial_fit(draw(batch_size))
    return -model.score(test), model


def threshold_table(thresholds, cases):
    print("\n## 3. stationary stream: distortion (codes re-seeded) per threshold")
    print(
        "\n| batch | K | "
        + " | ".join(f"{t:g}" for t in thresholds)
        + " | relocate=False, threshold 0 |"
    )
    print("|---|---|" + "---|" * (len(thresholds) + 1))
    for batch_size, n_codes in cases:
        cells = []
        for threshold in thresholds:
            dist, model = stationary(
                {"dead_code_threshold": threshold}, batch_size, n_codes
            )
            cells.append(f"{dist:.3f} ({model.n_codes_reassigned_})")
        dist, _ = stationary(
            {"dead_code_threshold": 0, "relocate": False}, batch_size, n_codes
        )
        print(f"| {batch_size} | {n_codes} | " + " | ".join(cells) + f" | {dist:.3f} |")


# ------------------------------------------------------------ 4. bad start
def bad_start(params, n_batches=400, n_codes=64, share_a=0.1, seed=0):
    """Every code starts in cluster A, which carries ``share_a`` of the stream."""
    rng = np.random.RandomState(seed)
    a, b = np.zeros(8), np.full(8, 20.0)
    init = a + rng.normal(size=(n_codes, 8))
    model = vq(n_codes=n_codes, init=init, random_state=0, **params)
    for _ in range(n_batches):
        centers = np.where(rng.rand(256, 1) < share_a, a, b)
        model.partial_fit(centers + rng.normal(size=(256, 8)))
    to_b = np.linalg.norm(model.codebook_ - b, axis=1)
    near_b = to_b < np.linalg.norm(model.codebook_ - a, axis=1)
    return int(near_b.sum()), model


def bad_start_table(thresholds):
    print("\n## 4. bad start: 64 codes in cluster A (10 % of the stream)")
    print("\n| threshold | relocate | codes near B after 400 batches | perplexity |")
    print("|---|---|---|---|")
    for threshold in thresholds:
        for relocate in (True, False) if HAS_RELOCATE else (False,):
            near_b, model = bad_start(
                {"dead_code_threshold": threshold, "relocate": relocate}
            )
            print(
                f"| {threshold:g} | {relocate} | {near_b} | {model.perplexity_:.1f} |"
            )


# -------------------------------------------------------------- 5. drift
def drifting_stream(n_batches=600, batch_size=512, n_features=16, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-10, 10, size=(8, n_features))
    for t in range(n_batches):
        if t and t % 100 == 0:
            centers = rng.uniform(-10, 10, size=(8, n_features))
        labels = rng.randint(8, size=batch_size)
        yield centers[labels] + rng.normal(size=(batch_size, n_features))


def drift_table(thresholds):
    print("\n## 5. drifting stream (K=32, momentum 0.9)")
    print(
        "\n| threshold | relocate | mean distortion | final perplexity "
        "| re-seeded | relocated |"
    )
    print("|---|---|---|---|---|---|")
    for threshold in thresholds:
        for relocate in (True, False) if HAS_RELOCATE else (False,):
            model = vq(
                n_codes=32,
                ema_momentum=0.9,
                dead_code_threshold=threshold,
                relocate=relocate,
                random_state=0,
            )
            losses = []
            for batch in drifting_stream():
                if hasattr(model, "codebook_"):
                    losses.append(-model.score(batch))
                model.partial_fit(batch)
            print(
                f"| {threshold:g} | {relocate} | {np.mean(losses):.2f} "
                f"| {model.perplexity_:.1f} | {model.n_codes_reassigned_} "
                f"| {getattr(model, 'n_codes_relocated_', 0)} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument(
        "--sections", default="12345", help="which sections to run, e.g. 135"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    print(f"# skvq codebook health on {machine()}")
    thresholds = [0.0, 0.01, 0.05, 0.1, 0.2] if HAS_RELOCATE else [0.0, 0.5]
    cases = [(64, 256), (256, 256), (4096, 256), (65536, 8), (256, 4096)]
    if args.quick:
        cases = cases[1:3]
    sections = {
        "1": lambda: fit_table(2 if args.quick else 5),
        "2": crowded_table,
        "3": lambda: threshold_table(thresholds, cases),
        "4": lambda: bad_start_table(thresholds),
        "5": lambda: drift_table(thresholds),
    }
    for key in args.sections:
        sections[key]()


if __name__ == "__main__":
    main()
