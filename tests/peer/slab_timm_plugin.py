"""pytest plugin: run timm's own ``tests/test_models.py`` on slab's registered models only.

Importing :mod:`slab` registers our models with timm before the test module is collected, so timm's
``list_models(...)`` parametrisations include them, under timm's own include/exclude filters. After
collection, every item whose ``model_name`` is not one of ours is deselected, and so are tests that
are not parametrised by model (they name timm's models). Tests that download weights
(``pretrained=True``) are deselected too, as timm's CI does.
"""
from __future__ import annotations

import pytest

import slab  # noqa: F401  (registers the models with timm)
from slab.models import list_models

# They load weights from the network: timm's CI skips them too (GITHUB_ACTIONS).
DOWNLOAD_TESTS = ("test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained")


def pytest_configure(config):
    # timm marks tests with @pytest.mark.timeout (pytest-timeout, not a dependency of ours).
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")


def pytest_collection_modifyitems(config, items):
    ours = set(list_models())
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        # Config tests list "name.tag" (pretrained tags): the model is the part before the dot.
        if isinstance(name, str) and name.split(".")[0] in ours and item.originalname not in DOWNLOAD_TESTS:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
