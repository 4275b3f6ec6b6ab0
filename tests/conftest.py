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

import pytest

# The helpers (hf_reference, convert_fixtures, train_helpers, tiny_inference) sit here, beside the folders that
# mirror the package: tests in those folders import them by name.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek-jax-test-xla-cache-main"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """After each test file, drop jax's in-memory compiled programs. Every XLA:CPU executable keeps its machine code
    in memory maps of its own, and a worker that runs a few hundred tests otherwise keeps them all: in a `.ci/run`
    of 2446834 one xdist worker held 46,436 maps (and 7 GB) at 94% of the run, after the other had aborted inside
    an XLA compile; Linux allows 65,530 maps per process (``vm.max_map_count``). CI's earlier segfaults came late
    in runs too. Later files load what they need again from the persistent cache."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
