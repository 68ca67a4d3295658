"""Sphinx configuration for the skvq documentation (builds offline)."""

import os
import sys
from datetime import date

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

import skvq  # noqa: E402

project = "skvq"
author = "The skvq developers"
copyright = f"{date.today().year}, {author}"
version = release = skvq.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
templates_path = ["_templates"]

autosummary_generate = True
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# "all" followed by codes means every check except those codes.
# The same set as tests/test_docstrings.py.
numpydoc_validation_checks = {"all", "GL01", "SA01", "EX01", "ES01", "RT02"}
numpydoc_xref_param_type = False

# No intersphinx: the build must work offline.  Cross-references to
# scikit-learn, NumPy and SciPy objects render as plain literals.
nitpicky = False

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "reference_url": {"skvq": None},
    "backreferences_dir": "backreferences",
    "doc_module": ("skvq",),
}

html_theme = "pydata_sphinx_theme"
html_title = f"skvq {version}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "icon_links": [],
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False
myst_heading_anchors = 2
suppress_warnings = ["config.cache"]
