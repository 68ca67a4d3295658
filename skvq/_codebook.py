"""VQCodebookTransformer: a vector quantiser whose code book learns by EMA."""

import warnings
from contextlib import contextmanager
from functools import partial
from numbers import Integral, Real

import numpy as np
from scipy import sparse
from sklearn import get_config
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_feature_names_in,
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from ._kernels import (
    LloydBounds,
    assignment_statistics,
    batch_statistics,
    ema_average,
    ema_update,
    init_codebook,
    perplexity,
    reseed_dead_codes,
    weighted_mean,
    weighted_mean_variance,
)
from ._relocation import (
    MIN_SPLIT_ROWS,
    apply_relocations,
    cell_members,
    plan_relocations,
    split_rows,
)
from ._search import _CodebookIndex, blas_held

# Smallest relative decrease of the distortion that counts as improvement.
_IMPROVEMENT_RTOL = 1e-9


def _checked_weights(sample_weight, X):
    """Non-negative float64 weights with a positive sum (on every sklearn >= 1.6)."""
    sample_weight = _check_sample_weight(
        sample_weight, X, dtype=np.float64, ensure_non_negative=True
    )
    if not np.any(sample_weight):
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return sample_weight


def _is_dask_array(X):
    """Whether ``X`` is a Dask array, without importing Dask."""
    cls = type(X)
    return cls.__name__ == "Array" and cls.__module__.startswith("dask.array")


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Initialisation never draws from more rows than this (or 3 * n_codes).
_MAX_INIT_SIZE = 2**16

# fit's first stage holds this many batches (or 3 * n_codes rows), and each
# stage but the last makes at most _STAGE_STEPS steps (docs/performance.rst).
_FIRST_STAGE_BATCHES = 32
_STAGE_STEPS = 6
# fit keeps distance bounds on stages of at least this many row-code pairs.
_BOUNDS_MIN_SCORES = 2**18

# Chosen from the experiments in docs/health.rst.
DEFAULT_DEAD_CODE_THRESHOLD = 0.05

# Relocation (docs/health.rst): at most one code in this many moves in the
# first relocation round of fit.
_FIT_MOVES_DIVISOR = 8
# A stream's split must gain this many times the cost of its merge: the gain
# is estimated on one batch, the cost known from the EMA statistics, and a
# margin stops codes from flapping between cells of nearly equal worth.
_STREAM_MIN_RATIO = 1.5
# A stream considers relocation this many times per memory (1 / (1 - m)).
_STREAM_CHECK_SHARE = 0.05
# ... and weighs splitting its this many cells of largest EMA distortion.
_STREAM_CELLS = 2
# A relocation round of fit is kept if the distortion has dropped below the
# converged one within this many steps; rounds end after this many undone
# single moves.
_PROBE_STEPS = 4
_MAX_UNDONE = 2
# Rounds end after a kept round that lowered the distortion by less than this
# fraction.
_MIN_ROUND_GAIN = 1e-4
# fit relocates on its largest stage of at most this many rows (or its first).
_RELOCATION_ROWS = 2**16


