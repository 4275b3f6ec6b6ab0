"""The device mesh ``(data, fsdp, expert, context, tensor)``: building it, making it the ambient mesh of a step,
and joining several processes into one (``jax.distributed``)."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from deepseek_jax.parallel.rules import LOGICAL_RULES

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")


def parse_mesh_spec(spec: str | None, n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,expert=2"`` -> sizes of all four axes (missing ones 1; one axis may be -1 = the rest)."""
    sizes = {a: 1 for a in MESH_AXES}
    if spec:
        fill = None
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec {spec!r}: expected comma-separated axis=size with axes {MESH_AXES}")
            size = int(value)
            if size == -1:
                fill = name
            elif size < 1:
                raise ValueError(f"mesh spec {spec!r}: axis {name} has size {size}")
            sizes[name] = max(size, 1)
        if fill is not None:
            rest = n_devices // math.prod(v for k, v in sizes.items() if k != fill)
            sizes[fill] = rest
    else:
        sizes["data"] = n_devices
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh spec {spec!r} = {sizes} needs {math.prod(sizes.values())} devices, "
                         f"but there are {n_devices}")
    return sizes


def make_mesh(spec: str | None = None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def current_mesh():
    """The mesh a step is traced under (``jax.set_mesh``), or None on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


@contextlib.contextmanager
def mesh_context(mesh, rules=None):
    """Make ``mesh`` the ambient mesh while a step is traced, with the logical rules (``rules``, default
    ``LOGICAL_RULES``): the layers' activation constraints apply, the MoE runs expert-parallel and attention
    context-parallel under it. A no-op for ``None``."""
    if mesh is None:
        yield
        return
    setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    with (setter(mesh) if setter is not None else contextlib.nullcontext()), \
            nn.logical_axis_rules(rules if rules is not None else LOGICAL_RULES):
        yield


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """``jax.distributed.initialize`` from arguments or the environment (``DSJ_COORDINATOR``,
    ``DSJ_NUM_PROCESSES``, ``DSJ_PROCESS_ID``); a no-op for a single process. On CPU the gloo collectives are
    selected so that several local processes can run one jitted step together."""
    coordinator = coordinator or os.environ.get("DSJ_COORDINATOR")
    num_processes = num_processes or int(os.environ.get("DSJ_NUM_PROCESSES", "1"))
    if process_id is None and "DSJ_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DSJ_PROCESS_ID"])
    if not coordinator or num_processes <= 1:
        return
    # Harmless on accelerators; on CPU, cross-process collectives need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
