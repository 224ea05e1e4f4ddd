"""Sphinx configuration of the lqae-sklearn site: ``sphinx-build -W --keep-going -b html docs docs/_build/html``."""

import os
import warnings

# One BLAS thread: the examples' torch work and scikit-learn's BLAS calls otherwise compete for the build
# machine's cores (on 2 shared cores a 300-image LogisticRegression fit ran 46x slower with 2 BLAS threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lqae_sklearn

project = "lqae-sklearn"
author = "lqae-sklearn developers"
copyright = "lqae-sklearn developers"
release = version = lqae_sklearn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# Sources only: the JSON/JSONL results the Markdown pages link to are data, not pages.
exclude_patterns = ["_build", "results", "img", "sg_execution_times.rst"]

# -- API reference: autosummary stubs under api/generated/, numpydoc docstrings, validated -----------------
autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections say the types; signatures stay short
numpydoc_show_class_members = False  # the class template documents the methods on the class's own page
numpydoc_xref_param_type = False
numpydoc_validation_checks = {
    "all",
    # Exclusions (each applies to every docstring):
    "ES01",  # extended summary: one-line docstrings of small helpers say all there is to say
    "SA01",  # See Also: cross-links are given where they help, not on every method
    "SS05",  # summary in infinitive verb form: "Draws" / "Draw" is style, and nouns ("Token map: ...") read better
    "RT02",  # Returns with a name: scikit-learn's own style ("self : object") names them
    "EX01",  # Examples on every *method*: the class's Examples show them; classes and functions: see below
}
# Not validated (the only exclusions): the backends' implementations of LanguageModelBackend's abstract
# methods, documented once on the base class (autodoc shows the inherited docstring).
numpydoc_validation_exclude = {r"\.(HuggingFaceBackend|OpenAICompatibleBackend)\.(load|score|identity)$"}


def _skip_metadata_request_setters(app, what, name, obj, skip, options):
    """scikit-learn generates ``set_*_request`` methods on every estimator; its own docs describe them."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def _require_examples(app, what, name, obj, options, lines):
    """Every public class, exception and function has an Examples section (numpydoc's EX01, minus methods)."""
    if what in ("class", "exception", "function") and not any(line.strip() == "Examples" for line in lines):
        from sphinx.util import logging

        logging.getLogger(__name__).warning("%s %s has no Examples section", what, name)


def setup(app):
    # Before numpydoc rewrites the sections (numpydoc's own handler has priority 500).
    app.connect("autodoc-process-docstring", _require_examples, priority=400)
    app.connect("autodoc-skip-member", _skip_metadata_request_setters)

# -- myst: the Markdown pages (model card, benchmarks) are included as they are -------------------------------
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]

# -- gallery: examples/gallery/*.py run at build time on the CPU --------------------------------------------
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the site is built offline: everything it needs ships installed
warnings.filterwarnings("ignore", category=DeprecationWarning, module="transformers")
sphinx_gallery_conf = {
    "examples_dirs": "../examples/gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "backreferences_dir": "gen_modules/backreferences",
    "doc_module": ("lqae_sklearn",),
    "reference_url": {"lqae_sklearn": None},
    "reset_modules": ("matplotlib",),
    "remove_config_comments": True,
    "download_all_examples": False,
    "within_subsection_order": "FileNameSortKey",
}

# -- HTML -----------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"lqae-sklearn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 4,  # the Markdown pages' long titles go under "More"
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path = []