class VQCodebookTransformer(TransformerMixin, BaseEstimator):
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
          Performance page).

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
        Determines the initialisation, the order of the rows in the stages
        of :meth:`fit` and the draws of re-seeding.  Pass an int for
        reproducible results (the same whatever the threads).

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
        Number of steps made by the last :meth:`fit`, all stages together.

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
    run each step as a reduction of per-chunk statistics on the workers, and
    ``transform``, ``predict``, ``inverse_transform`` and ``score`` return
    lazy Dask arrays.  Dask is optional and imported only then.

    :meth:`fit` runs Lloyd iterations (EMA steps at momentum 0 on whole
    stages) on nested, doubling prefixes of the shuffled rows [4]_, with
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
    loading.

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
    >>> vq = VQCodebookTransformer(n_codes=2, ema_momentum=0.5, random_state=0)
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

    _parameter_constraints: dict = {
        "n_codes": [Interval(Integral, 1, None, closed="left")],
        "ema_momentum": [Interval(Real, 0, 1, closed="left")],
        "commitment_weight": [Interval(Real, 0, None, closed="left")],
        "dead_code_threshold": [Interval(Real, 0, 1, closed="left")],
        "relocate": ["boolean"],
        "init": [StrOptions({"k-means++", "random"}), "array-like"],
        "encode": [StrOptions({"index", "onehot", "onehot-dense", "distance"})],
        "algorithm": [StrOptions({"auto", "kd_tree", "brute"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_no_improvement": [Interval(Integral, 1, None, closed="left"), None],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
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
        ``batch_size``, shuffles its rows once and works on doubling prefixes
        of them (stages), the first of ``32 * batch_size`` rows, the last all
        of ``X``; initialises the code book from the first stage, then makes
        EMA steps at momentum 0 on each whole stage (each a Lloyd iteration),
        at most 6 per stage before the last, until the stopping rules of
        ``tol`` and ``max_no_improvement``, or ``max_iter`` steps in all.
        With ``relocate``, the largest stage of at most 65,536 rows runs to
        convergence and then makes relocation rounds, each kept only if the
        distortion drops.
        The counts and sums it leaves are expressed per ``batch_size`` rows,
        so that :meth:`partial_fit` continues from them as from a stream.

        Parameters
        ----------
        X : array-like or Dask array of shape (n_samples, n_features)
            Training data.  A Dask array is processed chunk by chunk where it
            lives: each step is a reduction of per-chunk statistics, and the
            chunks are taken in a new random order each pass.

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

                return _dask.fit(self, X, sample_weight)
            X, sample_weight = self._validate_batch(X, sample_weight, reset=True)
            with blas_held(self.n_jobs, X.shape[0] * self.n_codes):
                self._fit_numpy(X, sample_weight)
        return self

    def _fit_numpy(self, X, sample_weight):
        rng = check_random_state(self.random_state)
        sizes = self._stage_sizes(X.shape[0])
        if len(sizes) > 1:  # nested prefixes of one shuffled copy
            order = rng.permutation(X.shape[0])
            X, sample_weight = X[order], sample_weight[order]
        init_rows = max(self._init_size(), min(sizes[0], _MAX_INIT_SIZE))
        self._initialize(X[: sizes[0]], sample_weight[: sizes[0]], rng, init_rows)
        variance = weighted_mean_variance(X, sample_weight) if self.tol > 0 else 0.0
        stages = self._stage_steps(X, sample_weight, sizes)
        self._run_stages(
            stages,
            sizes,
            variance,
            lambda stage, cells, labels, counts: split_rows(
                cell_members(X, sample_weight, labels, cells), counts
            ),
        )

    def partial_fit(self, X, y=None, sample_weight=None):
        """Apply one EMA step on a batch (initialising the code book first).

        The first call initialises the code book from ``X`` (or from ``init``
        when it is an array) and then applies one step to that same batch.

        Parameters
        ----------
        X : array-like or Dask array of shape (n_samples, n_features)
            The batch.  A Dask array is one batch, summed chunk by chunk on
            its workers.

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        self : object
            Updated estimator.
        """
        self._validate_params_once()
        with self._unchanged_on_error():
            if _is_dask_array(X):
                from . import _dask

                return _dask.partial_fit(self, X, sample_weight)
            first = not hasattr(self, "codebook_")
            X, sample_weight = self._validate_batch(X, sample_weight, reset=first)
            if first:
                self._initialize(
                    X, sample_weight, check_random_state(self.random_state)
                )
            self._step(X, sample_weight)
        return self

    @contextmanager
    def _unchanged_on_error(self):
        # Every update below replaces arrays instead of writing into them, so
        # a shallow copy of the attributes is enough to roll back.
        saved = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _validate_params_once(self):
        """``_validate_params``, skipped while the parameters are the same objects.

        ``partial_fit`` is called once per batch of a stream: validating the
        parameters again each time would cost more than a small step.
        """
        current = tuple(getattr(self, name) for name in self._parameter_constraints)
        validated = self.__dict__.get("_validated_params")
        if validated is None or any(
            a is not b for a, b in zip(current, validated, strict=True)
        ):
            self._validate_params()
            self._validated_params = current

    def _validate_batch(self, X, sample_weight, *, reset):
        if not reset and self._is_clean_batch(X):
            # The checks validate_data would make, for a plain float array.
            n_samples = X.shape[0]
            if sample_weight is None:
                return X, np.ones(n_samples)
            return X, _checked_weights(sample_weight, X)
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], order="C", reset=reset
        )
        return X, _checked_weights(sample_weight, X)

    def _is_clean_batch(self, X):
        """Whether ``X`` is a C-contiguous, finite float array of the right width.

        Anything else goes through ``validate_data``, with its usual errors
        and warnings (feature names included).
        """
        return (
            type(X) is np.ndarray
            and X.ndim == 2
            and X.dtype in _FLOAT_DTYPES
            and X.flags.c_contiguous
            and X.shape[0] > 0
            and X.shape[1] == self.n_features_in_
            and "feature_names_in_" not in self.__dict__
            and bool(np.isfinite(X).all())
        )

    def _initial_codebook(self, X, sample_weight, rng, max_rows=None):
        if not isinstance(self.init, str):
            init = check_array(self.init, dtype=np.float64, input_name="init")
            expected = (self.n_codes, X.shape[1])
            if init.shape != expected:
                raise ValueError(
                    f"The init array has shape {init.shape}, but "
                    f"(n_codes, n_features) = {expected} was expected."
                )
            return init
        init_size = self._init_size() if max_rows is None else max_rows
        if X.shape[0] > init_size:
            rows = rng.choice(X.shape[0], size=init_size, replace=False)
            X, sample_weight = X[rows], sample_weight[rows]
        codebook, n_distinct = init_codebook(
            X, sample_weight, self.n_codes, self.init, rng
        )
        if n_distinct < self.n_codes:
            warnings.warn(
                f"Only {n_distinct} distinct samples of positive weight were "
                f"available to initialise n_codes={self.n_codes} codes; the code "
                "book repeats some of them.",
                UserWarning,
                stacklevel=3,
            )
        return codebook

    def _init_size(self):
        """Rows that initialisation draws from at most."""
        return max(3 * self.n_codes, min(3 * self.batch_size, _MAX_INIT_SIZE))

    def _initialize(self, X, sample_weight, rng, max_rows=None):
        codebook = self._initial_codebook(X, sample_weight, rng, max_rows)
        self.codebook_ = codebook.astype(X.dtype)
        self.ema_counts_ = np.ones(self.n_codes)
        self.ema_sum_ = self.codebook_.astype(np.float64)
        self.n_steps_ = 0
        self.ema_distortion_ = np.zeros(self.n_codes)
        self.n_codes_reassigned_ = 0
        self.n_codes_relocated_ = 0
        self.dead_codes_ = np.zeros(self.n_codes, dtype=bool)
        self.perplexity_ = float(self.n_codes)
        # Seed of the reassignment draws: step t draws from
        # default_rng([seed, t]), so a pickled estimator continues exactly.
        self._seed = int(rng.randint(np.iinfo(np.int32).max))
        self._index = self._build_index(self.codebook_)

    def _build_index(self, codebook):
        return _CodebookIndex(codebook, self.algorithm)

    def _step(
        self, X, sample_weight, momentum=None, scale=None, pool=None, bounds=None
    ):
        """One EMA step on a validated batch; returns its statistics and labels.

        ``momentum`` defaults to ``ema_momentum``.  A ``scale`` marks one of
        ``fit``'s full steps: the batch statistics are multiplied by it (to
        express them per ``batch_size`` rows), only codes that won no weight
        count as dead, and relocation waits for the end of the stage.
        ``pool`` selects the rows that dead codes are re-seeded from
        (default: the whole batch); ``bounds`` (a
        :class:`~skvq._kernels.LloydBounds`) carries distance bounds from one
        full step on ``X`` to the next.
        """
        stats, labels, sq_dist = batch_statistics(
            self._index, X, sample_weight, self.n_codes, self.n_jobs, bounds
        )
        self._update(X, sample_weight, labels, sq_dist, stats, momentum, scale, pool)
        return stats, labels

    def _update(
        self,
        X,
        sample_weight,
        labels,
        sq_dist,
        stats=None,
        momentum=None,
        scale=None,
        pool=None,
    ):
        """The EMA step of :meth:`_step` from a given assignment of ``X``.

        The multi-codebook quantisers assign rows jointly (a residual code
        depends on the codes of the other stages) and update each code book
        through here; ``stats`` are computed when not given.
        """
        if stats is None:
            stats = assignment_statistics(
                X, labels, sq_dist, sample_weight, self.n_codes, self.n_jobs
            )
        split_cells = self._split_candidates() if scale is None else ()
        rows = slice(None) if pool is None else pool
        reseed_pool = (X[rows], sample_weight[rows], sq_dist[rows])
        members = cell_members(X, sample_weight, labels, split_cells, MIN_SPLIT_ROWS)
        self._apply_statistics(
            stats, reseed_pool, momentum, scale, split_rows(members, stats.counts)
        )

    def _split_candidates(self):
        """Cells a stream's step may split: the largest EMA distortions.

        Relocation is considered every ``_STREAM_CHECK_SHARE / (1 - m)``
        steps (every 5 at the default momentum 0.99): the EMA statistics it
        weighs change on the scale of ``1 / (1 - m)`` steps, and a check
        costs a few 2-means fits.  The codes that may move are the
        ``4 * _STREAM_CELLS`` live codes of smallest EMA distortion.
        """
        if not self.relocate:
            return ()
        period = max(1, round(_STREAM_CHECK_SHARE / (1.0 - self.ema_momentum)))
        if (self.n_steps_ + 1) % period:
            return ()
        n_cells = min(_STREAM_CELLS, self.n_codes)
        distortion = self.ema_distortion_
        cells = np.argsort(-distortion, kind="stable")[:n_cells]
        return cells[distortion[cells] > 0]

    def _apply_statistics(
        self, stats, reseed_pool, momentum=None, scale=None, splits=None
    ):
        """The EMA update from a batch's summed statistics, then maintenance.

        ``reseed_pool`` is ``(rows, weights, sq_dist)``: the batch, or a
        weighted sample of it, from which dead codes are re-seeded (None: no
        rows to re-seed from, dead codes wait).  With a
        ``scale`` (a full step of ``fit``), the statistics are multiplied by
        it and a code is dead only when its cell is empty: on all the data, a
        small count is a small cell, not a code that stopped winning.
        ``splits`` (cell -> rows and weights of the batch) lets a stream
        relocate codes into those cells.
        """
        if momentum is None:
            momentum = self.ema_momentum
        batch_counts, batch_sums = stats.counts, stats.sums
        batch_distortions = stats.distortions
        if scale is not None and scale != 1.0:
            batch_counts, batch_sums = batch_counts * scale, batch_sums * scale
            batch_distortions = batch_distortions * scale
        counts, sums, codebook = ema_update(
            self.ema_counts_,
            self.ema_sum_,
            self.codebook_,
            batch_counts,
            batch_sums,
            momentum,
        )
        state = (
            codebook,
            counts,
            sums,
            ema_average(self.ema_distortion_, batch_distortions, momentum),
        )
        state, dead, n_reseeded = self._reseed(state, reseed_pool, scale, batch_counts)
        moves = []
        if splits:
            by_distortion = np.argsort(state[3], kind="stable")
            moves = plan_relocations(
                state[0],
                state[1],
                splits,
                by_distortion[~dead[by_distortion]][: 4 * len(splits)],
                len(splits),
                _STREAM_MIN_RATIO,
            )
            state = apply_relocations(state, moves)
            if moves and self.verbose:
                print(
                    f"Step {self.n_steps_ + 1}: relocated codes "
                    + ", ".join(f"{m.code} (into {m.split})" for m in moves)
                )
        self._set_state(state)
        self.n_steps_ += 1
        self.n_codes_reassigned_ += n_reseeded
        self.n_codes_relocated_ += len(moves)
        self.dead_codes_ = dead
        self.commitment_loss_ = self.commitment_weight * stats.loss / stats.weight

    def _reseed(self, state, reseed_pool, scale, batch_counts):
        """Re-seed the dead codes of ``state``; returns (state, dead, n_reseeded).

        A code is dead when its count is below ``dead_code_threshold`` times
        the mean count (the EMA weight per code of a batch), or when it
        repeats a lower code; in a full step only if its cell is empty too.
        It restarts with the mean count, as an average code: unless it wins,
        it is dead again only after ``log(threshold) / log(ema_momentum)``
        steps, whatever the batch size.
        """
        counts = state[1]
        mean_count = counts.mean()
        limit = self.dead_code_threshold * mean_count
        dead = counts < limit
        if limit > 0 and self._index.ids is not None:
            # A copy of a lower code can never win: it is dead whatever its count.
            copies = np.ones(self.n_codes, dtype=bool)
            copies[self._index.ids] = False
            dead |= copies
        if scale is not None:
            dead &= batch_counts == 0
        if not dead.any() or reseed_pool is None:
            return state, dead, 0
        rng = np.random.default_rng([self._seed, self.n_steps_])
        state, reseeded = reseed_dead_codes(state, dead, *reseed_pool, rng, mean_count)
        return state, dead, reseeded.shape[0]

    def _set_state(self, state):
        """Install ``(codebook, counts, sums, distortions)`` and its index."""
        index = self._build_index(state[0])
        self.codebook_, self.ema_counts_, self.ema_sum_, self.ema_distortion_ = state
        self._index = index
        self.perplexity_ = perplexity(self.ema_counts_)

    def _stage_sizes(self, n_samples):
        """Rows of each stage of ``fit``: doubling prefixes, the last all rows."""
        if self.batch_size >= n_samples:
            return [n_samples]
        first = max(3 * self.n_codes, _FIRST_STAGE_BATCHES * self.batch_size)
        sizes = [min(first, n_samples)]
        while sizes[-1] < n_samples:
            sizes.append(min(2 * sizes[-1], n_samples))
        return sizes

    def _stage_steps(self, X, sample_weight, sizes):
        """One full step (momentum 0, a Lloyd iteration) per stage prefix.

        Statistics are expressed per ``batch_size`` rows; dead codes are
        re-seeded from the first rows of the prefix.
        """
        batch_size = min(self.batch_size, X.shape[0])
        pool = slice(0, self._init_size())
        return [
            partial(
                self._step,
                X[:size],
                sample_weight[:size],
                0.0,
                batch_size / size,
                pool,
                # Below this size the bookkeeping costs more than it saves.
                LloydBounds(X.shape[1], X.dtype)
                if size * self.n_codes >= _BOUNDS_MIN_SCORES
                else None,
            )
            for size in sizes
        ]

    def _run_stages(self, stages, sizes, mean_variance, gather=None):
        """Full steps on each stage until it settles, then on the next.

        Stage ``s`` of ``n_s`` rows ends when the code book moves less than
        ``tol * n / n_s`` (scaled by the variance; its sample noise is that
        much larger) or after ``_STAGE_STEPS`` steps; the last stage ends by
        :class:`_EarlyStopping`.  With ``relocate``, the largest stage of at
        most ``_RELOCATION_ROWS`` rows (or the first) also runs until that
        rule, then relocation rounds (see :meth:`_relocation_rounds`;
        ``gather(stage, cells, labels, counts)`` fetches the rows of cells).
        ``max_iter`` caps the steps of all stages and rounds.
        """
        self.n_iter_ = 0
        relocation_stage = None
        if self.relocate and gather is not None:
            fits = [s for s, size in enumerate(sizes) if size <= _RELOCATION_ROWS]
            relocation_stage = fits[-1] if fits else 0
        for stage, (step, size) in enumerate(zip(stages, sizes, strict=True)):
            if self.n_iter_ == self.max_iter:
                return
            settle = stage in (len(stages) - 1, relocation_stage)
            result = self._converge(
                step,
                f"stage {stage + 1}, {size} rows",
                mean_variance,
                None if settle else _STAGE_STEPS,
                None if settle else mean_variance * self.tol * sizes[-1] / size,
            )
            if stage == relocation_stage and result[3]:
                self._relocation_rounds(
                    step, partial(gather, stage), mean_variance, result
                )

    def _converge(self, step, label, mean_variance, limit=None, tol=None):
        """Full steps until a stopping rule fires, or ``limit`` steps.

        The rule is the stage rule (shift at most ``tol``) when ``tol`` is
        given, else :class:`_EarlyStopping`.  Returns the last step's
        ``(stats, labels, loss, converged)``: ``converged`` tells whether
        the rule fired (rather than ``limit`` or ``max_iter``).
        """
        stopper = _EarlyStopping(self, mean_variance)
        for n_steps in range(1, self.max_iter - self.n_iter_ + 1):
            start_codebook = self.codebook_
            reassigned_before = self.n_codes_reassigned_
            stats, labels = step()
            self.n_iter_ += 1
            loss = stats.loss / stats.weight
            shift = float(
                np.sum((self.codebook_ - start_codebook).astype(np.float64) ** 2)
            )
            if self.verbose:
                print(
                    f"Step {self.n_iter_} ({label}): distortion {loss:.6g}, "
                    f"perplexity {self.perplexity_:.4g}, "
                    f"{self.n_codes_reassigned_ - reassigned_before} codes reassigned"
                )
            converged = (
                shift <= tol if tol is not None else stopper.should_stop(loss, shift)
            )
            if converged and tol is None and self.verbose:
                print(f"Converged after step {self.n_iter_}: {stopper.reason}.")
            if converged or n_steps == limit:
                break
        return stats, labels, loss, converged

    def _relocation_rounds(self, step, gather, mean_variance, converged):
        """Relocate codes after convergence while that lowers the distortion.

        Each round plans moves from the last step's cells (the cheapest
        codes to merge into the cells with the largest split gain, see
        :func:`~skvq._relocation.plan_relocations`), applies them and makes
        up to ``_PROBE_STEPS`` full steps.  A round whose distortion has not
        dropped below the converged one by then is undone, and the next
        round tries half as many moves (after a single move, another code
        and another cell); a kept round runs to convergence.  The rounds end
        when no move is worth trying, after ``_MAX_UNDONE`` undone single
        moves, after a kept round that gained less than ``_MIN_ROUND_GAIN``,
        or at half of ``max_iter``.
        """
        max_moves = max(1, self.n_codes // _FIT_MOVES_DIVISOR)
        stats, labels, best, _ = converged
        movable = np.ones(self.n_codes, dtype=bool)
        splittable = np.ones(self.n_codes, dtype=bool)
        n_undone = 0
        budget = self.max_iter // 2  # leave steps for the stages that follow
        while self.n_iter_ < budget and n_undone < _MAX_UNDONE:
            cells = np.argsort(-stats.distortions, kind="stable")
            cells = cells[splittable[cells]][: 2 * max_moves]
            moves = plan_relocations(
                self.codebook_,
                stats.counts,
                gather(cells, labels, stats.counts),
                np.flatnonzero(movable),
                max_moves,
                0.0,
            )
            if not moves:
                break
            saved = dict(self.__dict__)
            self._set_state(apply_relocations(self._state(), moves))
            probe = self._converge(step, "relocated", mean_variance, _PROBE_STEPS)
            kept = probe[2] < best * (1.0 - _IMPROVEMENT_RTOL)
            if self.verbose:
                print(
                    f"Relocated {len(moves)} codes: distortion {best:.6g} -> "
                    f"{probe[2]:.6g}, {'kept' if kept else 'undone'}."
                )
            if kept:
                self.n_codes_relocated_ += len(moves)
                if not probe[3] and self.n_iter_ < budget:
                    probe = self._converge(step, "relocated", mean_variance)
                stats, labels, loss, _ = probe
                if loss > best * (1.0 - _MIN_ROUND_GAIN):
                    break
                best = loss
                continue
            n_iter, n_steps = self.n_iter_, self.n_steps_
            self.__dict__.update(saved)
            self.n_iter_, self.n_steps_ = n_iter, n_steps
            if len(moves) == 1:
                movable[moves[0].code] = splittable[moves[0].split] = False
                n_undone += 1
            max_moves = max(1, len(moves) // 2)

    def _state(self):
        return self.codebook_, self.ema_counts_, self.ema_sum_, self.ema_distortion_

    # ------------------------------------------------------------ inference
    def _lazy(self, method, *args):
        """The lazy, blockwise version of ``method`` for Dask input."""
        check_is_fitted(self)
        from . import _dask

        return getattr(_dask, method)(self, *args)

    def _validated_query(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False)

    def predict(self, X):
        """Predict the code (index of the nearest code vector) of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples,), dtype=int64
            Index into ``codebook_`` of the nearest code vector.  A lazy Dask
            array when ``X`` is one.
        """
        if _is_dask_array(X):
            return self._lazy("predict", X)
        X = self._validated_query(X)
        return self._index.nearest(X, n_jobs=self.n_jobs)[0].astype(
            np.int64, copy=False
        )

    def transform(self, X):
        """Encode each sample by its nearest code, as chosen by ``encode``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to encode.

        Returns
        -------
        Xt : {ndarray, sparse matrix} of shape (n_samples, 1) or (n_samples, n_codes)
            Codes (``"index"``), one-hot codes (``"onehot"``,
            ``"onehot-dense"``) or distances to every code (``"distance"``).
            A lazy Dask array, computed block by block, when ``X`` is one.
        """
        if _is_dask_array(X):
            return self._lazy("transform", X)
        X = self._validated_query(X)
        if self.encode == "distance":
            return self._index.distances(X, n_jobs=self.n_jobs)
        codes = self._index.nearest(X, n_jobs=self.n_jobs)[0]
        if self.encode == "index":
            return codes.astype(np.int64, copy=False)[:, None]
        n_samples = X.shape[0]
        onehot = sparse.csr_matrix(
            (np.ones(n_samples, dtype=X.dtype), codes, np.arange(n_samples + 1)),
            shape=(n_samples, self.n_codes),
        )
        if self.encode == "onehot-dense":
            return onehot.toarray()
        if get_config().get("sparse_interface", "spmatrix") == "sparray":
            return sparse.csr_array(onehot)
        return onehot

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
        if _is_dask_array(X):
            return self._lazy("inverse_transform", X)
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
        if codes.dtype.kind == "f" and not np.array_equal(codes, np.round(codes)):
            raise ValueError("Codes must be integers; got non-integer values.")
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise ValueError(
                f"Codes must lie in [0, n_codes={self.n_codes}); got values from "
                f"{codes.min()} to {codes.max()}."
            )
        return codes.astype(np.intp)

    def _checked_onehot(self, X):
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

    def score(self, X, y=None, sample_weight=None):
        """Return minus the weighted mean squared distance of X to its nearest codes.

        Higher is better, as :class:`~sklearn.model_selection.GridSearchCV`
        expects.

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
            ``-sum(w_i * ||x_i - c(x_i)||^2) / sum(w_i)``.  A lazy 0-d Dask
            array when ``X`` is one.
        """
        if _is_dask_array(X):
            return self._lazy("score", X, sample_weight)
        X = self._validated_query(X)
        sample_weight = _checked_weights(sample_weight, X)
        return -weighted_mean(self._sq_errors(X), sample_weight)

    def _sq_errors(self, X):
        """Squared distance of each row of validated ``X`` to its code."""
        return self._index.nearest(X, n_jobs=self.n_jobs, return_sq_dist=True)[1]

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

    # ------------------------------------------------------- persistence etc.
    def __getstate__(self):
        state = dict(super().__getstate__())  # may be the live __dict__
        state.pop("_index", None)  # rebuilt on load: no SciPy object persisted
        state.pop("_validated_params", None)  # a cache of parameter objects
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "codebook_" in self.__dict__:
            self._index = self._build_index(self.codebook_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.encode == "index":
            tags.transformer_tags.preserves_dtype = []
        else:
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


class _EarlyStopping:
    """Early-stopping rule of ``fit``'s full steps, fed each one's loss and shift.

    ``loss`` is the distortion of the code book before the step, ``shift``
    the sum over codes of their squared movement in the step.
    """

    def __init__(self, estimator, mean_variance):
        self.max_no_improvement = estimator.max_no_improvement
        self.tol = estimator.tol * mean_variance
        self.best_loss = np.inf
        self.n_no_improvement = 0
        self.reason = ""

    def should_stop(self, loss, shift):
        if loss < self.best_loss * (1.0 - _IMPROVEMENT_RTOL):
            self.best_loss = loss
            self.n_no_improvement = 0
        else:
            self.n_no_improvement += 1
        if self.tol > 0 and shift <= self.tol:
            self.reason = (
                "the assignments no longer change"
                if shift == 0
                else f"the code book moved less than tol ({shift:.3g})"
            )
        elif (
            self.max_no_improvement is not None
            and self.n_no_improvement >= self.max_no_improvement
        ):
            self.reason = f"no improvement in {self.n_no_improvement} passes"
        return bool(self.reason)
