"""Test-session setup: the helpers on the path, and a persistent XLA compilation cache shared by the tests, their
xdist workers and the subprocesses they start, so a step compiled once (up to a minute on 2 CPU cores) is not
compiled again by every test, every CLI process and every later run that compiles it.

The cache sits at a fixed path in the temp dir and outlives the run: the suite takes about 18 minutes on 2 cores
when the cache holds the steps (as after any earlier run of this code), and over an hour when it is empty (most of
the suite's time is XLA compiling). Entries are keyed by the program and the jax version, so an entry of older code
is only a miss. A ``JAX_COMPILATION_CACHE_DIR`` set before the run is used instead."""

import os
import sys
import tempfile

# The helpers (hf_reference, convert_fixtures, train_helpers, tiny_inference) sit here, beside the folders that
# mirror the package: tests in those folders import them by name.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek-jax-test-xla-cache-main"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
