"""
==========================================
Topics in TF-IDF documents, kept sparse
==========================================

:class:`~skvq.VQCodebookTransformer` takes SciPy sparse matrices as they come
out of :class:`~sklearn.feature_extraction.text.TfidfTransformer` or
:class:`~sklearn.preprocessing.OneHotEncoder`, and never densifies them: the
nearest-code search is a sparse-times-dense product, the statistics are
sparse products with the assignment.

The documents here are generated offline from a small topic model: each
document has one main topic, whose words (a Zipf distribution over a part of
the vocabulary) make up most of it, plus words from the whole vocabulary as
background.  We turn the word counts into L2-normalised TF-IDF rows and
cluster them with skvq and with :class:`~sklearn.cluster.MiniBatchKMeans`,
both at their defaults, one code (cluster) per topic, then use the one-hot
codes of a larger code book as features for a linear classifier.
"""

# %%
# Documents from a topic model
# ----------------------------
import time

import matplotlib.pyplot as plt
import numpy as np
from scipy import sparse
from sklearn.cluster import MiniBatchKMeans
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from skvq import VQCodebookTransformer

n_docs, n_terms, n_topics = 4000, 5000, 10
topic_words, doc_words, background = 400, 30, 0.75
rng = np.random.default_rng(0)
vocabularies = np.stack(
    [rng.permutation(n_terms)[:topic_words] for _ in range(n_topics)]
)
zipf = np.arange(1, topic_words + 1) ** -1.1
zipf /= zipf.sum()

topic = rng.integers(n_topics, size=n_docs)
from_topic = rng.random((n_docs, doc_words)) >= background
words = np.where(
    from_topic,
    vocabularies[topic[:, None], rng.choice(topic_words, (n_docs, doc_words), p=zipf)],
    rng.integers(n_terms, size=(n_docs, doc_words)),
)
counts = sparse.csr_matrix(
    (np.ones(words.size), (np.repeat(np.arange(n_docs), doc_words), words.ravel())),
    shape=(n_docs, n_terms),
)
counts.sum_duplicates()
X = TfidfTransformer().fit_transform(counts).tocsr()
print(
    f"{X.shape[0]} documents x {X.shape[1]} terms, {X.nnz / np.prod(X.shape):.2%} dense"
)

# %%
# One code per topic
# ------------------
# The distortion is the mean squared distance of a document to its code (or
# centre), computed the same way for both; the adjusted Rand index compares
# the clusters with the topics the documents were drawn from (1 is perfect).


def distortion(labels, centers):
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    dots = np.bincount(rows, X.data * centers[labels[rows], X.indices], X.shape[0])
    x_sq = np.bincount(rows, X.data * X.data, X.shape[0])
    return float(np.mean(x_sq - 2 * dots + np.sum(centers**2, axis=1)[labels]))


results = {}
for name, model in {
    "skvq": VQCodebookTransformer(n_codes=n_topics, random_state=0),
    "MiniBatchKMeans": MiniBatchKMeans(n_clusters=n_topics, random_state=0),
}.items():
    start = time.perf_counter()
    model.fit(X)
    seconds = time.perf_counter() - start
    labels = model.predict(X)
    centers = getattr(model, "codebook_", getattr(model, "cluster_centers_", None))
    results[name] = {
        "labels": labels,
        "distortion": distortion(labels, centers),
        "ARI": adjusted_rand_score(topic, labels),
    }
    print(
        f"{name:16s} distortion {results[name]['distortion']:.4f}, "
        f"ARI {results[name]['ARI']:.3f}, fit {seconds:.2f} s"
    )

# %%
# Which topics each code found
# ----------------------------
# Each column of a panel is a code (a cluster), each row a topic: the share of
# the topic's documents that went to that code.  A clean recovery puts one
# bright cell in every row and column.
fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
for ax, (name, found) in zip(axes, results.items(), strict=True):
    table = np.zeros((n_topics, n_topics))
    np.add.at(table, (topic, found["labels"]), 1)
    table /= table.sum(axis=1, keepdims=True)
    order = np.argsort(np.argmax(table, axis=0), kind="stable")
    image = ax.imshow(table[:, order], vmin=0, vmax=1, cmap="Blues")
    ax.set(
        title=f"{name}: ARI {found['ARI']:.2f}",
        xlabel="code (cluster)",
        ylabel="topic",
        xticks=[],
        yticks=[],
    )
fig.colorbar(image, ax=axes, label="share of the topic's documents")
plt.show()

# %%
# One-hot codes as features
# -------------------------
# A larger code book splits the topics into finer regions; its one-hot codes
# (sparse, one 1 per document) feed a logistic regression that predicts the
# topic.  The whole pipeline stays sparse.
pipeline = make_pipeline(
    VQCodebookTransformer(n_codes=32, encode="onehot", random_state=0),
    LogisticRegression(max_iter=1000),
)
scores = cross_val_score(pipeline, X, topic, cv=5)
print(
    f"topic accuracy from 32 one-hot codes: {scores.mean():.3f} +/- {scores.std():.3f}"
)
