"""
===========================================
Choosing n_codes: the rate-distortion curve
===========================================

Each code costs ``log2(n_codes)`` bits to store, and more codes lower the
distortion.  Plotting distortion against bits per sample (the *rate*) shows
where extra codes stop paying off; plotting fit time against ``n_codes``
shows what they cost.

We quantise the colours of ``china.jpg``: fit on 20,000 pixels, measure the
distortion on 20,000 other pixels of the same image, for code books of 4 to
512 colours, with :class:`~sklearn.cluster.KMeans` as the reference.  The
same curve can be drawn with :class:`~sklearn.model_selection.GridSearchCV`,
since ``score`` is minus the distortion.
"""

# %%
# Fit a range of code book sizes
# ------------------------------
from time import perf_counter

import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans
from sklearn.datasets import load_sample_image

from skvq import VQCodebookTransformer

pixels = (load_sample_image("china.jpg").reshape(-1, 3) / 255).astype(np.float32)
rows = np.random.RandomState(0).permutation(pixels.shape[0])
train, test = pixels[rows[:20_000]], pixels[rows[20_000:40_000]]

n_codes = [4, 8, 16, 32, 64, 128, 256, 512]
results = {"skvq": [], "KMeans": []}
for k in n_codes:
    for name, model in (
        ("skvq", VQCodebookTransformer(n_codes=k, random_state=0)),
        ("KMeans", KMeans(n_clusters=k, n_init=1, random_state=0)),
    ):
        start = perf_counter()
        model.fit(train)
        elapsed = perf_counter() - start
        centres = getattr(model, "codebook_", None)
        if centres is None:
            centres = model.cluster_centers_
        codes = model.predict(test)
        distortion = np.mean(np.sum((test - centres[codes]) ** 2, axis=1))
        results[name].append((distortion, elapsed))
    print(
        f"n_codes={k:>3}: skvq distortion {results['skvq'][-1][0]:.2e} "
        f"({results['skvq'][-1][1]:.2f} s), KMeans {results['KMeans'][-1][0]:.2e} "
        f"({results['KMeans'][-1][1]:.2f} s)"
    )

# %%
# Rate-distortion and cost
# ------------------------
bits = np.log2(n_codes)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
for name, marker in (("skvq", "o"), ("KMeans", "s")):
    values = np.array(results[name])
    left.plot(bits, values[:, 0], marker=marker, label=name)
    right.plot(n_codes, values[:, 1], marker=marker, label=name)
left.set_yscale("log")
left.set_xticks(bits, [f"{b:.0f}\n({k})" for b, k in zip(bits, n_codes, strict=True)])
left.set(
    xlabel="bits per pixel = log2(n_codes)   (n_codes)",
    ylabel="distortion on held-out pixels",
    title="Rate-distortion curve, china.jpg colours",
)
left.legend()
right.set_xscale("log", base=2)
right.set_yscale("log")
right.set_xticks(n_codes, [str(k) for k in n_codes])
right.set(
    xlabel="n_codes", ylabel="fit time (s)", title="Cost of fitting 20,000 pixels"
)
right.legend()
fig.tight_layout()
plt.show()

# %%
# Each extra bit (doubling the palette) divides the distortion by a roughly
# constant factor, as rate-distortion theory predicts at high rates; the
# curve tells how many bits a target distortion costs.  skvq's ``fit`` runs
# Lloyd iterations on nested samples of the pixels and then relocates codes
# out of the local minimum they stop in, so its held-out distortion stays
# within 1 % of KMeans' at every size and is often lower (on the run that
# wrote this: from 2 % better at 16 and 512 colours to 0.9 % worse at 128).
# The relocation rounds cost time: the fit takes up to 3 times KMeans' single
# run here (``relocate=False`` brings it to about KMeans' time).  Its
# advantages go further on streams: forgetting, ``partial_fit``.
