"""Every public docstring of skvq passes numpydoc's validator."""

import inspect

import pytest
from numpydoc.validate import validate

import skvq

# Checks left out, as in scikit-learn's own docstring tests: a docstring may
# start on the line of the quotes (GL01), methods need no See Also (SA01),
# Examples (EX01) or extended summary (ES01), and "Returns" may describe
# several values in prose (RT02).
IGNORED = {"GL01", "SA01", "EX01", "ES01", "RT02"}


def public_objects():
    for name in skvq.__all__:
        obj = getattr(skvq, name)
        if not inspect.isclass(obj):
            continue
        yield f"skvq.{name}"
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and callable(member):
                yield f"skvq.{name}.{attr}"


def test_the_class_has_see_also_and_examples():
    errors = {code for code, _ in validate("skvq.VQCodebookTransformer")["errors"]}
    assert not errors & {"SA01", "EX01"}


@pytest.mark.parametrize("path", list(public_objects()))
def test_docstring_is_valid(path):
    result = validate(path)
    errors = [(code, msg) for code, msg in result["errors"] if code not in IGNORED]
    assert not errors, "\n".join(f"{path}: {code} {msg}" for code, msg in errors)
