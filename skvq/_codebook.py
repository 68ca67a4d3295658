"""VQCodebookTransformer: a vector quantiser whose code book learns by EMA."""

from numbers import Real

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted

from ._base import (
    DEFAULT_DEAD_CODE_THRESHOLD,
    QuantizerBase,
    is_dask_array,
    onehot,
)
from ._schedule import FitSchedule, run, start_stream, stream_step
from ._threads import blas_held
from ._validation import checked_code_values


class VQCodebookTransformer(QuantizerBase):
    """Vector quantiser whose code book is learned by exponential moving averages.

    The transformer learns ``n_codes`` code vectors, one minibatch at a time,
    with the exponential-moving-average (EMA) rule of VQ-VAE tokenisers, and
    maps each sample to its nearest code vector (its *code*).  With
    ``ema_momentum`` ``m``, for every code ``k`` and the set ``S_k`` of batch
    samples whose nearest code is ``k``::

        n_k <- m * n_k + (1 - m) * sum(w_i for i in S_k)
        s_k <- m * s_k + (1 - m) * sum(w_i * x_i for i in S_k)
        c_k <- s_k / n_k

    starting from ``n_k = 1`` and ``s_k = c_k`` at initialisation.  Because old
    batches are forgotten geometrically, the code book follows data streams
    that drift, which :class:`~sklearn.cluster.MiniBatchKMeans` cannot do.

    Read more in the :ref:`User Guide <user_guide>`.

    Parameters
    ----------
    n_codes : int, default=256
        Number of code vectors ``K`` in the code book.

    ema_momentum : float, default=0.99
        Momentum ``m`` in ``[0, 1)`` of the EMA statistics.  Larger values
        remember more batches; ``0`` makes each step a k-means (Lloyd) step on
        the batch.

    commitment_weight : float, default=0.25
        Weight ``beta >= 0`` of the VQ-VAE commitment term reported in
        ``commitment_loss_``.  It does not change the code book.

    dead_code_threshold : float, default=0.05
        A code whose EMA count ``ema_counts_`` falls below this fraction of
        the mean count (the EMA weight per code of a batch) after a step, or
        that repeats a lower code, is *dead* and is re-seeded from that
        step's batch (in the full steps of :meth:`fit`, only codes whose cell
        is empty): dead codes, in order, each take a sample drawn with
        probability proportional to its weight times its squared distance to
        the code book (k-means++ style, so poorly served regions get codes),
        and restart as an average code (count equal to the mean count, sum
        equal to count times vector, distortion 0).  Being relative to the
        mean count, the rule behaves the same for any batch size and code
        book size: a code that stops winning is dead after
        ``log(threshold) / log(ema_momentum)`` steps (about 300 at the
        defaults).  Must be below 1.  ``0`` disables reassignment.

    relocate : bool, default=True
        Move codes from where they cost least to where they help most
        (enhanced LBG [6]_).  The code whose cell is cheapest to merge into
        its nearest neighbour's (Ward's cost, from the counts) takes half of
        the cell whose split in two gains most (estimated on the rows of the
        cell by two-fold cross-fitting), when the gain exceeds the cost.
        :meth:`fit` makes such moves in rounds once a stage has converged,
        keeping a round only if the distortion drops; :meth:`partial_fit`
        weighs each batch's split gains against the EMA statistics
        (``ema_distortion_``).  With ``relocate=False`` and
        ``dead_code_threshold=0``, the plain EMA rule holds exactly.

    init : {"k-means++", "random"} or array-like of shape (n_codes, n_features), \
            default="k-means++"
        How the code book is initialised from the first data seen.

        - ``"k-means++"``: greedy weighted k-means++ seeding.
        - ``"random"``: distinct samples drawn with probability proportional
          to their weight.
        - array: the initial code vectors themselves.

        Both strategies draw from the distinct rows of positive weight in a
        canonical order, so the result depends only on the weighted empirical
        distribution (and on ``random_state``).  ``fit`` draws from its first
        stage (at most 65,536 rows, see :meth:`fit`), ``partial_fit`` from at
        most ``max(3 * n_codes, min(3 * batch_size, 65536))`` rows of its
        first batch.

    encode : {"index", "onehot", "onehot-dense", "distance"}, default="index"
        What :meth:`transform` returns.

        - ``"index"``: the integer code of each sample, shape
          ``(n_samples, 1)``.
        - ``"onehot"``: a SciPy sparse CSR matrix of shape
          ``(n_samples, n_codes)`` with one ``1`` per row (a sparse array when
          scikit-learn's ``sparse_interface`` is ``"sparray"``).
        - ``"onehot-dense"``: the same as a dense array.
        - ``"distance"``: Euclidean distances to every code vector, shape
          ``(n_samples, n_codes)``.

        One-hot and distance outputs have the float dtype of ``X``.

    algorithm : {"auto", "kd_tree", "brute"}, default="auto"
        Nearest-code search.  Every backend returns the exact nearest code
        (the one a direct float64 computation returns; ties go to the lowest
        index).

        - ``"kd_tree"``: :class:`scipy.spatial.cKDTree`, rebuilt after each
          update.
        - ``"brute"``: blocked BLAS products, with a rigorous error bound and
          an exact re-check of near ties.
        - ``"auto"``: ``"kd_tree"`` for large code books in few dimensions,
          ``n_codes >= 1024`` with at most 12 features or
          ``n_codes >= 4096`` with at most 16; ``"brute"`` otherwise.  The
          rule holds on the Intel and AMD machines measured (see the
          Performance page).  With one feature, a binary search of the
          sorted codes (the nearest code brackets the value).

        Sparse rows are always searched by sparse-times-dense products,
        whatever ``algorithm`` says.

    batch_size : int, default=1024
        The number of rows of a stream's batch: the unit of ``ema_counts_``
        (weight per ``batch_size`` rows, also after :meth:`fit`) and of the
        dead-code threshold.  :meth:`fit` starts on ``32 * batch_size`` rows
        and is plain Lloyd's algorithm when ``batch_size >= n_samples``.

    max_iter : int, default=300
        Maximum number of steps of :meth:`fit`, all stages and relocation
        rounds together (rounds stop at half of it).

    tol : float, default=1e-4
        Early stopping of :meth:`fit` when one step on all the rows moves the
        code book by at most ``tol`` times the mean feature variance of
        ``X`` (the sum over codes of their squared movement, as in
        :class:`~sklearn.cluster.KMeans`); a step that changes no assignment
        always stops it.  Earlier stages use ``tol * n_samples / n_stage``.
        ``0`` disables this criterion.

    max_no_improvement : int or None, default=10
        Early stopping of :meth:`fit` after this many consecutive steps on all
        the rows without a lower distortion.  ``None`` disables this
        criterion.

    n_jobs : int, default=None
        Number of threads of the nearest-code search and of the statistics.
        ``None`` uses every core, capped by the BLAS thread limit seen by
        :mod:`threadpoolctl` (so ``threadpool_limits`` caps it);
        ``-1`` uses every core.  Small calls stay in the calling thread.
        Results do not depend on it, and concurrent calls from several
        threads are safe.

    random_state : int, RandomState instance or None, default=None
        Determines the draws of the initialisation and of re-seeding (the
        stages of :meth:`fit` follow from the rows' values).  Pass an int for
        reproducible results (the same whatever the threads or the chunks).

    verbose : int, default=0
        Verbosity: ``1`` prints one line per step of :meth:`fit` (stage and
        its rows, distortion before the step, perplexity, codes reassigned),
        the reason each convergence stopped, and one line per relocation
        round (codes moved, distortion before and after, kept or undone);
        :meth:`partial_fit` prints the codes it relocates.

    Attributes
    ----------
    codebook_ : ndarray of shape (n_codes, n_features)
        The code vectors, in the float dtype of the data they were initialised
        from (float32 stays float32).  Equal to
        ``ema_sum_ / ema_counts_[:, None]`` cast to that dtype.

    ema_counts_ : ndarray of shape (n_codes,)
        EMA usage counts ``n_k``, float64.

    ema_sum_ : ndarray of shape (n_codes, n_features)
        EMA running sums ``s_k``, float64.

    n_steps_ : int
        Number of EMA updates applied since the code book was initialised.

    n_iter_ : int
        Number of steps made by the last :meth:`fit`, all stages together
        (0 after :meth:`partial_fit` alone).

    ema_distortion_ : ndarray of shape (n_codes,)
        EMA of each code's distortion (the weighted sum of squared distances
        of its batch samples), in the units of ``ema_counts_``, float64.
        Relocation reads it; its share shows which codes serve their
        samples worst.

    n_codes_reassigned_ : int
        Number of codes re-seeded since the code book was initialised.

    n_codes_relocated_ : int
        Number of codes relocated since the code book was initialised (in
        :meth:`fit`, only the moves of rounds that were kept).

    dead_codes_ : ndarray of shape (n_codes,), dtype=bool
        Codes found dead (see ``dead_code_threshold``) in the last step; they
        were re-seeded unless every sample of the batch already coincided
        with a code.  All False when reassignment is disabled.

    perplexity_ : float
        ``exp`` of the entropy of the EMA usage distribution
        ``ema_counts_ / ema_counts_.sum()``: 1 when one code takes all the
        weight, ``n_codes`` when all codes are used evenly.

    commitment_loss_ : float
        ``commitment_weight`` times the weighted mean squared distance between
        the samples of the last batch and their codes, measured with the code
        book that assigned them (the VQ-VAE commitment term).

    n_features_in_ : int
        Number of features seen during ``fit``.

    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when ``X``
        has feature names that are all strings.

    See Also
    --------
    sklearn.cluster.MiniBatchKMeans : Minibatch k-means, which averages over
        all the data ever seen instead of forgetting.
    sklearn.preprocessing.KBinsDiscretizer : Bins each feature separately.
    scipy.cluster.vq.vq : Assigns codes from a given code book.

    Notes
    -----
    Statistics are kept in float64 whatever the data dtype.  A code that
    receives no weight in a step keeps its vector exactly while its count
    decays; counts are never allowed to underflow to zero.

    When the first data contain fewer distinct rows than ``n_codes``, every
    distinct row becomes a code and the remaining codes repeat rows, with a
    warning.  Equal code vectors are searched once: a sample always gets the
    lowest of their indices.

    Input of dtype float16, integer or boolean is converted to float64.

    Every method also accepts a Dask array: ``fit`` and ``partial_fit`` then
    run the same schedule with each step a reduction of per-chunk statistics
    on the workers (the chunks stay there, persisted, with their distance
    bounds), and ``transform``, ``predict``, ``inverse_transform`` and
    ``score`` return lazy Dask arrays.  Dask is optional and imported only
    then.

    The search is exact at every finite magnitude, in float32 and float64:
    the codes are those of a float64 computation on the data rescaled by a
    power of two.  float64 data so large or so small that squared distances
    could leave float64's range are trained in an internal unit (a power of
    two, so the fit is exactly the fit of the rescaled data, rescaled);
    ``ema_sum_``, ``ema_distortion_`` and ``commitment_loss_`` are then
    infinite only where their values exceed float64.

    :meth:`fit` runs Lloyd iterations (EMA steps at momentum 0 on whole
    stages) on nested, doubling subsets of the rows [4]_, with
    rigorous distance bounds that spare the search of rows that certainly
    keep their code [5]_, and relocation rounds that move codes out of the
    local minimum Lloyd's algorithm stops in [6]_; :meth:`partial_fit` is the
    EMA rule, followed by re-seeding and relocation.  See the User Guide for
    the schedule and the Codebook health page for the measurements.

    :meth:`fit` and :meth:`partial_fit` either succeed or leave the estimator
    exactly as it was.  The random draws of reassignment at step ``t`` come
    from ``numpy.random.default_rng([seed, t])`` with a seed fixed at
    initialisation, so an estimator pickled (or saved with ``skops.io``, which
    needs to trust only this class) in the middle of a stream continues
    bit for bit.  The search structure is not saved; it is rebuilt on
    first use after loading.

    References
    ----------
    .. [1] A. van den Oord, O. Vinyals and K. Kavukcuoglu, "Neural Discrete
       Representation Learning", NeurIPS 2017 (appendix A.1, EMA updates).
    .. [2] A. Razavi, A. van den Oord and O. Vinyals, "Generating Diverse
       High-Fidelity Images with VQ-VAE-2", NeurIPS 2019.
    .. [3] D. Arthur and S. Vassilvitskii, "k-means++: the advantages of
       careful seeding", SODA 2007.
    .. [4] J. Newling and F. Fleuret, "Nested Mini-Batch K-Means",
       NeurIPS 2016.
    .. [5] G. Hamerly, "Making k-means even faster", SDM 2010.
    .. [6] G. Patanè and M. Russo, "The enhanced LBG algorithm", Neural
       Networks 14(9), 2001.

    Examples
    --------
    >>> import numpy as np
    >>> from skvq import VQCodebookTransformer
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> vq = VQCodebookTransformer(n_codes=2, ema_momentum=0.5, random_state=1)
    >>> vq.fit(X).predict([[0.0, 0.2], [4.8, 5.1]]).tolist()
    [0, 1]
    >>> vq.codebook_.round(3)
    array([[0.05, 0.  ],
           [5.05, 5.  ]])
    >>> vq.n_iter_  # Lloyd steps until the assignments stopped changing
    2
    >>> vq.set_params(encode="onehot-dense").transform([[5.0, 4.9]])
    array([[0., 1.]])
    >>> vq.inverse_transform([[1.0, 0.0]])
    array([[0.05, 0.  ]])
    """

    _accepts_sparse = True

    _parameter_constraints: dict = {
        **QuantizerBase._parameter_constraints,
        "commitment_weight": [Interval(Real, 0, None, closed="left")],
        "init": [StrOptions({"k-means++", "random"}), "array-like"],
        "encode": [StrOptions({"index", "onehot", "onehot-dense", "distance"})],
    }

    def __init__(
        self,
        n_codes=256,
        *,
        ema_momentum=0.99,
        commitment_weight=0.25,
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
        self.ema_momentum = ema_momentum
        self.commitment_weight = commitment_weight
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

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Learn the code book from scratch, at k-means quality.

        Discards any previous state.  When ``X`` has more rows than
        ``batch_size``, works on nested, doubling subsets of its rows
        (stages; a row's stage follows from a hash of its values), the first
        of about ``32 * batch_size`` rows, the last all of ``X``; initialises
        the code book from the first stage, then makes
        EMA steps at momentum 0 on each whole stage (each a Lloyd iteration),
        at most 6 per stage before the last, until the stopping rules of
        ``tol`` and ``max_no_improvement``, or ``max_iter`` steps in all.
        With ``relocate``, the largest stage of at most 65,536 rows runs to
        convergence and then makes relocation rounds: moves certain to lower
        the distortion (exact gains above their costs) at once, then trials
        of one or two moves, each kept only if the distortion drops.
        The counts and sums it leaves are expressed per ``batch_size`` rows,
        so that :meth:`partial_fit` continues from them as from a stream.

        Parameters
        ----------
        X : {array-like, sparse matrix} or Dask array of shape \
                (n_samples, n_features)
            Training data.  A SciPy sparse matrix or array is converted once
            to CSR and never densified.  A Dask array is processed chunk by
            chunk where it lives, on the same stages of rows: each step is a
            reduction of per-chunk statistics, and the fit equals the NumPy
            fit to the rounding of the sums.

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
            source = self._source(X, sample_weight, reset=True, fit=True)
            config = self._config(init=self._initial_codes(source.n_features))
            with blas_held(self.n_jobs, source.plan.n_rows * self.n_codes):
                outcome = run(source, FitSchedule(config, source, rng).run())
            self._states = (outcome.state,)
            self._n_iter = outcome.n_iter
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """Apply one EMA step on a batch (initialising the code book first).

        The first call initialises the code book from ``X`` (or from ``init``
        when it is an array) and then applies one step to that same batch.

        Parameters
        ----------
        X : {array-like, sparse matrix} or Dask array of shape \
                (n_samples, n_features)
            The batch (sparse: converted to CSR, never densified).  A Dask
            array is one batch, summed chunk by chunk on its workers.

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
            unit = None if first else self._states[0].unit
            source = self._source(X, sample_weight, reset=first, unit=unit)
            if first:
                config = self._config(init=self._initial_codes(source.n_features))
                rng = check_random_state(self.random_state)
                state = run(source, start_stream(config, source, 0, rng))
            else:
                state = run(source, stream_step(config, self._states[0]))
            self._states = (state,)
        return self

    def _source(self, X, sample_weight, *, reset, fit=False, unit=None):
        """The data source of a training call (``fit``: with its stages)."""
        X, sample_weight = self._training_input(X, sample_weight, reset=reset)
        return self._make_source(X, sample_weight, fit=fit, unit=unit)

    def _initial_codes(self, n_features):
        """``init``, checked, when it is an array; else the strategy name."""
        if isinstance(self.init, str):
            return self.init
        init = check_array(self.init, dtype=np.float64, input_name="init")
        expected = (self.n_codes, n_features)
        if init.shape != expected:
            raise ValueError(
                f"The init array has shape {init.shape}, but "
                f"(n_codes, n_features) = {expected} was expected."
            )
        return init

    # ----------------------------------------------------- fitted attributes
    @property
    def n_iter_(self):
        """Steps of the last :meth:`fit` (0 if only :meth:`partial_fit` ran)."""
        self._fitted_states()
        return self.__dict__.get("_n_iter", 0)

    @property
    def codebook_(self):
        """The code vectors, of shape (n_codes, n_features)."""
        return self._fitted_states()[0].codebook

    @property
    def ema_counts_(self):
        """The EMA usage counts, of shape (n_codes,)."""
        return self._fitted_states()[0].counts

    @property
    def ema_sum_(self):
        """The EMA running sums, of shape (n_codes, n_features)."""
        return self._fitted_states()[0].ema_sum

    @property
    def ema_distortion_(self):
        """The EMA of each code's distortion, of shape (n_codes,)."""
        return self._fitted_states()[0].ema_distortion

    @property
    def n_steps_(self):
        """EMA steps since the code book was initialised."""
        return self._fitted_states()[0].n_steps

    @property
    def n_codes_reassigned_(self):
        """Codes re-seeded since the code book was initialised."""
        return self._fitted_states()[0].n_reseeded

    @property
    def n_codes_relocated_(self):
        """Codes relocated since the code book was initialised."""
        return self._fitted_states()[0].n_relocated

    @property
    def dead_codes_(self):
        """Mask of the codes found dead in the last step."""
        return self._fitted_states()[0].dead

    @property
    def perplexity_(self):
        """``exp`` of the entropy of the EMA usage distribution."""
        return self._fitted_states()[0].perplexity

    @property
    def commitment_loss_(self):
        """The VQ-VAE commitment term of the last batch."""
        state = self._fitted_states()[0]
        return self.commitment_weight * state.commitment_distortion

    # ------------------------------------------------------------ inference
    def _index(self):
        """The search structure of ``codebook_`` (in the data's units)."""
        return self._fitted_states()[0].user_index

    def predict(self, X):
        """Predict the code (index of the nearest code vector) of each sample.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Data to encode (sparse: converted to CSR, never densified).

        Returns
        -------
        codes : ndarray of shape (n_samples,), dtype=int64
            Index into ``codebook_`` of the nearest code vector.  A lazy Dask
            array when ``X`` is one.
        """
        if is_dask_array(X):
            from . import _dask

            X = self._lazy_input(X)
            return _dask.map_rows(X, self.predict, None, np.int64)
        X = self._validated_query(X)
        return (
            self._index().nearest(X, n_jobs=self.n_jobs)[0].astype(np.int64, copy=False)
        )

    def transform(self, X):
        """Encode each sample by its nearest code, as chosen by ``encode``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Data to encode (sparse: converted to CSR, never densified).

        Returns
        -------
        Xt : {ndarray, sparse matrix} of shape (n_samples, 1) or (n_samples, n_codes)
            Codes (``"index"``), one-hot codes (``"onehot"``,
            ``"onehot-dense"``) or distances to every code (``"distance"``).
            A lazy Dask array, computed block by block, when ``X`` is one.
        """
        if is_dask_array(X):
            from . import _dask

            X = self._lazy_input(X)
            if self.encode == "index":
                return _dask.map_rows(X, self.transform, 1, np.int64)
            sparse_output = self.encode == "onehot"
            return _dask.map_rows(
                X, self.transform, self.n_codes, X.dtype, sparse_output=sparse_output
            )
        X = self._validated_query(X)
        if self.encode == "distance":
            return self._index().distances(X, n_jobs=self.n_jobs)
        codes = self._index().nearest(X, n_jobs=self.n_jobs)[0]
        if self.encode == "index":
            return codes.astype(np.int64, copy=False)[:, None]
        encoded = onehot(codes[:, None], self.n_codes, X.dtype)
        if self.encode == "onehot-dense":
            return encoded.toarray()
        return encoded

    def inverse_transform(self, X):
        """Decode: the code vector of each encoded sample.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, 1) or \
                (n_samples, n_codes)
            Output of :meth:`transform` with the current ``encode``: codes for
            ``"index"`` (a 1-D array of codes, as from :meth:`predict`, is
            also accepted), one-hot rows, or distances (decoded to the nearest
            code).

        Returns
        -------
        X_decoded : ndarray of shape (n_samples, n_features)
            Rows of ``codebook_``.  A lazy Dask array when ``X`` is one.
        """
        if is_dask_array(X):
            from . import _dask

            check_is_fitted(self)
            codebook = self.codebook_
            return _dask.map_codes(
                X, self.inverse_transform, codebook.shape[1], codebook.dtype
            )
        check_is_fitted(self)
        return self.codebook_[self._decode(X)]

    def _decode(self, X):
        if self.encode == "index":
            return self._checked_codes(X)
        X = check_array(
            X,
            accept_sparse="csr",
            dtype="numeric",
            input_name="X",
            ensure_min_samples=0,
        )
        if X.shape[1] != self.n_codes:
            raise ValueError(
                f"X has {X.shape[1]} columns, but encode={self.encode!r} output has "
                f"n_codes={self.n_codes} columns."
            )
        if self.encode == "distance":
            return np.argmin(X, axis=1)
        return self._checked_onehot(X)

    def _checked_codes(self, X):
        codes = check_array(
            X, dtype="numeric", ensure_2d=False, input_name="X", ensure_min_samples=0
        )
        if codes.ndim == 2 and codes.shape[1] == 1:
            codes = codes[:, 0]
        if codes.ndim != 1:
            raise ValueError(
                f"Expected codes of shape (n_samples, 1) or (n_samples,) for "
                f"encode='index', got shape {codes.shape}."
            )
        return checked_code_values(codes, self.n_codes)

    def _checked_onehot(self, X):
        from scipy import sparse

        if sparse.issparse(X):
            X = sparse.csr_matrix(X, copy=True)
            X.eliminate_zeros()
            valid = np.all(np.diff(X.indptr) == 1) and np.all(X.data == 1)
            codes = X.indices if valid else None
        else:
            nonzero = X != 0
            codes = np.argmax(nonzero, axis=1)
            valid = np.all(nonzero.sum(axis=1) == 1) and np.all(
                X[np.arange(X.shape[0]), codes] == 1
            )
        if not valid:
            raise ValueError(
                "One-hot codes must have exactly one entry equal to 1 in each row "
                "and zeros elsewhere."
            )
        return np.asarray(codes, dtype=np.intp)

    def _sq_errors(self, X):
        """Squared distance of each row of validated ``X`` to its code."""
        return self._index().nearest(X, n_jobs=self.n_jobs, return_sq_dist=True)[1]

    def get_feature_names_out(self, input_features=None):
        """Get the names of the output columns of :meth:`transform`.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Only checked against the names seen in :meth:`fit`.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``["vqcodebooktransformer_code"]`` for ``encode="index"``;
            ``"vqcodebooktransformer_code{k}"`` (one-hot) or
            ``"vqcodebooktransformer_distance{k}"`` for k in ``range(n_codes)``.
        """
        check_is_fitted(self)
        _check_feature_names_in(self, input_features, generate_names=False)
        prefix = self.__class__.__name__.lower()
        if self.encode == "index":
            return np.asarray([f"{prefix}_code"], dtype=object)
        kind = "distance" if self.encode == "distance" else "code"
        return np.asarray(
            [f"{prefix}_{kind}{k}" for k in range(self.n_codes)], dtype=object
        )
