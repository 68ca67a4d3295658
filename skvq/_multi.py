"""Multi-codebook quantisers: product (PQ) and residual (RVQ) vector quantisation.

Both hold one code book state per code book and train them with the single
code book's schedules (:mod:`skvq._schedule`) and the residual trainer
(:mod:`skvq._residual`), on the same data sources: one implementation for
NumPy and Dask.  A product quantiser gives each code book a subspace (a
group of contiguous features); a residual quantiser gives stage ``s`` what
the stages before it left.  One ``partial_fit`` makes one EMA step of every
code book from the same batch.
"""

from numbers import Integral

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted

from ._base import (
    DEFAULT_DEAD_CODE_THRESHOLD,
    QuantizerBase,
    is_dask_array,
    onehot,
)
from ._residual import ResidualTraining, beam_search, joint_step
from ._rows import canonical_sample
from ._schedule import (
    drive,
    run,
    settled_fit,
    start_stream,
    stream_step,
    training_sample,
)
from ._sources import to_internal
from ._stage_trainer import StageTrainer
from ._state import CodebookView
from ._threads import blas_held
from ._validation import checked_code_values


class _MultiCodebookQuantizer(QuantizerBase):
    """Shared machinery of :class:`ProductVQTransformer` and
    :class:`ResidualVQTransformer`: one code book state per code book."""

    @staticmethod
    def _seeds(rng, n_codebooks):
        """One seed per code book, for its own draws."""
        return [
            check_random_state(int(seed))
            for seed in rng.randint(np.iinfo(np.int32).max, size=n_codebooks)
        ]

    # ------------------------------------------------------ fitted views
    @property
    def codebooks_(self):
        """The code book of each subspace or stage."""
        return [state.codebook for state in self._fitted_states()]

    @property
    def perplexity_(self):
        """The perplexity of each code book."""
        return np.array([state.perplexity for state in self._fitted_states()])

    @property
    def n_iter_(self):
        """Lloyd iterations of the code books' fits in the last :meth:`fit`,
        summed (the stage trainer's, and a product code book's final full
        step).

        0 if only :meth:`partial_fit` ran.
        """
        self._fitted_states()
        return self.__dict__.get("_n_iter", 0)

    @property
    def bits_per_vector_(self):
        """Bits of one encoded vector, ``n_codebooks * log2(n_codes)``."""
        return len(self._fitted_states()) * float(np.log2(self.n_codes))

    @property
    def quantizers_(self):
        """Each code book's fitted attributes, read-only.

        Named as :class:`VQCodebookTransformer` names them.
        """
        return [CodebookView(state) for state in self._fitted_states()]

    # ---------------------------------------------------------- encoding
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
        if is_dask_array(X):
            from . import _dask

            X = self._lazy_input(X)
            n_codebooks = len(self._states)
            if self.encode == "index":
                return _dask.map_rows(X, self.transform, n_codebooks, np.int64)
            return _dask.map_rows(
                X,
                self.transform,
                n_codebooks * self.n_codes,
                X.dtype,
                sparse_output=True,
            )
        X = self._validated_query(X)
        codes = self._encode(X)
        if self.encode == "index":
            return codes.astype(np.int64, copy=False)
        return onehot(codes, self.n_codes, X.dtype)

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
            ``encode="index"``).  A lazy Dask array when ``X`` is one.
        """
        if is_dask_array(X):
            from . import _dask

            X = self._lazy_input(X)
            return _dask.map_rows(
                X, self.compress, len(self._states), self._compact_dtype()
            )
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
        if is_dask_array(X):
            from . import _dask

            check_is_fitted(self)
            dtype = self._states[0].codes.dtype
            return _dask.map_codes(
                X, self.inverse_transform, self.n_features_in_, dtype
            )
        check_is_fitted(self)
        return self._decode(self._checked_codes(X))

    def _checked_codes(self, X):
        n_codebooks = len(self._states)
        if self.encode == "onehot":
            X = check_array(
                X,
                accept_sparse="csr",
                dtype="numeric",
                input_name="X",
                ensure_min_samples=0,
            )
            expected = n_codebooks * self.n_codes
            if X.shape[1] != expected:
                raise ValueError(
                    f"X has {X.shape[1]} columns, but encode='onehot' output has "
                    f"n_codebooks * n_codes = {expected} columns."
                )
            dense = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
            blocks = dense.reshape(X.shape[0], n_codebooks, self.n_codes)
            if not (
                np.all((blocks == 0) | (blocks == 1)) and np.all(blocks.sum(2) == 1)
            ):
                raise ValueError(
                    "One-hot codes must have exactly one entry equal to 1 per "
                    "code book and zeros elsewhere."
                )
            return np.argmax(blocks, axis=2)
        codes = check_array(X, dtype="numeric", input_name="X", ensure_min_samples=0)
        if codes.shape[1] != n_codebooks:
            raise ValueError(
                f"Expected codes of shape (n_samples, {n_codebooks}), got shape "
                f"{codes.shape}."
            )
        return checked_code_values(codes, self.n_codes)

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
        n_codebooks = len(self._states)
        if self.encode == "index":
            names = [f"{prefix}_code{j}" for j in range(n_codebooks)]
        else:
            names = [
                f"{prefix}_code{j}_{k}"
                for j in range(n_codebooks)
                for k in range(self.n_codes)
            ]
        return np.asarray(names, dtype=object)


_COMMON_PARAMETERS = """
    ema_momentum : float, default=0.99
        Momentum of the EMA statistics of every code book (see
        :class:`VQCodebookTransformer`).

    dead_code_threshold : float, default=0.05
        Re-seeding of dead codes in every code book, as in
        :class:`VQCodebookTransformer`.

    relocate : bool, default=True
        Relocation of crowded codes in every code book's stream steps
        (``partial_fit``), as in :class:`VQCodebookTransformer`; ``fit``'s
        stage trainer splits the largest cell for every empty one instead.

    init : {"k-means++", "random"}, default="k-means++"
        Seeding of every code book: in ``fit``, from at most 16 rows per
        code of its training sample (on the first principal dimension of a
        residual stage); in the first ``partial_fit``, from the batch.

    encode : {"index", "onehot"}, default="index"
        What :meth:`transform` returns: ``"index"``, the codes as an int64
        array of shape ``(n_samples, n_codebooks)``; ``"onehot"``, a sparse
        CSR matrix with one 1 per code book.

    algorithm : {"auto", "kd_tree", "brute"}, default="auto"
        Nearest-code search of every code book.

    batch_size : int, default=1024
        Rows of a stream's batch; ``fit`` expresses the EMA counts per
        ``batch_size`` rows.

    max_iter : int, default=300
        Maximum number of Lloyd iterations of each code book's ``fit``
        (the stage trainer makes at most 25 (product) or 100 (residual)).

    tol : float, default=1e-4
        The stage trainer's Lloyd iterations stop when the codes move (sum
        of squared shifts) by at most ``tol`` times the sample's mean
        variance, or lower the distortion by less than 0.01 % (product) or
        0.1 % (residual).

    max_no_improvement : int or None, default=10
        Not used by the multi-codebook quantisers (their ``fit`` stops by
        ``tol`` and ``max_iter``); kept for a common parameter set with
        :class:`VQCodebookTransformer`.

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
    by concatenating the code vectors.

    ``fit`` trains each code book by the multi-codebook stage trainer: Lloyd
    iterations (at most 25, as faiss's product quantiser) from seeds drawn
    by ``init``, on a canonical sample of at most 256 distinct rows per
    code, an empty cell taking half of the largest; then one full step on
    all the rows sets each code book's usage.  ``partial_fit`` makes one EMA
    step of every code book, with the re-seeding and relocation of
    :class:`VQCodebookTransformer`.

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
    quantizers_ : list of CodebookView
        Each subspace's code book with the fitted attributes of a
        :class:`VQCodebookTransformer` (``codebook_``, ``ema_counts_``,
        ``ema_sum_``, ``ema_distortion_``, ``perplexity_``, ...), read-only.

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

    def _columns(self):
        """The features each code book sees, by key."""
        bounds = self.subspace_bounds_
        return {j: (int(bounds[j]), int(bounds[j + 1])) for j in range(len(bounds) - 1)}

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Learn every code book from scratch on its subspace.

        Each code book is fitted by the stage trainer to a bounded sample of
        its subspace (the k-means++ seeds of all subspaces drawn together,
        then plain Lloyd iterations), and one full step on all the rows,
        made for all the code books in one pass, sets its usage (see the
        documentation's Multi-codebook quantisers page).

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
            rng = check_random_state(self.random_state)
            X, sample_weight = self._training_input(X, sample_weight, reset=True)
            self._set_subspaces(X.shape[1])
            rngs = self._seeds(rng, self.n_subspaces_)
            source = self._make_source(
                X, sample_weight, fit=True, columns=self._columns()
            )
            config = self._config()
            trainer = StageTrainer.plain(config)
            keys = range(self.n_subspaces_)
            with blas_held(self.n_jobs, source.plan.n_rows * self.n_codes):
                samples = drive(
                    source, [training_sample(config, trainer, j) for j in keys]
                )
                fits = trainer.fit_many(
                    [sample.points.astype(source.dtype) for sample in samples],
                    [sample.weights for sample in samples],
                    rngs,
                )
                del samples
                schedules = [
                    settled_fit(config, source, fit, stage_rng, j)
                    for j, fit, stage_rng in zip(keys, fits, rngs, strict=True)
                ]
                outcomes = drive(source, schedules)
            self._states = tuple(outcome.state for outcome in outcomes)
            self._n_iter = sum(outcome.n_iter for outcome in outcomes)
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
        config = self._validate_params_once()
        with self._unchanged_on_error():
            first = not self.__sklearn_is_fitted__()
            X, sample_weight = self._training_input(X, sample_weight, reset=first)
            if first:
                self._set_subspaces(X.shape[1])
            unit = None if first else self._states[0].unit
            source = self._make_source(
                X, sample_weight, unit=unit, columns=self._columns()
            )
            if first:
                random_state = check_random_state(self.random_state)
                rngs = self._seeds(random_state, self.n_subspaces_)
                schedules = [
                    start_stream(config, source, j, stage_rng)
                    for j, stage_rng in enumerate(rngs)
                ]
            else:
                schedules = [
                    stream_step(config, state, j)
                    for j, state in enumerate(self._states)
                ]
            self._states = tuple(drive(source, schedules))
        return self

    def _subspaces(self, X):
        """Each subspace's features of ``X``, as C-contiguous arrays."""
        bounds = self.subspace_bounds_
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield np.ascontiguousarray(X[:, a:b])

    def _encode(self, X):
        return np.column_stack(
            [
                state.user_index.nearest(part, n_jobs=self.n_jobs)[0]
                for state, part in zip(self._states, self._subspaces(X), strict=True)
            ]
        )

    def _sq_errors(self, X):
        total = np.zeros(X.shape[0])
        for state, part in zip(self._states, self._subspaces(X), strict=True):
            total += state.user_index.nearest(
                part, n_jobs=self.n_jobs, return_sq_dist=True
            )[1]
        return total

    def _decode(self, codes):
        return np.hstack(
            [state.codebook[codes[:, j]] for j, state in enumerate(self._states)]
        )


class ResidualVQTransformer(_MultiCodebookQuantizer):
    __doc__ = _with_common(
        """Residual quantiser: each code book quantises what the others left.

    Stage ``s`` has a code book of ``n_codes`` codes for the residual
    ``x - c_1 - ... - c_{s-1}``; a sample is stored as ``n_stages`` codes
    and decoded as the sum of their code vectors.  Encoding keeps the
    ``beam_size`` best partial sums from stage to stage (beam search;
    ``beam_size=1`` is greedy).

    ``fit`` trains the stages greedily on a canonical sample of at most 256
    distinct rows per code: stage ``s`` learns what every kept path (all
    ``beam_size`` of them) leaves of the rows after the stages before it,
    by progressive-dimension k-means (Lloyd iterations on the first 1, 2,
    ... principal dimensions of those residuals, 10 steps of at most 10
    iterations, each warm-started from the last).  It then refines the
    stages jointly: every code book is solved again at once by least
    squares for the current codes (a Lloyd step per stage in turn when
    ``n_stages * n_codes > 4096``) on all the rows but a held-out eighth,
    and the rows are encoded again; a pass is kept only if the error of the
    held-out rows drops by 0.1 % (at most 20 passes).  ``partial_fit``
    encodes the batch with the current code books and makes one EMA step of
    every stage on those targets.

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
    quantizers_ : list of CodebookView
        Each stage's code book with the fitted attributes of a
        :class:`VQCodebookTransformer` (``codebook_``, ``ema_counts_``,
        ``ema_sum_``, ``ema_distortion_``, ``perplexity_``, ...), read-only.

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
            rng = check_random_state(self.random_state)
            X, sample_weight = self._training_input(X, sample_weight, reset=True)
            if not is_dask_array(X):
                # Train on the distinct rows, weighted, in canonical order:
                # the residuals of later stages then depend only on the
                # weighted distribution, not on how rounding differs between
                # a row weighted 2 and a row seen twice.
                sample = canonical_sample(X, sample_weight)
                X, sample_weight = sample.points.astype(X.dtype), sample.weights
            rngs = self._seeds(rng, self.n_stages)
            source = self._make_source(X, sample_weight, fit=True)
            training = ResidualTraining(self._config(), source, self.beam_size, rngs)
            with blas_held(self.n_jobs, source.plan.n_rows * self.n_codes):
                outcome = run(source, training.fit())
            self._states = outcome.states
            self._n_iter = outcome.n_iter
            self._n_refinements = outcome.n_refinements
        return self

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
        config = self._validate_params_once()
        with self._unchanged_on_error():
            first = not self.__sklearn_is_fitted__()
            X, sample_weight = self._training_input(X, sample_weight, reset=first)
            unit = None if first else self._states[0].unit
            # The first call initialises stage after stage on the residuals it
            # leaves in the blocks: they must keep them.
            source = self._make_source(X, sample_weight, unit=unit, keep_rows=first)
            if first:
                rngs = self._seeds(check_random_state(self.random_state), self.n_stages)
                training = ResidualTraining(config, source, self.beam_size, rngs)
                self._states = run(source, training.start())
            else:
                self._states = run(
                    source, joint_step(config, self._states, self.beam_size)
                )
        return self

    @property
    def n_refinements_(self):
        """Joint refinement passes kept by the last :meth:`fit`.

        0 if only :meth:`partial_fit` ran.
        """
        self._fitted_states()
        return self.__dict__.get("_n_refinements", 0)

    def _coded(self, X):
        """Beam search of validated ``X``: the codes and squared errors.

        In the internal unit when it is not 1 (float64 data beyond
        ``2**256``), where the squared errors that rank the paths cannot
        overflow; the errors are returned in the data's units.
        """
        unit = self._states[0].unit
        indexes = [state.published_index for state in self._states]
        codes, sq_err = beam_search(
            to_internal(X, unit), indexes, self.beam_size, self.n_jobs
        )
        if unit != 1.0:
            with np.errstate(over="ignore"):
                sq_err = sq_err * unit * unit
        return codes, sq_err

    def _encode(self, X):
        return self._coded(X)[0]

    def _sq_errors(self, X):
        return self._coded(X)[1]

    def _decode(self, codes):
        """The sum of one code vector per stage."""
        codebooks = self.codebooks_
        total = np.zeros((codes.shape[0], self.n_features_in_))
        for s, codebook in enumerate(codebooks):
            total += codebook[codes[:, s]]
        return total.astype(codebooks[0].dtype, copy=False)
