"""The device mesh ``(data, fsdp, expert, context, tensor)``: building it, making it the ambient mesh of a step,
and joining several processes into one (``jax.distributed``)."""

from __future__ import annotations

import contextlib
import itertools
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
        given = _axis_values(spec, f"mesh spec {spec!r}: expected comma-separated axis=size with axes {MESH_AXES}")
        fill = next((name for name, size in given.items() if size == -1), None)
        for name, size in given.items():
            if size < 1 and size != -1:
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


def _axis_values(spec: str, usage: str) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}``: mesh axes and integers, else ``ValueError(usage)``."""
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(usage)
        out[name] = int(value)
    return out


def make_mesh(spec: str | None = None, devices: Optional[Sequence[jax.Device]] = None, *, num_slices: int = 1,
              dcn: str | None = None) -> Mesh:
    """The ``Mesh`` over ``device_grid``'s layout, axes ``MESH_AXES``."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(spec, devices, num_slices=num_slices, dcn=dcn), MESH_AXES)


def device_grid(spec: str | None, devices: Sequence, *, num_slices: int = 1, dcn: str | None = None) -> np.ndarray:
    """``devices`` as the array of the mesh ``spec`` asks for (``"fsdp=8,expert=8"``; axes in ``MESH_AXES``
    order), laid out by ``mesh_utils``: within a slice the axes follow the physical ICI torus
    (``create_device_mesh``). With ``num_slices`` > 1 the devices form that many slices joined over DCN, and only
    the axes ``dcn`` names span them (``"data=2"``: the data axis' two halves sit in different slices; default: the
    first axis, in ``MESH_AXES`` order, whose size the slice count divides, normally ``data``). Each of those axes
    is split as (slice, within-slice), the slice outermost, as ``mesh_utils.create_hybrid_device_mesh`` lays it out.
    See ``device_slices`` for what a slice is on devices that do not say."""
    sizes = parse_mesh_spec(spec, len(devices))
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if num_slices == 1:
        if dcn:
            raise ValueError(f"a DCN mesh ({dcn!r}) needs --num-slices > 1")
        return _ici_mesh(tuple(sizes[a] for a in MESH_AXES), devices)
    dcn_sizes = parse_dcn_spec(dcn, sizes, num_slices)
    ici_shape = tuple(sizes[a] // dcn_sizes[a] for a in MESH_AXES)
    dcn_shape = tuple(dcn_sizes[a] for a in MESH_AXES)
    slices = device_slices(devices, num_slices)
    if devices[0].platform == "tpu" and len({getattr(d, "slice_index", 0) for d in devices}) == num_slices:
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # a slice shape its torus does not fit: laid out below, each slice in a plain order
    # Slices the devices do not carry (simulated CPU devices, or one slice per process): the same layout by hand.
    # Stack the per-slice meshes as [*dcn, *ici], then interleave each axis' (slice, within-slice) pair.
    per_slice = np.stack([_ici_mesh(ici_shape, group) for group in slices]).reshape(dcn_shape + ici_shape)
    n = len(MESH_AXES)
    order = [i for a in range(n) for i in (a, n + a)]
    return per_slice.transpose(order).reshape(tuple(sizes[a] for a in MESH_AXES))


def parse_dcn_spec(dcn: str | None, sizes: dict[str, int], num_slices: int) -> dict[str, int]:
    """How many slices each mesh axis spans: ``dcn`` (``"data=2"``, product = ``num_slices``, each axis' size a
    multiple of its count) or, when None, all of them on the first axis whose size ``num_slices`` divides."""
    out = {a: 1 for a in MESH_AXES}
    if dcn:
        given = _axis_values(dcn, f"DCN mesh {dcn!r}: expected comma-separated axis=slices with axes {MESH_AXES}")
        if any(k < 1 for k in given.values()):
            raise ValueError(f"DCN mesh {dcn!r}: every axis spans at least 1 slice")
        out.update(given)
    else:
        axis = next((a for a in MESH_AXES if sizes[a] % num_slices == 0 and sizes[a] >= num_slices), None)
        if axis is None:
            raise ValueError(f"no mesh axis of {sizes} can span {num_slices} slices: make one a multiple of it")
        out[axis] = num_slices
    if math.prod(out.values()) != num_slices:
        raise ValueError(f"DCN mesh {dcn!r} spans {math.prod(out.values())} slices, but there are {num_slices}")
    for a, k in out.items():
        if sizes[a] % k:
            raise ValueError(f"mesh axis {a}={sizes[a]} cannot span {k} slices: its size is not a multiple of {k}")
    return out


def device_slices(devices: Sequence[jax.Device], num_slices: int) -> list[list[jax.Device]]:
    """The devices of each slice, in order: by ``slice_index`` where the devices carry it (TPU pods, and a TPU
    topology compiled for several slices), else by process when there are ``num_slices`` processes (hosts over
    DCN), else consecutive equal groups (simulated slices on one host's CPU devices)."""
    for attr in ("slice_index", "process_index"):
        keys = [getattr(d, attr, None) for d in devices]
        if None not in keys and len(set(keys)) == num_slices:
            return [[d for d, k in zip(devices, keys) if k == key] for key in sorted(set(keys))]
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices cannot form {num_slices} equal slices")
    ordered, per = sorted(devices, key=lambda d: d.id), len(devices) // num_slices
    return [ordered[i * per:(i + 1) * per] for i in range(num_slices)]


def slice_of_devices(mesh: Mesh, num_slices: int) -> list[int]:
    """The slice of each device in ``mesh.devices.flat`` order, which is the order of the device ids a compiled
    step's collectives name (its replica groups)."""
    flat = list(mesh.devices.flat)
    where = {d.id: i for i, group in enumerate(device_slices(flat, num_slices)) for d in group}
    return [where[d.id] for d in flat]


def _ici_mesh(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """``devices`` as an array of ``shape`` following the physical torus on TPU (``create_device_mesh``); a plain
    reshape where there is no topology to follow (CPU) or where the mesh does not fit the torus' axes whole."""
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        # Not allow_split_physical_axes: on v5p:8x8x8, (data=2, fsdp=32, expert=8) only fits the torus split, and
        # the TPU compiler then refuses the ragged all-to-all ("Assigned barrier is not acceptable").
        try:
            return mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    grid = np.empty(len(devices), dtype=object)
    grid[:] = list(devices)
    return grid.reshape(shape)


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


_barrier_ids = itertools.count()


def wait_for_processes(name: str, timeout_s: float = 3600.0) -> None:
    """Block until every process gets here: the distributed runtime's barrier (``jax.distributed``'s
    coordination service), not a device collective, so that a peer still compiling is waited for as long as
    ``timeout_s``. A no-op in one process. On CPU the gloo collectives give up on a peer after 30 s, which a
    slower process's compile of the same step can exceed on a loaded machine: call this between compiling a
    step and running it. Every process must make the same calls in the same order (the ids count)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client has no public handle; jax's own multi-process tests use it

    client = distributed.global_state.client
    if client is None:
        return
    client.wait_at_barrier(f"deepseek-jax/{next(_barrier_ids)}/{name}", int(timeout_s * 1000))
