"""skvq: vector quantisation with an EMA code book, for scikit-learn."""

from ._codebook import VQCodebookTransformer
from ._multi import ProductVQTransformer, ResidualVQTransformer

__version__ = "0.1.0"

__all__ = [
    "ProductVQTransformer",
    "ResidualVQTransformer",
    "VQCodebookTransformer",
    "__version__",
]
