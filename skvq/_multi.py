"""Multi-codebook quantisers: product (PQ) and residual (RVQ) vector quantisation.

Both keep one :class:`~skvq.VQCodebookTransformer` per code book and reuse
its machinery: the same search, statistics, EMA update, re-seeding and
relocation.  A product quantiser gives each code book a subspace (a group of
contiguous features); a residual quantiser gives stage ``s`` what the stages
before it left.  One ``partial_fit`` makes one EMA step of every code book
from the same batch.
"""

from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
from scipy import sparse
from sklearn import get_config
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_feature_names_in,
    check_is_fitted,
    validate_data,
)

from ._codebook import (
    DEFAULT_DEAD_CODE_THRESHOLD,
    VQCodebookTransformer,
    _checked_weights,
    _is_dask_array,
)
from ._kernels import COUNT_FLOOR, canonical_sample, least_squares_codebooks
from ._search import extend_beams, residual_beam_search

# Passes of joint refinement after the greedy training of a residual
# quantiser, at most; they stop earlier when the error drops by less than
# this fraction.
_REFINE_PASSES = 20
_REFINE_RTOL = 1e-3
# Joint least-squares refinement up to this many codes in all (a dense
# system of this size); beyond, a Lloyd step per stage.
_JOINT_SOLVE_MAX = 4096


def stage_target(X, decoded, own):
    """What one residual stage should reproduce: ``X`` less the other stages.

    ``decoded`` is the sum of every stage's code vectors, ``own`` this
    stage's share of it.  Returns the target rows and their squared distance
    to ``own``.
    """
    target = X - decoded + own
    diff = (target - own).astype(np.float64)
    return target, np.einsum("ij,ij->i", diff, diff)


