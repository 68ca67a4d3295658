"""Checks of input values that the estimators and the Dask tasks share."""

import numpy as np
from sklearn.utils.validation import _check_sample_weight


def quiet_validation():
    """Silence invalid-value warnings while scikit-learn validates data.

    Its fast finiteness check sums the data, which overflows to
    ``inf - inf`` for finite float32 data near the dtype's limit; its exact
    check that follows still raises for NaN and infinity.
    """
    return np.errstate(invalid="ignore", over="ignore")


def checked_weights(sample_weight, X):
    """Non-negative float64 weights with a positive sum (on every sklearn >= 1.6)."""
    sample_weight = _check_sample_weight(
        sample_weight, X, dtype=np.float64, ensure_non_negative=True
    )
    if not np.any(sample_weight):
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return sample_weight


def checked_code_values(codes, n_codes):
    """Integer codes in ``[0, n_codes)`` as intp, or a ValueError naming the
    problem (codes already checked for shape and finiteness)."""
    if codes.dtype.kind == "f" and not np.array_equal(codes, np.round(codes)):
        raise ValueError("Codes must be integers; got non-integer values.")
    if codes.size and (codes.min() < 0 or codes.max() >= n_codes):
        raise ValueError(
            f"Codes must lie in [0, n_codes={n_codes}); got values from "
            f"{codes.min()} to {codes.max()}."
        )
    return codes.astype(np.intp)
