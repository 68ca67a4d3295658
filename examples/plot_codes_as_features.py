"""
============================================
One-hot codes as features for a linear model
============================================

A linear model draws straight boundaries.  Giving it the one-hot code of each
sample, the index of its nearest code vector, lets it draw piecewise ones:
each code is a small region of the input space, and the model learns one
weight per region and class.  This is vector quantisation as feature
engineering, the multivariate cousin of
:class:`~sklearn.preprocessing.KBinsDiscretizer`, which cuts each feature on
its own.

We classify scikit-learn's hand-written digits (8 x 8 pixels) with
:class:`~sklearn.linear_model.LogisticRegression` on three inputs:
the raw pixels, per-pixel bins, and skvq's one-hot codes for several sizes of
code book, all cross-validated with the same 5 folds.
"""

# %%
# The three pipelines
# -------------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import KBinsDiscretizer, MinMaxScaler

from skvq import VQCodebookTransformer

X, y = load_digits(return_X_y=True)
cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)


def linear():
    return LogisticRegression(max_iter=2000)


def accuracy(pipeline):
    scores = cross_val_score(pipeline, X, y, cv=cv)
    return scores.mean(), scores.std()


raw = accuracy(make_pipeline(MinMaxScaler(), linear()))
bins = accuracy(
    make_pipeline(
        KBinsDiscretizer(n_bins=3, encode="onehot", strategy="uniform"), linear()
    )
)
print(f"raw pixels:        {raw[0]:.3f} +/- {raw[1]:.3f}")
print(f"KBinsDiscretizer:  {bins[0]:.3f} +/- {bins[1]:.3f}")

# %%
# One-hot codes, for several code book sizes
# ------------------------------------------
# The codes replace the 64 pixels by ``n_codes`` sparse indicator columns.
# Stacking them next to the pixels (``FeatureUnion``) is another option; here
# the model sees the codes only, to show what they carry on their own.
n_codes = [8, 16, 32, 64, 128, 256, 512]
vq_scores = []
for k in n_codes:
    pipeline = make_pipeline(
        MinMaxScaler(),
        VQCodebookTransformer(n_codes=k, encode="onehot", random_state=0),
        linear(),
    )
    vq_scores.append(accuracy(pipeline))
    print(f"skvq, {k:>3} codes:   {vq_scores[-1][0]:.3f} +/- {vq_scores[-1][1]:.3f}")
vq_scores = np.array(vq_scores)

# %%
# Accuracy against the number of codes
# ------------------------------------
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.errorbar(
    n_codes,
    vq_scores[:, 0],
    yerr=vq_scores[:, 1],
    marker="o",
    capsize=3,
    label="skvq one-hot codes",
)
ax.axhline(raw[0], color="k", ls="--", label=f"raw pixels ({raw[0]:.3f})")
ax.axhline(
    bins[0], color="tab:green", ls=":", label=f"KBinsDiscretizer ({bins[0]:.3f})"
)
ax.set_xscale("log", base=2)
ax.set_xticks(n_codes, [str(k) for k in n_codes])
ax.set(
    xlabel="n_codes (size of the code book)",
    ylabel="5-fold cross-validated accuracy",
    title="LogisticRegression on load_digits",
)
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()

# %%
# From about 128 codes on, the one-hot codes alone classify better than the
# 64 raw pixels (on this run: 0.973 to 0.985 against 0.969): each code gathers
# similar-looking digits, and the linear model only has to name the class of
# each code.  Per-pixel bins lose the joint information that the codes keep.
# Too few codes merge different digits into one region and lose accuracy.
