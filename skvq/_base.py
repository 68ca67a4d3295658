"""What the three estimators share: parameters, validation, rollback, output.

Estimators orchestrate: they validate their input, build a data source
(:mod:`skvq._sources` in memory, :mod:`skvq._dask` for Dask arrays), run the
training schedules on it and keep the resulting code book states
(:class:`~skvq._state.CodebookState`), which are immutable.  A call that
raises restores the attributes it found, states included, so a failed call
changes nothing.
"""

from contextlib import contextmanager
from dataclasses import fields
from numbers import Integral, Real

import numpy as np
from scipy import sparse
from sklearn import get_config
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._kernels import weighted_mean
from ._sources import in_memory_source
from ._sparse import canonical_csr, is_sparse
from ._state import CodebookState, TrainingConfig
from ._validation import checked_weights, quiet_validation

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Chosen from the experiments in docs/health.rst.
DEFAULT_DEAD_CODE_THRESHOLD = 0.05


def is_dask_array(X):
    """Whether ``X`` is a Dask array, without importing Dask."""
    cls = type(X)
    return cls.__name__ == "Array" and cls.__module__.startswith("dask.array")


def mean_sq_error(sq_errors, sample_weight):
    """The weighted mean of squared errors, or an OverflowError naming the
    problem when it exceeds float64's range."""
    mean = weighted_mean(sq_errors, sample_weight)
    if not np.isfinite(mean):
        raise OverflowError(
            "The mean squared distance of X to its reconstruction exceeds "
            "float64's range; rescale X (or compare the models on rescaled data)."
        )
    return mean


def onehot(codes, n_codes, dtype):
    """One-hot rows of ``codes`` (n_samples, n_codebooks): one 1 per code
    book, code book ``j`` owning columns ``j * n_codes`` onwards; a sparse
    array when scikit-learn's ``sparse_interface`` is ``"sparray"``."""
    n_samples, n_codebooks = codes.shape
    columns = codes + n_codes * np.arange(n_codebooks)
    matrix = sparse.csr_matrix(
        (
            np.ones(codes.size, dtype=dtype),
            columns.ravel(),
            np.arange(0, codes.size + 1, n_codebooks),
        ),
        shape=(n_samples, n_codebooks * n_codes),
    )
    if get_config().get("sparse_interface", "spmatrix") == "sparray":
        return sparse.csr_array(matrix)
    return matrix


