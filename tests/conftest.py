"""Test-session setup: the helpers on the path, and a persistent XLA compilation cache shared by the tests and
their subprocesses, so a step compiled once (a minute on 2 CPU cores) is not compiled again by every test that
runs it."""

import os
import sys
import tempfile

# The helpers (hf_reference, convert_fixtures, train_helpers, tiny_inference) sit here, beside the folders that
# mirror the package: tests in those folders import them by name.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
