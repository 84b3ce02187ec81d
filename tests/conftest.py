import importlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def need(module: str):
    """Import an optional package; skip without it, except in CI (FLOWZOO_REQUIRE_OPTIONAL=1) where that fails."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("FLOWZOO_REQUIRE_OPTIONAL"):
            pytest.fail(f"optional package {module} is required in CI")
        pytest.skip(f"needs {module}")


# caches shared by the runs (digits classifier, digits VAE) go to one temporary folder per test session, which the
# subprocesses of the tests inherit
os.environ.setdefault("FLOWZOO_CACHE", tempfile.mkdtemp(prefix="flowzoo-cache-"))
