"""skvq: vector quantisation with an EMA code book, for scikit-learn."""

from ._codebook import VQCodebookTransformer

__version__ = "0.1.0"

__all__ = ["VQCodebookTransformer", "__version__"]
