"""Test configuration shared by the test suite and the doctests."""

import os

# scikit-learn's array API check (run with NumPy inputs) needs SciPy's array
# API mode, which must be set before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
