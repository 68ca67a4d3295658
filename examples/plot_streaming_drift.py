"""
==============================================
Streaming with drift: an EMA code book forgets
==============================================

:class:`~sklearn.cluster.MiniBatchKMeans` moves each centre by one over the
number of samples it has ever received: on a stationary stream that is exactly
right, but once the stream drifts its centres barely move.  skvq's EMA code
book gives a batch seen ``t`` steps ago the weight ``m ** t``, so it forgets at
the rate its momentum ``m`` sets, and follows the data.

The stream below has six Gaussian clusters in 2-D that travel slowly along
circles, and at batch 500 jump to new places.  Every model sees each batch
once with ``partial_fit``; we record the distortion of every batch *before*
the model learns from it (how well the current code book serves the data
arriving now).
"""

# %%
# A drifting stream
# -----------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import MiniBatchKMeans

from skvq import VQCodebookTransformer

n_batches, batch_size, n_clusters = 1000, 256, 6
rng = np.random.RandomState(0)
radius = rng.uniform(3, 8, size=n_clusters)
phase = rng.uniform(0, 2 * np.pi, size=n_clusters)
speed = rng.uniform(0.002, 0.006, size=n_clusters) * rng.choice([-1, 1], n_clusters)
shift = np.zeros((n_clusters, 2))


def centers_at(t):
    angle = phase + speed * t
    return np.c_[radius * np.cos(angle), radius * np.sin(angle)] + shift


def batch_at(t):
    labels = rng.randint(n_clusters, size=batch_size)
    return centers_at(t)[labels] + 0.5 * rng.randn(batch_size, 2)


# %%
# Four learners on the same stream
# --------------------------------
# All start from the same 12 codes, drawn from the first batch.
first = batch_at(0)
init = first[:12]
models = {
    "skvq, momentum 0.5": VQCodebookTransformer(12, ema_momentum=0.5, init=init),
    "skvq, momentum 0.9": VQCodebookTransformer(12, ema_momentum=0.9, init=init),
    "skvq, momentum 0.99": VQCodebookTransformer(12, ema_momentum=0.99, init=init),
    "MiniBatchKMeans": MiniBatchKMeans(12, init=init, n_init=1, random_state=0),
}
for model in models.values():
    model.partial_fit(first)

distortion = {name: [] for name in models}
for t in range(1, n_batches):
    if t == n_batches // 2:  # the clusters jump
        shift = rng.uniform(-6, 6, size=(n_clusters, 2))
    X = batch_at(t)
    for name, model in models.items():
        codes = model.predict(X)
        centres = getattr(model, "codebook_", None)
        if centres is None:
            centres = model.cluster_centers_
        distortion[name].append(np.mean(np.sum((X - centres[codes]) ** 2, axis=1)))
        model.partial_fit(X)

# %%
# Distortion over time, and where the codes end up
# ------------------------------------------------
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[1.6, 1])
window = np.ones(20) / 20
for name, values in distortion.items():
    smooth = np.convolve(values, window, mode="valid")
    left.plot(np.arange(smooth.size) + 20, smooth, label=name)
left.axvline(n_batches // 2, color="k", ls=":", lw=1)
left.text(
    n_batches // 2 + 10,
    0.97,
    "clusters jump",
    fontsize=9,
    va="top",
    transform=left.get_xaxis_transform(),
)
left.set_yscale("log")
left.set(
    xlabel="batch",
    ylabel="distortion of the incoming batch\n(moving average of 20 batches)",
    title="Prequential distortion on a drifting stream",
)
left.legend()

X = np.vstack([batch_at(n_batches) for _ in range(4)])
right.scatter(*X.T, s=2, c="0.75", label="current data")
right.scatter(
    *models["skvq, momentum 0.9"].codebook_.T,
    s=60,
    marker="o",
    c="tab:orange",
    edgecolor="k",
    label="skvq, momentum 0.9",
)
right.scatter(
    *models["MiniBatchKMeans"].cluster_centers_.T,
    s=60,
    marker="X",
    c="tab:red",
    edgecolor="k",
    label="MiniBatchKMeans",
)
right.set(xlabel="x", ylabel="y", title="Codes at the end of the stream")
right.set_aspect("equal")
right.legend(loc="upper right", fontsize=8)
fig.tight_layout()
plt.show()

for name, values in distortion.items():
    print(
        f"{name:<20} mean distortion over the last 400 batches: "
        f"{np.mean(values[-400:]):.3f}"
    )

# %%
# MiniBatchKMeans is as good as any while the stream is young, then falls
# behind as its step sizes shrink, and never recovers from the jump: most of
# its centres stay where the data used to be.  The EMA code books follow.
# Here the clusters move a little at every batch and are well separated, so
# the shortest memory (momentum 0.5, about two batches) serves them best; with
# noisier data or smaller batches, a longer memory averages the noise out, at
# the price of lagging behind the drift.
