"""scikit-learn's own estimator checks, with no expected failures."""

import pytest
from sklearn.utils.estimator_checks import (
    check_dataframe_column_names_consistency,
    check_get_feature_names_out_error,
    check_global_output_transform_pandas,
    check_global_set_output_transform_polars,
    check_inplace_ensure_writeable,
    check_param_validation,
    check_set_output_transform,
    check_set_output_transform_pandas,
    check_set_output_transform_polars,
    check_transformer_get_feature_names_out,
    check_transformer_get_feature_names_out_pandas,
    parametrize_with_checks,
)

from skvq import ProductVQTransformer, ResidualVQTransformer, VQCodebookTransformer

CONFIGURATIONS = [
    VQCodebookTransformer(),
    VQCodebookTransformer(encode="onehot"),
    VQCodebookTransformer(encode="onehot-dense"),
    VQCodebookTransformer(encode="distance"),
    VQCodebookTransformer(algorithm="kd_tree"),
    VQCodebookTransformer(algorithm="brute"),
    VQCodebookTransformer(n_codes=3, ema_momentum=0.1),
    VQCodebookTransformer(n_codes=4, init="random"),
    ProductVQTransformer(),
    ProductVQTransformer(n_codes=8, n_subspaces=2, encode="onehot"),
    ResidualVQTransformer(n_stages=2),
    ResidualVQTransformer(n_codes=8, n_stages=3, beam_size=3, encode="onehot"),
]

EXTRA_CHECKS = [
    check_param_validation,
    check_transformer_get_feature_names_out,
    check_transformer_get_feature_names_out_pandas,
    check_dataframe_column_names_consistency,
    check_get_feature_names_out_error,
    check_inplace_ensure_writeable,
    check_set_output_transform,
    check_set_output_transform_pandas,
    check_global_output_transform_pandas,
    check_set_output_transform_polars,
    check_global_set_output_transform_polars,
]


@parametrize_with_checks(CONFIGURATIONS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


@pytest.mark.parametrize("estimator", CONFIGURATIONS, ids=repr)
@pytest.mark.parametrize("check", EXTRA_CHECKS, ids=lambda c: c.__name__)
def test_sklearn_extra_checks(estimator, check):
    check(type(estimator).__name__, estimator)
