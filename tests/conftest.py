"""The environment every test runs in (offline hub, caches of this session only) and the shared fixtures.

Helpers that test modules import live in tests/helpers.py; test modules never import from this file or from one
another."""

from __future__ import annotations

import os

import pytest

# Before the import below: asserts in the helpers are rewritten like those in tests, and explain a failure.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import smoke_recipe  # noqa: E402

# Hermetic runs: no hub look-ups (there is no network here, and a look-up that hangs instead of failing would stall a
# test), and Hugging Face caches of this test session only, so nothing a previous run left behind is read back.
# Every process the tests start inherits this.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
if "LAUNCHER_TEST_CACHE" not in os.environ:
    import tempfile

    os.environ["LAUNCHER_TEST_CACHE"] = tempfile.mkdtemp(prefix="launcher-test-cache-")
os.environ["HF_HOME"] = os.environ["LAUNCHER_TEST_CACHE"]
# DeepSpeed's C++ ops (built on first use by scripts that start DeepSpeed directly) go there too: a build killed in
# an earlier run leaves a lock file in ~/.cache/torch_extensions that torch waits on forever.
os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.environ["LAUNCHER_TEST_CACHE"], "torch_extensions")


@pytest.fixture
def recipe_factory(tmp_path):
    return lambda drop=(), **sections: smoke_recipe(tmp_path, drop=drop, **sections)