class _MultiCodebookQuantizer(TransformerMixin, BaseEstimator):
    """Shared machinery of :class:`ProductVQTransformer` and
    :class:`ResidualVQTransformer`: one inner quantiser per code book."""

    _parameter_constraints: dict = {
        "n_codes": [Interval(Integral, 1, None, closed="left")],
        "ema_momentum": [Interval(Real, 0, 1, closed="left")],
        "dead_code_threshold": [Interval(Real, 0, 1, closed="left")],
        "relocate": ["boolean"],
        "init": [StrOptions({"k-means++", "random"})],
        "encode": [StrOptions({"index", "onehot"})],
        "algorithm": [StrOptions({"auto", "kd_tree", "brute"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_no_improvement": [Interval(Integral, 1, None, closed="left"), None],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    # ------------------------------------------------------------ helpers
    def _quantizer(self, seed):
        """An unfitted single-codebook quantiser with this one's settings."""
        shared = VQCodebookTransformer().get_params().keys() - {"encode"}
        params = {k: v for k, v in self.get_params().items() if k in shared}
        return VQCodebookTransformer(**{**params, "random_state": seed})

    def _seeds(self, n_codebooks):
        rng = check_random_state(self.random_state)
        return rng.randint(np.iinfo(np.int32).max, size=n_codebooks).tolist()

    @staticmethod
    def _start(quantizer, X, sample_weight, seed):
        """Initialise ``quantizer`` from validated ``X`` (a stream's first batch)."""
        quantizer._validate_params()
        quantizer.n_features_in_ = X.shape[1]
        quantizer._initialize(X, sample_weight, check_random_state(seed))

    def _validate_batch(self, X, sample_weight, *, reset):
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], order="C", reset=reset
        )
        return X, _checked_weights(sample_weight, X)

    @contextmanager
    def _unchanged_on_error(self):
        """Restore this estimator and its inner quantisers if the body raises."""
        saved = dict(self.__dict__)
        inner = [(q, dict(q.__dict__)) for q in self.__dict__.get("quantizers_", [])]
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            for quantizer, state in inner:
                quantizer.__dict__.clear()
                quantizer.__dict__.update(state)
            raise

    def _finish_fit(self):
        self.bits_per_vector_ = len(self.quantizers_) * float(np.log2(self.n_codes))

    @property
    def n_iter_(self):
        """int: steps of the code books' own fits, summed (0 after
        ``partial_fit`` only)."""
        return int(sum(getattr(q, "n_iter_", 0) for q in self.quantizers_))

    # ------------------------------------------------------ fitted views
    @property
    def codebooks_(self):
        """list of ndarray: the code book of each subspace or stage."""
        return [q.codebook_ for q in self.quantizers_]

    @property
    def perplexity_(self):
        """ndarray of shape (n_codebooks,): the perplexity of each code book."""
        return np.array([q.perplexity_ for q in self.quantizers_])

    # ---------------------------------------------------------- encoding
    def _lazy(self, method, X, *args):
        check_is_fitted(self)
        from . import _dask

        return _dask.multi_blockwise(self, method, X, *args)

    def _validated_query(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False)

    def transform(self, X):
        """Encode each sample by one code per code book.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to encode.

        Returns
        -------
        Xt : ndarray of shape (n_samples, n_codebooks) or sparse matrix of \
                shape (n_samples, n_codebooks * n_codes)
            ``encode="index"``: the code of each code book, int64 (see
            :meth:`compress` for one byte a code).  ``encode="onehot"``: a
            SciPy CSR matrix with one 1 per code book, code book ``j``
            owning columns ``j * n_codes`` to ``(j + 1) * n_codes - 1``.  A
            lazy Dask array when ``X`` is one.
        """
        if _is_dask_array(X):
            return self._lazy("transform", X)
        X = self._validated_query(X)
        codes = self._encode(X)
        if self.encode == "index":
            return codes.astype(np.int64, copy=False)
        n_samples, n_codebooks = codes.shape
        columns = codes + self.n_codes * np.arange(n_codebooks)
        onehot = sparse.csr_matrix(
            (
                np.ones(codes.size, dtype=X.dtype),
                columns.ravel(),
                np.arange(0, codes.size + 1, n_codebooks),
            ),
            shape=(n_samples, n_codebooks * self.n_codes),
        )
        if get_config().get("sparse_interface", "spmatrix") == "sparray":
            return sparse.csr_array(onehot)
        return onehot

    def compress(self, X):
        """Codes in the smallest unsigned integer type: one byte a code at 256.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_codebooks)
            ``uint8`` for up to 256 codes, ``uint16`` up to 65,536, else
            ``uint32``.  :meth:`inverse_transform` decodes them (with
            ``encode="index"``).
        """
        X = self._validated_query(X)
        return self._encode(X).astype(self._compact_dtype())

    def _compact_dtype(self):
        for dtype in (np.uint8, np.uint16, np.uint32):
            if self.n_codes - 1 <= np.iinfo(dtype).max:
                return dtype
        return np.uint64

    def inverse_transform(self, X):
        """Decode codes back to vectors.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_codebooks) or \
                (n_samples, n_codebooks * n_codes)
            Integer codes (``encode="index"``, any integer dtype, such as the
            output of :meth:`compress`) or one-hot rows (``encode="onehot"``).

        Returns
        -------
        X_decoded : ndarray of shape (n_samples, n_features)
            The reconstruction.  A lazy Dask array when ``X`` is one.
        """
        if _is_dask_array(X):
            return self._lazy("inverse_transform", X)
        check_is_fitted(self)
        return self._decode(self._checked_codes(X))

    def _checked_codes(self, X):
        n_codebooks = len(self.quantizers_)
        if self.encode == "onehot":
            X = check_array(X, accept_sparse="csr", dtype="numeric", input_name="X")
            expected = n_codebooks * self.n_codes
            if X.shape[1] != expected:
                raise ValueError(
                    f"X has {X.shape[1]} columns, but encode='onehot' output has "
                    f"n_codebooks * n_codes = {expected} columns."
                )
            dense = X.toarray() if sparse.issparse(X) else np.asarray(X)
            blocks = dense.reshape(X.shape[0], n_codebooks, self.n_codes)
            if not (
                np.all((blocks == 0) | (blocks == 1)) and np.all(blocks.sum(2) == 1)
            ):
                raise ValueError(
                    "One-hot codes must have exactly one entry equal to 1 per "
                    "code book and zeros elsewhere."
                )
            return np.argmax(blocks, axis=2)
        codes = check_array(X, dtype="numeric", input_name="X")
        if codes.shape[1] != n_codebooks:
            raise ValueError(
                f"Expected codes of shape (n_samples, {n_codebooks}), got shape "
                f"{codes.shape}."
            )
        if codes.dtype.kind == "f" and not np.array_equal(codes, np.round(codes)):
            raise ValueError("Codes must be integers; got non-integer values.")
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise ValueError(
                f"Codes must lie in [0, n_codes={self.n_codes}); got values from "
                f"{codes.min()} to {codes.max()}."
            )
        return codes.astype(np.intp)

    def score(self, X, y=None, sample_weight=None):
        """Minus the weighted mean squared reconstruction error.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to score.

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        score : float
            ``-sum(w_i ||x_i - decode(encode(x_i))||^2) / sum(w_i)``.  A lazy
            0-d Dask array when ``X`` is one.
        """
        if _is_dask_array(X):
            return self._lazy("score", X, sample_weight)
        X = self._validated_query(X)
        sample_weight = _checked_weights(sample_weight, X)
        return -float(np.dot(sample_weight, self._sq_errors(X)) / sample_weight.sum())

    def _sq_errors(self, X):
        error = (X - self._decode(self._encode(X))).astype(np.float64)
        return np.einsum("ij,ij->i", error, error)

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns of :meth:`transform`.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Only checked against the names seen in :meth:`fit`.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``"{prefix}_code{j}"`` for each code book ``j`` (``encode="index"``),
            or ``"{prefix}_code{j}_{k}"`` for each code ``k`` of each code
            book (``encode="onehot"``); the prefix is the class name in lower
            case.
        """
        check_is_fitted(self)
        _check_feature_names_in(self, input_features, generate_names=False)
        prefix = self.__class__.__name__.lower()
        n_codebooks = len(self.quantizers_)
        if self.encode == "index":
            names = [f"{prefix}_code{j}" for j in range(n_codebooks)]
        else:
            names = [
                f"{prefix}_code{j}_{k}"
                for j in range(n_codebooks)
                for k in range(self.n_codes)
            ]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.encode == "index":
            tags.transformer_tags.preserves_dtype = []
        else:
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


_COMMON_PARAMETERS = """
    ema_momentum : float, default=0.99
        Momentum of the EMA statistics of every code book (see
        :class:`VQCodebookTransformer`).

    dead_code_threshold : float, default=0.05
        Re-seeding of dead codes in every code book, as in
        :class:`VQCodebookTransformer`.

    relocate : bool, default=True
        Relocation of crowded codes in every code book, as in
        :class:`VQCodebookTransformer`.

    init : {"k-means++", "random"}, default="k-means++"
        Initialisation of every code book.

    encode : {"index", "onehot"}, default="index"
        What :meth:`transform` returns: ``"index"``, the codes as an int64
        array of shape ``(n_samples, n_codebooks)``; ``"onehot"``, a sparse
        CSR matrix with one 1 per code book.

    algorithm : {"auto", "kd_tree", "brute"}, default="auto"
        Nearest-code search of every code book.

    batch_size : int, default=1024
        Rows of a stream's batch, and the scale of each code book's ``fit``.

    max_iter : int, default=300
        Maximum number of steps of each code book's ``fit``.

    tol : float, default=1e-4
        Early stopping of each code book's ``fit``.

    max_no_improvement : int or None, default=10
        Early stopping of each code book's ``fit``.

    n_jobs : int, default=None
        Threads of the searches and statistics.

    random_state : int, RandomState instance or None, default=None
        Seeds of the code books (one drawn for each).  Pass an int for
        reproducible results.

    verbose : int, default=0
        Verbosity of each code book's training.
"""


def _with_common(doc):
    return doc.replace("    {common}\n", _COMMON_PARAMETERS.lstrip("\n") + "\n")


class ProductVQTransformer(_MultiCodebookQuantizer):
    __doc__ = _with_common(
        """Product quantiser: one EMA code book per group of features.

    The features are split into ``n_subspaces`` groups of contiguous
    features, of sizes differing by at most one, and each group is quantised
    by its own code book of ``n_codes`` codes.  A sample is stored as
    ``n_subspaces`` codes (``n_subspaces * log2(n_codes)`` bits) and decoded
    by concatenating the code vectors.  Each code book is a
    :class:`VQCodebookTransformer` on its subspace: the same EMA rule,
    ``fit`` schedule, re-seeding and relocation.

    Read more in the :ref:`multi-codebook guide <multi_codebook>`.

    Parameters
    ----------
    n_codes : int, default=256
        Codes per code book.

    n_subspaces : int, default=8
        Number of feature groups (code books); at most ``n_features`` are
        used (``n_subspaces_``).

    {common}
    Attributes
    ----------
    quantizers_ : list of VQCodebookTransformer
        The code book of each subspace, fitted on its features.

    codebooks_ : list of ndarray of shape (n_codes, subspace size)
        The code vectors of each subspace.

    subspace_bounds_ : ndarray of shape (`n_subspaces_` + 1,)
        Subspace ``j`` holds features ``subspace_bounds_[j]`` to
        ``subspace_bounds_[j + 1] - 1``.

    n_subspaces_ : int
        Number of subspaces used: ``min(n_subspaces, n_features_in_)``.

    bits_per_vector_ : float
        ``n_subspaces_ * log2(n_codes)``.

    perplexity_ : ndarray of shape (`n_subspaces_`,)
        Perplexity of the EMA usage of each code book.

    n_features_in_ : int
        Number of features seen during ``fit``.

    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when ``X``
        has feature names that are all strings.

    See Also
    --------
    ResidualVQTransformer : Code books that quantise each other's residuals.
    VQCodebookTransformer : One code book for all the features.

    References
    ----------
    .. [1] H. Jégou, M. Douze and C. Schmid, "Product quantization for
       nearest neighbor search", IEEE TPAMI 33(1), 2011.

    Examples
    --------
    >>> import numpy as np
    >>> from skvq import ProductVQTransformer
    >>> X = np.random.RandomState(0).normal(size=(500, 6))
    >>> pq = ProductVQTransformer(n_codes=16, n_subspaces=3, random_state=0).fit(X)
    >>> pq.subspace_bounds_.tolist(), pq.bits_per_vector_
    ([0, 2, 4, 6], 12.0)
    >>> codes = pq.compress(X[:2])
    >>> codes.dtype, codes.shape
    (dtype('uint8'), (2, 3))
    >>> first = pq.codebooks_[0][codes[:, 0]]  # subspace 0: features 0 and 1
    >>> bool(np.allclose(pq.inverse_transform(codes)[:, :2], first))
    True
    """
    )

    _parameter_constraints: dict = {
        **_MultiCodebookQuantizer._parameter_constraints,
        "n_subspaces": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        n_codes=256,
        n_subspaces=8,
        *,
        ema_momentum=0.99,
        dead_code_threshold=DEFAULT_DEAD_CODE_THRESHOLD,
        relocate=True,
        init="k-means++",
        encode="index",
        algorithm="auto",
        batch_size=1024,
        max_iter=300,
        tol=1e-4,
        max_no_improvement=10,
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.n_codes = n_codes
        self.n_subspaces = n_subspaces
        self.ema_momentum = ema_momentum
        self.dead_code_threshold = dead_code_threshold
        self.relocate = relocate
        self.init = init
        self.encode = encode
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    def _set_subspaces(self, n_features):
        self.n_subspaces_ = min(self.n_subspaces, n_features)
        sizes = [
            len(g) for g in np.array_split(np.arange(n_features), self.n_subspaces_)
        ]
        self.subspace_bounds_ = np.concatenate([[0], np.cumsum(sizes)])

    def _subspaces(self, X):
        """Each subspace's features of ``X``, as C-contiguous arrays (or Dask)."""
        bounds = self.subspace_bounds_
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            part = X[:, a:b]
            yield part if _is_dask_array(X) else np.ascontiguousarray(part)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Learn every code book from scratch on its subspace.

        Parameters
        ----------
        X : array-like or Dask array of shape (n_samples, n_features)
            Training data.

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        with self._unchanged_on_error():
            if _is_dask_array(X):
                from . import _dask

                X = _dask.checked_multi_input(self, X, reset=True)
            else:
                X, sample_weight = self._validate_batch(X, sample_weight, reset=True)
            self._set_subspaces(X.shape[1])
            seeds = self._seeds(self.n_subspaces_)
            self.quantizers_ = [
                self._quantizer(seed).fit(part, sample_weight=sample_weight)
                for seed, part in zip(seeds, self._subspaces(X), strict=True)
            ]
            self._finish_fit()
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """One EMA step of every code book on its subspace of the batch.

        Parameters
        ----------
        X : array-like or Dask array of shape (n_samples, n_features)
            The batch.

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        self : object
            Updated estimator.
        """
        self._validate_params()
        with self._unchanged_on_error():
            first = not hasattr(self, "quantizers_")
            if _is_dask_array(X):
                from . import _dask

                X = _dask.checked_multi_input(self, X, reset=first)
            else:
                X, sample_weight = self._validate_batch(X, sample_weight, reset=first)
            if first:
                self._set_subspaces(X.shape[1])
                self.quantizers_ = [
                    self._quantizer(seed) for seed in self._seeds(self.n_subspaces_)
                ]
                self._finish_fit()
            for quantizer, part in zip(
                self.quantizers_, self._subspaces(X), strict=True
            ):
                if _is_dask_array(part):
                    quantizer.partial_fit(part, sample_weight=sample_weight)
                    continue
                # X was validated above: step the code book directly.
                if first:
                    self._start(quantizer, part, sample_weight, quantizer.random_state)
                quantizer._step(part, sample_weight)
        return self

    def _encode(self, X):
        return np.column_stack(
            [
                q._index.nearest(part, n_jobs=self.n_jobs)[0]
                for q, part in zip(self.quantizers_, self._subspaces(X), strict=True)
            ]
        )

    def _decode(self, codes):
        return np.hstack(
            [q.codebook_[codes[:, j]] for j, q in enumerate(self.quantizers_)]
        )


class ResidualVQTransformer(_MultiCodebookQuantizer):
    __doc__ = _with_common(
        """Residual quantiser: each code book quantises what the others left.

    Stage ``s`` has a code book of ``n_codes`` codes for the residual
    ``x - c_1 - ... - c_{s-1}``; a sample is stored as ``n_stages`` codes
    and decoded as the sum of their code vectors.  Encoding keeps the
    ``beam_size`` best partial sums from stage to stage (beam search;
    ``beam_size=1`` is greedy).

    ``fit`` trains the stages greedily (stage ``s`` is a
    :class:`VQCodebookTransformer` fitted on the residuals of the stages
    before it), then refines them jointly: every code book is solved again
    at once by least squares for the current codes (a Lloyd step per stage
    in turn when ``n_stages * n_codes > 4096``) and the rows are encoded
    again; a pass is kept only if the error drops, and the passes stop when
    it drops by less than 0.1 % (at most 20).  ``partial_fit`` encodes the batch
    with the current code books and makes one EMA step of every stage on
    those targets.

    Read more in the :ref:`multi-codebook guide <multi_codebook>`.

    Parameters
    ----------
    n_codes : int, default=256
        Codes per code book.

    n_stages : int, default=8
        Number of stages (code books).

    beam_size : int, default=1
        Partial encodings kept per sample from stage to stage, in
        :meth:`transform` and in training.

    {common}
    Attributes
    ----------
    quantizers_ : list of VQCodebookTransformer
        The code book of each stage.

    codebooks_ : list of ndarray of shape (n_codes, n_features)
        The code vectors of each stage.

    bits_per_vector_ : float
        ``n_stages * log2(n_codes)``.

    perplexity_ : ndarray of shape (n_stages,)
        Perplexity of the EMA usage of each code book.

    n_refinements_ : int
        Joint refinement passes made by the last :meth:`fit`.

    n_features_in_ : int
        Number of features seen during ``fit``.

    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when ``X``
        has feature names that are all strings.

    See Also
    --------
    ProductVQTransformer : One code book per group of features.
    VQCodebookTransformer : One code book for all the features.

    References
    ----------
    .. [1] C. F. Barnes, S. A. Rizvi and N. M. Nasrabadi, "Advances in
       residual vector quantization: a review", IEEE Trans. Image Processing
       5(2), 1996.
    .. [2] N. Zeghidour et al., "SoundStream: An End-to-End Neural Audio
       Codec", IEEE/ACM TASLP 30, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skvq import ResidualVQTransformer
    >>> X = np.random.RandomState(0).normal(size=(500, 4))
    >>> rvq = ResidualVQTransformer(n_codes=8, n_stages=3, random_state=0).fit(X)
    >>> codes = rvq.transform(X[:2])
    >>> codes.shape, rvq.bits_per_vector_
    ((2, 3), 9.0)
    >>> decoded = sum(rvq.codebooks_[s][codes[:, s]] for s in range(3))
    >>> bool(np.allclose(rvq.inverse_transform(codes), decoded))
    True
    """
    )

    _parameter_constraints: dict = {
        **_MultiCodebookQuantizer._parameter_constraints,
        "n_stages": [Interval(Integral, 1, None, closed="left")],
        "beam_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        n_codes=256,
        n_stages=8,
        *,
        beam_size=1,
        ema_momentum=0.99,
        dead_code_threshold=DEFAULT_DEAD_CODE_THRESHOLD,
        relocate=True,
        init="k-means++",
        encode="index",
        algorithm="auto",
        batch_size=1024,
        max_iter=300,
        tol=1e-4,
        max_no_improvement=10,
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.n_codes = n_codes
        self.n_stages = n_stages
        self.beam_size = beam_size
        self.ema_momentum = ema_momentum
        self.dead_code_threshold = dead_code_threshold
        self.relocate = relocate
        self.init = init
        self.encode = encode
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Train the stages greedily, then refine them jointly.

        Parameters
        ----------
        X : array-like or Dask array of shape (n_samples, n_features)
            Training data.

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        with self._unchanged_on_error():
            if _is_dask_array(X):
                from . import _dask

                return _dask.fit_residual(self, X, sample_weight)
            X, sample_weight = self._validate_batch(X, sample_weight, reset=True)
            # Train on the distinct rows, weighted, in canonical order: the
            # residuals of later stages then depend only on the weighted
            # distribution, not on how rounding differs between a row
            # weighted 2 and a row seen twice.
            points, sample_weight = canonical_sample(X, sample_weight)
            X = points.astype(X.dtype)
            self.quantizers_ = []
            residual, paths = X, None
            for seed in self._seeds(self.n_stages):
                quantizer = self._quantizer(seed).fit(
                    residual, sample_weight=sample_weight
                )
                self.quantizers_.append(quantizer)
                residual, paths = self._next_residual(X, residual, quantizer, paths)
            self._refine(X, sample_weight)
            self._finish_fit()
        return self

    def _next_residual(self, X, residual, quantizer, paths):
        """What the stages so far leave of ``X``, after adding ``quantizer``.

        Greedy encoding only needs the new stage's nearest codes; beam
        search extends the kept ``paths`` (None before the first stage) by
        the new stage, and the residual is that of each row's best path.
        Returns ``(residual, paths)``.
        """
        if self.beam_size == 1:
            labels = quantizer._index.nearest(residual, n_jobs=self.n_jobs)[0]
            return residual - quantizer.codebook_[labels], paths
        if paths is None:
            paths = np.empty((X.shape[0], 1, 0), dtype=np.intp)
        vectors = [q.codebook_.astype(np.float64) for q in self.quantizers_]
        paths, _ = extend_beams(X, paths, vectors[:-1], vectors[-1], self.beam_size)
        return X - self._decode(paths[:, 0]), paths

    def _refine(self, X, sample_weight):
        """Joint passes after greedy training: re-solve, re-encode, repeat.

        Each pass re-solves every code book at once for the current codes
        (least squares, :func:`~skvq._kernels.least_squares_codebooks`; a
        Lloyd step per stage in turn when the system would be too large),
        then encodes the rows again.  A pass that does not lower the error by
        ``_REFINE_RTOL`` ends the refinement (and is undone if it raised it).
        """
        total = sample_weight.sum()
        codes, sq_err = self._encode(X, return_sq_err=True)
        best = float(np.dot(sample_weight, sq_err) / total)
        joint = self.n_stages * self.n_codes <= _JOINT_SOLVE_MAX
        self.n_refinements_ = 0
        for _ in range(_REFINE_PASSES):
            saved = [dict(q.__dict__) for q in self.quantizers_]
            if joint:
                solved = least_squares_codebooks(
                    X, sample_weight, codes, self.codebooks_
                )
                self._install(solved, X, sample_weight, codes)
            else:
                self._stage_steps(X, sample_weight, codes, momentum=0.0)
            new_codes, new_sq_err = self._encode(X, return_sq_err=True)
            error = float(np.dot(sample_weight, new_sq_err) / total)
            if self.verbose:
                print(f"Refinement {self.n_refinements_ + 1}: error {error:.6g}")
            if not error < best * (1.0 - _REFINE_RTOL):
                if error > best:
                    for quantizer, state in zip(self.quantizers_, saved, strict=True):
                        quantizer.__dict__.update(state)
                break
            best, codes = error, new_codes
            self.n_refinements_ += 1

    def _install(self, codebooks, X, sample_weight, codes):
        """Set every stage to solved code vectors, with fit-style statistics.

        Counts are per ``batch_size`` rows (as ``fit`` leaves them); a code
        no row uses keeps its vector; each code's distortion is the error
        left on the rows that use it.
        """
        scale = min(self.batch_size, X.shape[0]) / X.shape[0]
        decoded = sum(c[codes[:, s]] for s, c in enumerate(codebooks))
        error = X.astype(np.float64) - decoded
        sq_err = np.einsum("ij,ij->i", error, error)
        for s, (quantizer, vectors) in enumerate(
            zip(self.quantizers_, codebooks, strict=True)
        ):
            counts = scale * np.bincount(codes[:, s], sample_weight, self.n_codes)
            used = counts > 0
            codebook = quantizer.codebook_.copy()
            codebook[used] = vectors[used]
            counts = np.maximum(counts, COUNT_FLOOR)
            sums = counts[:, None] * codebook.astype(np.float64)
            distortions = scale * np.bincount(
                codes[:, s], sample_weight * sq_err, self.n_codes
            )
            quantizer._set_state((codebook, counts, sums, distortions))

    def _stage_steps(self, X, sample_weight, codes, momentum=None):
        """One EMA step of every stage towards what the other stages leave.

        With ``momentum=0`` (refinement of ``fit``) the stages move in turn,
        each seeing the others' latest vectors (a Lloyd step per stage on
        all the rows); otherwise (a stream) every stage steps from the same
        joint encoding of the batch.
        """
        decoded = self._decode(codes)
        full = momentum == 0.0
        scale = min(self.batch_size, X.shape[0]) / X.shape[0] if full else None
        for s, quantizer in enumerate(self.quantizers_):
            own = quantizer.codebook_[codes[:, s]]
            target, sq_dist = stage_target(X, decoded, own)
            quantizer._update(
                target, sample_weight, codes[:, s], sq_dist, None, momentum, scale
            )
            if full:
                decoded += quantizer.codebook_[codes[:, s]] - own

    def partial_fit(self, X, y=None, sample_weight=None):
        """One EMA step of every stage from the same batch.

        The first call initialises stage after stage on the residuals of the
        batch; every call then encodes the batch (beam search) and steps each
        stage towards what the other stages leave of its rows.

        Parameters
        ----------
        X : array-like or Dask array of shape (n_samples, n_features)
            The batch.

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        self : object
            Updated estimator.
        """
        self._validate_params()
        with self._unchanged_on_error():
            if _is_dask_array(X):
                from . import _dask

                return _dask.partial_fit_residual(self, X, sample_weight)
            first = not hasattr(self, "quantizers_")
            X, sample_weight = self._validate_batch(X, sample_weight, reset=first)
            if first:
                self._start_stages(X, sample_weight)
            self._stage_steps(X, sample_weight, self._encode(X))
        return self

    def _start_stages(self, X, sample_weight):
        """Initialise every stage from the residuals of the first batch."""
        self.quantizers_ = []
        residual, paths = X, None
        for seed in self._seeds(self.n_stages):
            quantizer = self._quantizer(seed)
            self._start(quantizer, residual, sample_weight, seed)
            self.quantizers_.append(quantizer)
            residual, paths = self._next_residual(X, residual, quantizer, paths)
        self._finish_fit()

    def _encode(self, X, return_sq_err=False, n_stages=None):
        """Codes of ``X`` by the first ``n_stages`` stages (default: all)."""
        stages = self.quantizers_[:n_stages]
        codes, sq_err = residual_beam_search(
            X, [q._index for q in stages], self.beam_size, self.n_jobs
        )
        return (codes, sq_err) if return_sq_err else codes

    def _decode(self, codes):
        """The sum of one code vector per column of ``codes`` (leading stages)."""
        decoded = self.quantizers_[0].codebook_[codes[:, 0]].copy()
        for s in range(1, codes.shape[1]):
            decoded += self.quantizers_[s].codebook_[codes[:, s]]
        return decoded
