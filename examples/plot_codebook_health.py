"""
=================================================
Codebook health: relocating codes, reviving codes
=================================================

An EMA code book can waste codes in two ways.  **Crowded codes**: several
codes share a region that one would serve nearly as well, while a single
code serves a region that needs more; every code still wins its share, so
nothing looks wrong from the counts alone.  **Dead codes**: when the data
move away, codes stop winning and stay behind.

skvq handles both.  With ``relocate=True`` (the default) it keeps an EMA of
each code's distortion (``ema_distortion_``) and, every few steps, moves the
code that is cheapest to merge into its neighbour next to the code whose cell
would gain most from a split, when the gain exceeds the cost (the enhanced
LBG rule).  Codes whose EMA count falls below ``dead_code_threshold`` times
the mean count (5 % by default) are re-seeded from the batch, k-means++ style.

Part 1 follows a stream of two equal clusters where all 16 codes start in
the left one; part 2 a stream whose clusters jump to a new place.
"""

# %%
# Part 1: crowded codes move to the cluster that needs them
# ---------------------------------------------------------
import matplotlib.pyplot as plt
import numpy as np

from skvq import VQCodebookTransformer

rng = np.random.RandomState(0)
left, right = np.array([-6.0, 0.0]), np.array([6.0, 0.0])
init = left + rng.normal(size=(16, 2))


def two_clusters(size=256):
    centers = np.where(rng.rand(size, 1) < 0.5, left, right)
    return centers + rng.normal(size=(size, 2))


crowded = {
    "relocation off": VQCodebookTransformer(16, init=init, relocate=False),
    "relocation on (default)": VQCodebookTransformer(16, init=init, random_state=0),
}
paths = []  # code positions of the relocating model, step by step
perplexity = {name: [] for name in crowded}
for _ in range(300):
    X = two_clusters()
    for name, model in crowded.items():
        model.partial_fit(X)
        perplexity[name].append(model.perplexity_)
    paths.append(crowded["relocation on (default)"].codebook_.copy())
paths = np.array(paths)

for name, model in crowded.items():
    on_right = int(np.sum(model.codebook_[:, 0] > 0))
    print(
        f"{name}: {on_right} of 16 codes serve the right cluster, perplexity "
        f"{model.perplexity_:.1f}, {model.n_codes_relocated_} codes relocated"
    )

fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
sample = np.vstack([two_clusters() for _ in range(4)])
for ax, (name, model) in zip(axes[:2], crowded.items(), strict=True):
    ax.scatter(*sample.T, s=2, c="0.75")
    if model.relocate:
        for k in range(16):
            ax.plot(*paths[:, k].T, lw=0.8, c="tab:orange")
    ax.scatter(*init.T, s=25, c="white", edgecolor="k", label="initial codes")
    ax.scatter(*model.codebook_.T, s=60, c="tab:blue", edgecolor="k", label="codes")
    ax.set(title=f"{name}: codes after 300 steps", xlim=(-11, 11), ylim=(-5, 5))
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize=8)
for name, values in perplexity.items():
    axes[2].plot(values, label=name)
axes[2].set(
    xlabel="step",
    ylabel="perplexity (codes in effective use)",
    title="Perplexity of the code usage",
    ylim=(0, 17),
)
axes[2].legend(loc="lower right")
fig.tight_layout()
plt.show()

# %%
# Without relocation one code, the nearest when the stream started, serves the
# whole right cluster for ever: the perplexity stays near 8.  With relocation
# the lines trace codes jumping from the crowded left cluster to the right one
# (each taking half of the worst-served cell), until the two clusters share
# the code book about evenly.
#
# Part 2: dead codes are revived when the data move
# -------------------------------------------------
# For 300 batches the data come from four clusters on the left; then from
# five clusters on the right.  We compare the default with both mechanisms
# switched off (``relocate=False, dead_code_threshold=0``: the plain EMA rule).
left_clusters = rng.uniform(-12, -4, size=(4, 2))
right_clusters = rng.uniform(4, 12, size=(5, 2))


def batch(t, size=256):
    centers = left_clusters if t < 300 else right_clusters
    return centers[rng.randint(len(centers), size=size)] + 0.6 * rng.randn(size, 2)


models = {
    "plain EMA (relocate=False, dead_code_threshold=0)": VQCodebookTransformer(
        n_codes=32,
        ema_momentum=0.9,
        dead_code_threshold=0,
        relocate=False,
        random_state=0,
    ),
    "default (relocation, re-seeding)": VQCodebookTransformer(
        n_codes=32, ema_momentum=0.9, random_state=0
    ),
}
perplexity = {name: [] for name in models}
for t in range(700):
    X = batch(t)
    for name, model in models.items():
        model.partial_fit(X)
        perplexity[name].append(model.perplexity_)

for name, model in models.items():
    print(
        f"{name}: perplexity {model.perplexity_:.1f}, distortion "
        f"{-model.score(batch(700)):.3f}, {model.n_codes_reassigned_} codes "
        f"re-seeded, {model.n_codes_relocated_} relocated"
    )

fig = plt.figure(figsize=(15, 8.5))
grid = fig.add_gridspec(2, 2)
ax = fig.add_subplot(grid[0, :])
for name, values in perplexity.items():
    ax.plot(values, label=name)
ax.axvline(300, color="k", ls=":", lw=1)
ax.text(305, 0.97, "data move right", va="top", transform=ax.get_xaxis_transform())
ax.set(
    xlabel="batch",
    ylabel="perplexity (codes in effective use)",
    title="Perplexity of the code usage over the stream (32 codes)",
    ylim=(0, 33),
)
ax.legend(loc="center right")

current = np.vstack([batch(700) for _ in range(4)])
for col, (name, model) in enumerate(models.items()):
    ax = fig.add_subplot(grid[1, col])
    ax.scatter(*current.T, s=2, c="0.75", label="current data")
    alive = model.ema_counts_ >= 0.05 * model.ema_counts_.mean()
    ax.scatter(*model.codebook_[alive].T, s=50, c="tab:blue", edgecolor="k")
    ax.scatter(
        *model.codebook_[~alive].T,
        s=50,
        c="white",
        edgecolor="tab:red",
        label="unused codes (count < 5 % of the mean)",
    )
    ax.set(xlabel="x", ylabel="y", title=name, xlim=(-15, 15), ylim=(-15, 15))
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
fig.tight_layout()
plt.show()

# %%
# With the plain EMA rule, the codes left behind on the left stop winning and
# stay there: all five clusters on the right fall to the one or two codes that
# happened to be nearest when the data moved, and the perplexity drops close
# to 1.  By default the idle codes are re-seeded where the data are worst
# served once their count falls below 5 % of the mean, and relocation spreads
# the codes over the new clusters, so the perplexity recovers to near the size
# of the code book within a few dozen batches.  See :doc:`/health` for the
# measurements behind the defaults.