class QuantizerBase(TransformerMixin, BaseEstimator):
    """Parameters, validation, rollback and output of every skvq quantiser.

    Subclasses keep their code book states in ``self._states`` (a tuple of
    :class:`~skvq._state.CodebookState`).
    """

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

    # ------------------------------------------------------------ fitted
    def __sklearn_is_fitted__(self):
        return "_states" in self.__dict__

    def _fitted_states(self):
        check_is_fitted(self)
        return self._states

    def _config(self, **overrides):
        """The training configuration from the current parameters."""
        return TrainingConfig.from_params(self.get_params(), **overrides)

    @contextmanager
    def _unchanged_on_error(self):
        """Restore every attribute if the body raises (states are immutable,
        so a shallow copy is a full snapshot)."""
        saved = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    # -------------------------------------------------------- validation
    def _validate_params_once(self):
        """``_validate_params``, skipped while the parameters are the same
        objects; returns the training configuration of those parameters.

        ``partial_fit`` is called once per batch of a stream: validating the
        parameters (and reading them with ``get_params``) again each time
        would cost more than a small step.
        """
        current = tuple(getattr(self, name) for name in self._parameter_constraints)
        cached = self.__dict__.get("_validated_params")
        if cached is None or any(
            a is not b for a, b in zip(current, cached[0], strict=True)
        ):
            self._validate_params()
            cached = self._validated_params = (current, self._config())
        return cached[1]

    # Whether the estimator takes SciPy sparse input (as canonical CSR).
    _accepts_sparse = False

    def _validate_batch(self, X, sample_weight, *, reset):
        """Validated rows (C-contiguous float32 or float64, or canonical CSR)
        and weights."""
        if not reset and self._is_clean_batch(X):
            # The checks validate_data would make, for a plain float array.
            if sample_weight is None:
                return X, np.ones(X.shape[0])
            return X, checked_weights(sample_weight, X)
        X = self._validated(X, reset=reset, order="C")
        return X, checked_weights(sample_weight, X)

    def _validated(self, X, *, reset, order=None):
        """``validate_data`` of float rows; sparse ones, where the estimator
        takes them, as CSR in canonical form (:mod:`skvq._sparse`)."""
        if is_sparse(X) and not self._accepts_sparse:
            raise TypeError(
                f"{type(self).__name__} does not accept sparse input: its code "
                "books quantise dense slices or residuals of the rows. Use "
                "VQCodebookTransformer, which trains and encodes sparse rows "
                "without densifying them, or X.toarray() if the dense rows fit "
                "in memory."
            )
        with quiet_validation():
            X = validate_data(
                self,
                X,
                dtype=[np.float64, np.float32],
                order=order,
                accept_sparse="csr" if self._accepts_sparse else False,
                reset=reset,
            )
        return canonical_csr(X) if is_sparse(X) else X

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

    def _training_input(self, X, sample_weight, *, reset):
        """Validated rows and weights (a NumPy array), or a checked Dask array
        and the weights as given (their values are checked in the tasks)."""
        if is_dask_array(X):
            return self._checked_dask(X, reset=reset), sample_weight
        return self._validate_batch(X, sample_weight, reset=reset)

    def _make_source(
        self, X, sample_weight, *, fit=False, unit=None, columns=None, keep_rows=None
    ):
        """The data source of a training call: the stages of a ``fit``, else
        one batch; ``unit`` defaults to the one the data call for.
        ``keep_rows``: a batch whose blocks keep what requests set on them
        from one request to the next (a Dask batch does not, by default)."""
        params = dict(
            n_jobs=self.n_jobs,
            batch_size=self.batch_size,
            n_codes=self.n_codes,
            fit=fit,
            unit=unit,
            columns=columns,
            keep_rows=keep_rows,
        )
        if is_dask_array(X):
            from . import _dask

            return _dask.dask_source(X, sample_weight, **params)
        return in_memory_source(X, sample_weight, **params)

    def _validated_query(self, X):
        check_is_fitted(self)
        return self._validated(X, reset=False)

    def _checked_dask(self, X, *, reset):
        """A Dask array checked for shape, dtype and width (values are checked
        inside the tasks); records the width when ``reset``."""
        from . import _dask

        n_features = None if reset else self.n_features_in_
        X = _dask.checked_array(X, n_features=n_features, name=type(self).__name__)
        if reset:
            self.n_features_in_ = X.shape[1]
            self.__dict__.pop("feature_names_in_", None)
        return X

    def _lazy_input(self, X):
        check_is_fitted(self)
        return self._checked_dask(X, reset=False)

    # ------------------------------------------------------------ scoring
    def score(self, X, y=None, sample_weight=None):
        """Minus the weighted mean squared reconstruction error of ``X``.

        The reconstruction of a sample is its decoded encoding (for
        :class:`~skvq.VQCodebookTransformer`, its nearest code vector).
        Higher is better, as :class:`~sklearn.model_selection.GridSearchCV`
        expects.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Data to score (sparse input: :class:`~skvq.VQCodebookTransformer`
            only).

        y : Ignored
            Not used, present here for API consistency by convention.

        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples; ``None`` weights all equally.

        Returns
        -------
        score : float
            ``-sum(w_i * ||x_i - decode(encode(x_i))||^2) / sum(w_i)``.  A
            lazy 0-d Dask array when ``X`` is one.  Raises an
            ``OverflowError`` when the mean exceeds float64's range.
        """
        if is_dask_array(X):
            from . import _dask

            X = self._lazy_input(X)
            return _dask.lazy_score(X, sample_weight, self._sq_errors)
        X = self._validated_query(X)
        sample_weight = checked_weights(sample_weight, X)
        return -mean_sq_error(self._sq_errors(X), sample_weight)

    # -------------------------------------------------------------- misc
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = self._accepts_sparse
        if self.encode == "index":
            tags.transformer_tags.preserves_dtype = []
        else:
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def __getstate__(self):
        state = dict(super().__getstate__())  # may be the live __dict__
        state.pop("_validated_params", None)  # a cache of parameter objects
        if "_states" in state:
            # Plain arrays and numbers: skops then trusts the estimator's
            # class alone, and no search structure is persisted.  A loaded
            # state gets a fresh version.
            state["_states"] = [
                {f.name: getattr(s, f.name) for f in fields(s) if f.name != "version"}
                for s in state["_states"]
            ]
        return state

    def __setstate__(self, state):
        if "_states" in state:
            state = dict(state)
            state["_states"] = tuple(CodebookState(**s) for s in state["_states"])
        super().__setstate__(state)
