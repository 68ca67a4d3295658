"""
=======================================
Fit, stream and encode with Dask arrays
=======================================

Give :class:`skvq.VQCodebookTransformer` a Dask array and each step becomes a
reduction: every chunk is assigned to its nearest codes and summed where it
lives, and only the ``n_codes x n_features`` statistics travel to the
client, which applies the update.

- ``fit`` keeps the chunks where they are computed (the workers' memory on a
  cluster), each with the distance bounds of its rows, and runs the NumPy
  schedule on exactly the same stages of rows: the fit is the NumPy fit, to
  the rounding of the sums.
- ``partial_fit`` keeps nothing: each call is one pass over its batch's
  chunks.  Streaming slices of an array larger than memory through it is
  the out-of-core way.
- Encoding is lazy and runs chunk by chunk.

Here two million points are written to a ``.npy`` file on disk and read
through a memory map, 100,000 rows per chunk.  The threaded scheduler runs
the chunks; to use a cluster of machines instead, connect a client before
fitting, and the very same code runs there::

    from distributed import Client
    client = Client("tcp://scheduler-address:8786")

(the data must then live where every worker can read it, e.g. a zarr store on
shared or object storage, opened with ``dask.array.from_zarr``).
"""

# %%
# Write a dataset to disk, chunk by chunk
# ---------------------------------------
import tempfile
from pathlib import Path
from time import perf_counter

import dask.array as da
import matplotlib.pyplot as plt
import numpy as np

from skvq import VQCodebookTransformer

tmp = tempfile.TemporaryDirectory()
path = Path(tmp.name) / "points.npy"
n_rows, chunk = 2_000_000, 100_000
rng = np.random.RandomState(0)
on_disk = np.lib.format.open_memmap(
    path, mode="w+", dtype=np.float32, shape=(n_rows, 2)
)
for start in range(0, n_rows, chunk):
    # a noisy ring and two elongated blobs
    angle = rng.uniform(0, 2 * np.pi, chunk)
    ring = np.c_[np.cos(angle), np.sin(angle)] * (4 + 0.3 * rng.randn(chunk, 1))
    blob = rng.randn(chunk, 2) * [1.5, 0.3] + [[0, 0]]
    bar = rng.randn(chunk, 2) * [0.3, 2.0] + [[7, 0]]
    which = rng.randint(3, size=(chunk, 1))
    on_disk[start : start + chunk] = np.where(
        which == 0, ring, np.where(which == 1, blob, bar)
    )
on_disk.flush()
del on_disk

X = da.from_array(np.load(path, mmap_mode="r"), chunks=(chunk, 2))
print(X)

# %%
# Fit: the NumPy fit, chunk by chunk
# ----------------------------------
# Each full step of ``fit`` is a reduction over the chunks, whose rows are
# assigned to the schedule's stages by a hash of their values: the same
# rows as in a NumPy fit.  Stages whose steps are cheap are gathered once
# and stepped in this process, where a step costs no round trip (with two
# features, all of them here); larger ones run where their chunks are.
vq = VQCodebookTransformer(n_codes=48, max_iter=30, random_state=0)
start = perf_counter()
vq.fit(X)
print(f"Dask fit: {vq.n_iter_} steps in {perf_counter() - start:.1f} s")
in_memory = VQCodebookTransformer(n_codes=48, max_iter=30, random_state=0)
in_memory.fit(X.compute())
print(
    "largest difference from the NumPy fit's code book: "
    f"{np.abs(vq.codebook_ - in_memory.codebook_).max():.1e}"
)

# %%
# Stream out of core
# ------------------
# ``partial_fit`` on a Dask array is one EMA step over the whole array as a
# batch, read chunk by chunk and kept nowhere.  Slices of an array too large
# for memory make a stream: here ten steps of 200,000 rows continue the
# fitted code book at ``ema_momentum=0.9``.
vq.set_params(ema_momentum=0.9)
for start_row in range(0, n_rows, 200_000):
    vq.partial_fit(X[start_row : start_row + 200_000])
print(f"after the stream: {vq.n_steps_} EMA steps in all")

# %%
# Encode lazily
# -------------
# ``predict``, ``transform``, ``inverse_transform`` and ``score`` return lazy
# Dask arrays; nothing is read until they are computed.
codes = vq.predict(X)
usage = da.bincount(codes, minlength=vq.n_codes)
distortion = -vq.score(X)
usage, distortion = da.compute(usage, distortion)
print(codes)
print(f"distortion {distortion:.4f}, perplexity {vq.perplexity_:.1f} of {vq.n_codes}")

# %%
# Look at the code book and its usage
# -----------------------------------
sample = X[:: n_rows // 100_000].compute()
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=[1.3, 1])
left.hexbin(sample[:, 0], sample[:, 1], gridsize=80, cmap="Greys", bins="log")
left.scatter(
    *vq.codebook_.T, s=28, c="tab:red", edgecolor="white", label="code vectors"
)
left.set(xlabel="feature 0", ylabel="feature 1", title="Data density and the 48 codes")
left.set_aspect("equal")
left.legend(loc="upper left")
order = np.argsort(usage)[::-1]
right.bar(np.arange(vq.n_codes), usage[order] / n_rows * 100, color="tab:blue")
right.axhline(100 / vq.n_codes, color="k", ls="--", lw=1, label="even use")
right.set(
    xlabel="code (sorted by use)",
    ylabel="share of the 2,000,000 points (%)",
    title="Code usage, computed lazily with Dask",
)
right.legend()
fig.tight_layout()
plt.show()

tmp.cleanup()
