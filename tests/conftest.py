"""Test-session setup: a persistent XLA compilation cache shared by the tests and their subprocesses, so a
step compiled once (a minute on 2 CPU cores) is not compiled again by every test that runs it."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
