"""Test-session setup: the helpers on the path.

No persistent XLA compilation cache: with one (per session or per xdist worker), CI runs on jax 0.10.2 segfaulted
inside its write (``compilation_cache.put_executable_and_time``, 2026-12-06), and the crashed worker left the run
hanging until CI's limit. Every test compiles its own steps."""

import os
import sys

# The helpers (hf_reference, convert_fixtures, train_helpers, tiny_inference) sit here, beside the folders that
# mirror the package: tests in those folders import them by name.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
