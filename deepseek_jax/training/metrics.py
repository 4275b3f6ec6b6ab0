"""What a training step reports: metrics brought to the host, throughput as MFU against the chips' peak, and
JSON records."""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip from the vendors' data sheets, for the MFU estimate, matched in order against
# the lower-cased ``device_kind`` (the first match wins, so the variants come before their family).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),      # Trillium
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),      # v5e reports itself as "TPU v5 lite"
    ("tpu v5p", 459e12), ("tpu v5", 459e12),           # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12),   # plain "H100 80GB HBM3" is the SXM part
    ("h200", 989e12), ("gh200", 989e12),
    ("a100", 312e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one chip of ``device_kind`` (None: unknown, MFU not reported)."""
    kind = device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


def peak_flops_per_device() -> Optional[float]:
    return peak_flops(jax.devices()[0].device_kind)


def metrics_to_host(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v))
        out[k] = v.tolist() if v.ndim else float(v)
    return out


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path`` (written beside it, then renamed); only by process 0."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def log_line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def mfu(flops: float, seconds: float) -> Optional[float]:
    """Model FLOPs utilization of ``flops`` done in ``seconds`` over every device (None: unknown peak)."""
    peak = peak_flops_per_device()
    if peak is None:
        return None
    return flops / max(seconds, 1e-9) / (peak * jax.device_count())
