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

# One persistent compilation cache per xdist worker. A CI run segfaulted in jax 0.10.2's cache write
# (compilation_cache.put_executable_and_time, 2026-12-06); separate caches did not stop a second segfault: open.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"deepseek-jax-test-xla-cache-{_WORKER}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
