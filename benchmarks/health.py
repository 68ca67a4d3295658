"""Codebook health: distortion and perplexity against ``dead_code_threshold``.

Measures, for several thresholds (0 disables reassignment):

1. ``fit`` on load_digits (K=32 and K=256) and on 50,000 pixels of china.jpg
   (K=64 and K=256): final distortion and perplexity;
2. a drifting stream (``partial_fit``, 8 Gaussian clusters in 16-D that jump
   to new places every 100 batches): distortion on each incoming batch,
   averaged over the stream, and the final perplexity;
3. a bad start: every code in cluster A of a stream where A carries 10 %.

    python benchmarks/health.py
"""

import warnings

import numpy as np
from sklearn.datasets import load_digits, load_sample_image

from skvq import VQCodebookTransformer

THRESHOLDS = [0.0, 0.01, 0.1, 0.5, 1.0, 2.0]


def fit_table():
    pixels = (load_sample_image("china.jpg").reshape(-1, 3) / 255).astype(np.float32)
    pixels = pixels[np.random.RandomState(0).choice(len(pixels), 50_000, replace=False)]
    digits = load_digits().data
    cases = [("digits", digits, 32), ("digits", digits, 256)]
    cases += [("china", pixels, 64), ("china", pixels, 256)]
    print("\n## fit: distortion (perplexity) per dead_code_threshold")
    print("\n| data | K | " + " | ".join(f"{t:g}" for t in THRESHOLDS) + " |")
    print("|---|---|" + "---|" * len(THRESHOLDS))
    for name, X, k in cases:
        cells = []
        for threshold in THRESHOLDS:
            vq = VQCodebookTransformer(
                n_codes=k, dead_code_threshold=threshold, random_state=0
            ).fit(X)
            cells.append(f"{-vq.score(X):.4g} ({vq.perplexity_:.0f})")
        print(f"| {name} | {k} | " + " | ".join(cells) + " |")


def drifting_stream(n_batches=600, batch_size=512, n_features=16, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-10, 10, size=(8, n_features))
    for t in range(n_batches):
        if t and t % 100 == 0:
            centers = rng.uniform(-10, 10, size=(8, n_features))
        labels = rng.randint(8, size=batch_size)
        yield centers[labels] + rng.normal(size=(batch_size, n_features))


def stream_table():
    print(
        "\n## drifting stream (K=32, momentum 0.9): mean batch distortion, perplexity"
    )
    print("\n| threshold | mean distortion | final perplexity | codes reassigned |")
    print("|---|---|---|---|")
    for threshold in THRESHOLDS:
        vq = VQCodebookTransformer(
            n_codes=32, ema_momentum=0.9, dead_code_threshold=threshold, random_state=0
        )
        losses = []
        for batch in drifting_stream():
            if hasattr(vq, "codebook_"):
                losses.append(-vq.score(batch))
            vq.partial_fit(batch)
        print(
            f"| {threshold:g} | {np.mean(losses):.3f} | {vq.perplexity_:.1f} "
            f"| {vq.n_codes_reassigned_} |"
        )


def bad_start(threshold, n_batches=400, n_codes=64, share_a=0.1, seed=0):
    """Every code starts in cluster A, which carries ``share_a`` of the stream."""
    rng = np.random.RandomState(seed)
    a, b = np.zeros(8), np.full(8, 20.0)
    vq = VQCodebookTransformer(
        n_codes=n_codes,
        init=a + rng.normal(size=(n_codes, 8)),
        dead_code_threshold=threshold,
        random_state=0,
    )
    perplexity_start = None
    for _ in range(n_batches):
        centers = np.where(rng.rand(256, 1) < share_a, a, b)
        vq.partial_fit(centers + rng.normal(size=(256, 8)))
        perplexity_start = perplexity_start or vq.perplexity_
    near_b = np.linalg.norm(vq.codebook_ - b, axis=1) < np.linalg.norm(
        vq.codebook_ - a, axis=1
    )
    return int(near_b.sum()), perplexity_start, vq.perplexity_


def bad_start_table():
    print("\n## bad start: 64 codes in cluster A (10 % of the stream), B has 90 %")
    print("\n| threshold | codes near B after 400 batches | perplexity after 1 / 400 |")
    print("|---|---|---|")
    for threshold in THRESHOLDS:
        near_b, p_start, p_end = bad_start(threshold)
        print(f"| {threshold:g} | {near_b} | {p_start:.1f} / {p_end:.1f} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore", UserWarning)
    fit_table()
    stream_table()
    bad_start_table()
