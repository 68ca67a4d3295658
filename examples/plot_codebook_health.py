"""
============================================
Codebook health: dead codes and reassignment
============================================

When the data move away from some codes, those codes stop winning samples.
With the plain EMA rule they then stay where they are forever: the code book
*collapses* onto the few codes that still win, and its effective size
shrinks.  skvq watches each code's EMA count and re-seeds the codes whose
count falls below ``dead_code_threshold`` (0.5 by default) from the current
batch, k-means++ style.  ``dead_code_threshold=0`` turns this off.

The stream: for 300 batches the data come from four clusters on the left;
then they come from five clusters on the right.  We follow the perplexity of
the code usage (``exp`` of its entropy: the number of codes in effective use)
and look at the code book at the end, with and without reassignment.
"""

# %%
# The stream and the two code books
# ---------------------------------
import matplotlib.pyplot as plt
import numpy as np

from skvq import VQCodebookTransformer

rng = np.random.RandomState(0)
left_clusters = rng.uniform(-12, -4, size=(4, 2))
right_clusters = rng.uniform(4, 12, size=(5, 2))


def batch(t, size=256):
    centers = left_clusters if t < 300 else right_clusters
    return centers[rng.randint(len(centers), size=size)] + 0.6 * rng.randn(size, 2)


models = {
    "reassignment off (dead_code_threshold=0)": VQCodebookTransformer(
        n_codes=32, ema_momentum=0.9, dead_code_threshold=0, random_state=0
    ),
    "reassignment on (default, 0.5)": VQCodebookTransformer(
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
        f"{-model.score(batch(700)):.3f}, {model.n_codes_reassigned_} codes reassigned"
    )

# %%
# Perplexity, usage and code positions
# ------------------------------------
fig = plt.figure(figsize=(15, 8.5))
grid = fig.add_gridspec(2, 3)
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

ax = fig.add_subplot(grid[1, 0])
width = 0.4
for offset, (name, model) in zip((-width / 2, width / 2), models.items(), strict=True):
    share = np.sort(model.ema_counts_)[::-1] / model.ema_counts_.sum() * 100
    ax.bar(np.arange(32) + offset, share, width=width, label=name.split(" (")[0])
ax.axhline(100 / 32, color="k", ls="--", lw=1, label="even use")
ax.set(
    xlabel="code (sorted by use)",
    ylabel="share of the EMA usage (%)",
    title="Code usage at the end of the stream",
)
ax.legend(fontsize=8)

current = np.vstack([batch(700) for _ in range(4)])
for col, (name, model) in enumerate(models.items(), start=1):
    ax = fig.add_subplot(grid[1, col])
    ax.scatter(*current.T, s=2, c="0.75", label="current data")
    alive = model.ema_counts_ >= 0.5
    ax.scatter(
        *model.codebook_[alive].T,
        s=50,
        c="tab:blue",
        edgecolor="k",
        label="codes in use",
    )
    ax.scatter(
        *model.codebook_[~alive].T,
        s=50,
        c="white",
        edgecolor="tab:red",
        label="dead codes (EMA count < 0.5)",
    )
    ax.set(xlabel="x", ylabel="y", title=name, xlim=(-15, 15), ylim=(-15, 15))
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
fig.tight_layout()
plt.show()

# %%
# Without reassignment, the codes left behind on the left die and stay there:
# all five clusters on the right fall to the one or two codes that happened
# to be nearest when the data moved, and the perplexity drops to about 2.  With
# reassignment the dead codes are re-seeded where the data are worst served,
# a few batches after they die, and the perplexity recovers to near the size
# of the code book.
