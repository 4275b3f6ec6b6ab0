"""A GEMM on FP8-kept weights (``fp8_weights.Fp8Weight``) against the same GEMM on bf16 weights, compiled by the
TPU compiler for one v5p chip (needs the ``tpu`` extra; run with ``JAX_PLATFORMS=cpu`` on a machine without TPUs).

Prints per GEMM the compiled argument / temporary / output bytes, their sum against the bf16 GEMM's, and whether
the e4m3 values enter the matmul itself: the dot's fusion (XLA's path: the dequantization fused into the dot's
operand) or the Pallas kernel (``fp8_matmul``: dequantized per 128x128 block in VMEM).

    JAX_PLATFORMS=cpu python bench/fp8_weights_tpu.py [--m 4096 --k 7168 --n 2048]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.layers.linear import MatmulRecipe
from deepseek_jax.quant.weights import Fp8Weight

DIMS = (((1,), (0,)), ((), ()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--topology", default="v5p:2x2x1")
    a = p.parse_args()
    devices = topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices
    one = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P())
    xla, kernel = MatmulRecipe(jnp.bfloat16), MatmulRecipe(jnp.bfloat16, fp8_kernel="tpu")
    x = jax.ShapeDtypeStruct((a.m, a.k), jnp.bfloat16, sharding=one)
    fp8_args = (x, jax.ShapeDtypeStruct((a.k, a.n), jnp.float8_e4m3fn, sharding=one),
                jax.ShapeDtypeStruct((-(-a.k // 128), -(-a.n // 128)), jnp.float32, sharding=one))
    cases = {
        "bf16 weight": (lambda x, w: xla.dot_general(x, w, DIMS),
                        (x, jax.ShapeDtypeStruct((a.k, a.n), jnp.bfloat16, sharding=one))),
        "fp8 weight, XLA dequantize": (lambda x, q, s: xla.dot_general(x, Fp8Weight(q, s, 1, 1), DIMS), fp8_args),
        "fp8 weight, Pallas kernel": (lambda x, q, s: kernel.dot_general(x, Fp8Weight(q, s, 1, 1), DIMS), fp8_args),
    }
    print(f"[{a.m}, {a.k}] x [{a.k}, {a.n}] on one {devices[0].device_kind} (bf16 weight: {a.k * a.n * 2:,} bytes)")
    base = None
    for name, (fn, args) in cases.items():
        compiled = jax.jit(fn).lower(*args).compile()
        mem = compiled.memory_analysis()
        total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
        base = base or total
        text = compiled.as_text()
        # The fusion that holds the convolution (the dot), and whether an e4m3 operand enters it; or the kernel
        # (a custom call whose operands include the e4m3 values).
        fused = [c for c in re.split(r"\n(?=%|ENTRY)", text) if "convolution(" in c]
        reads_fp8 = any("f8e4m3fn" in c.split("\n", 1)[0] for c in fused) or any(
            "custom-call(" in line and "f8e4m3fn" in line and "tpu_custom_call" in line for line in text.splitlines())
        print(f"{name:>28}: arguments {mem.argument_size_in_bytes:>12,}  temporaries {mem.temp_size_in_bytes:>12,}"
              f"  outputs {mem.output_size_in_bytes:>12,}  sum / bf16's {total / base:.2f}  "
              f"matmul reads e4m3: {reads_fp8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
