"""
=====================================================
Colour quantisation: skvq against (MiniBatch)KMeans
=====================================================

Quantise the photograph ``china.jpg`` that ships with scikit-learn to a palette
of 64 colours.  Each pixel is a 3-D point (red, green, blue); the palette is the
code book, and each pixel is replaced by its nearest palette colour.

We fit :class:`skvq.VQCodebookTransformer`, :class:`~sklearn.cluster.KMeans`
and :class:`~sklearn.cluster.MiniBatchKMeans` on the same 50,000 pixels drawn
at random, then encode every pixel of the image and compare the distortion
(mean squared distance of a pixel to its palette colour) and the fit time.
"""

# %%
# Load the image and draw the training pixels
# -------------------------------------------
from pathlib import Path
from time import perf_counter

import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import load_sample_image

from skvq import VQCodebookTransformer

china = load_sample_image("china.jpg")
height, width, _ = china.shape
pixels = (china.reshape(-1, 3) / 255.0).astype(np.float32)

rng = np.random.RandomState(0)
train = pixels[rng.choice(pixels.shape[0], size=50_000, replace=False)]
print(f"{pixels.shape[0]} pixels, training on {train.shape[0]}")

# %%
# Fit the three quantisers on the same pixels
# -------------------------------------------
# skvq's ``predict`` gives each pixel's code; ``codebook_[codes]`` (or
# ``inverse_transform``) decodes it back to a colour.
n_colours = 64
models = {
    "skvq (EMA)": VQCodebookTransformer(n_codes=n_colours, random_state=0),
    "KMeans": KMeans(n_clusters=n_colours, n_init=1, random_state=0),
    "MiniBatchKMeans": MiniBatchKMeans(n_clusters=n_colours, n_init=1, random_state=0),
}
palettes, distortion, fit_time = {}, {}, {}
for name, model in models.items():
    start = perf_counter()
    model.fit(train)
    fit_time[name] = perf_counter() - start
    palette = getattr(model, "codebook_", None)
    if palette is None:
        palette = model.cluster_centers_
    codes = model.predict(pixels)
    palettes[name] = palette[codes]
    distortion[name] = float(np.mean(np.sum((pixels - palette[codes]) ** 2, axis=1)))

print(f"{'model':<16} {'distortion':>11} {'vs KMeans':>10} {'fit time':>9}")
for name in models:
    ratio = distortion[name] / distortion["KMeans"]
    print(
        f"{name:<16} {distortion[name]:>11.3e} {ratio:>10.3f} {fit_time[name]:>8.2f}s"
    )

# %%
# Look at the result
# ------------------
# The second row zooms on the sky, where 64 colours show as bands.
shown = ["original", "skvq (EMA)", "MiniBatchKMeans"]
images = {"original": pixels, **palettes}
zoom = (slice(0, 160), slice(0, 240))
fig, axes = plt.subplots(2, 3, figsize=(15, 7.6), height_ratios=[1, 0.7])
for top, bottom, name in zip(axes[0], axes[1], shown, strict=True):
    image = images[name].reshape(height, width, 3)
    top.imshow(image)
    top.add_patch(
        plt.Rectangle(
            (zoom[1].start, zoom[0].start),
            zoom[1].stop - zoom[1].start,
            zoom[0].stop - zoom[0].start,
            fill=False,
            edgecolor="yellow",
            lw=1.5,
        )
    )
    bottom.imshow(image[zoom])
    for ax in (top, bottom):
        ax.set_xticks([])
        ax.set_yticks([])
    if name == "original":
        top.set_title("Original (96,615 colours)")
    else:
        top.set_title(f"{name}: {n_colours} colours, distortion {distortion[name]:.2e}")
    bottom.set_xlabel("zoom on the yellow box")
fig.tight_layout()

try:
    out_dir = Path(__file__).resolve().parent
except NameError:  # run interactively
    out_dir = Path.cwd()
fig.savefig(out_dir / "color_quantization.png", dpi=80)
print(f"Figure saved to {out_dir / 'color_quantization.png'}")
plt.show()
