"""Collectives of an optimized HLO module (``compiled.as_text()``), counted once per execution.

A collective inside a while loop (a scanned layer stack, a blocked dispatch, a gradient-accumulation scan) runs
once per trip, so it is weighted by the loop's trip count: the ``known_trip_count`` the compiler records in the
loop's backend config when it has one, else the constant the loop condition compares its counter with (``i < N``
gives N trips, ``i <= N`` gives N + 1; JAX loops count from 0). Nested loops multiply. A computation reached from
several places (a body called by two loops) counts for each.

Bytes are the collective's result buffer per device: the gathered array of an all-gather, the reduced one of an
all-reduce, the scattered shard of a reduce-scatter. They are sizes from the HLO, not traffic measured: a ragged
all-to-all counts its whole (worst-case, dropless) receive buffer, whatever the rows actually sent, and a
collective inside a ``lax.cond`` counts once for every branch that holds it, whichever runs. An asynchronous
``*-start`` op returns a tuple that also holds its operands (and u32 context words for a collective-permute);
only its results are counted, and its ``*-done`` is not counted again. ``/*index=N*/`` comments inside long
tuple shapes are dropped first: their ``=`` would otherwise look like an assignment. An instruction's attributes
may span lines (a Pallas kernel's backend config holds newlines); only a line that is ``}`` alone ends a
computation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1,
    "f8e8m0fnu": 1, "f4e2m1fn": 0.5,
}

_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OPCODE = re.compile(r"(?:^|[\s)}])([a-z][a-z0-9\-]*)\(")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_END = re.compile(r"^\}\s*(?:,\s*execution_thread=\S+)?\s*$")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_GROUPS_LIST = re.compile(r"\b(?:replica_groups|source_target_pairs)=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="?([A-Z_]+)')
_GROUPS_MESH = re.compile(r"\breplica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                          r"\s*\{([^}]*)\}")
_GROUPS_IOTA = re.compile(r"\breplica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


@dataclasses.dataclass
class CollectiveStats:
    """One kind of collective: how many times it runs per step and the bytes its results hold, per device."""

    count: int = 0
    bytes: float = 0.0


@dataclasses.dataclass
class DcnStats(CollectiveStats):
    """The collectives of one kind whose groups span slices: how many run per step; ``bytes``, their result bytes
    per device (for a TPU multi-slice program, the bytes of each megascale send: what the device hands the DCN
    runtime); and ``dcn_bytes``, what each device must send over DCN for them with a hierarchical algorithm (the
    ideal: each slice's part is combined over ICI first): a group of g devices over k slices moves 2(k-1)/g of an
    all-reduce's result, (k-1)/g of an all-gather's, k-1 times a reduce-scatter's (its result is the shard),
    (k-1)/k of an all-to-all's, and all of a collective-permute's."""

    dcn_bytes: float = 0.0


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    rest: str


def _array_bytes(shape: str) -> list[float]:
    """Bytes of each array in a shape string (a tuple gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * DTYPE_BYTES[dtype])
    return out


def _split_instruction(body: str) -> tuple[str, str, str]:
    """``SHAPE opcode(operands), attrs`` -> (shape, opcode, rest). The shape may be a nested tuple."""
    depth, i = 0, 0
    if body.startswith("("):
        for i, ch in enumerate(body):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, tail = body[: i + 1], body[i + 1:]
    else:
        shape, _, tail = body.partition(" ")
        tail = " " + tail
    m = _OPCODE.search(tail)
    return shape, (m.group(1) if m else ""), (tail[m.end():] if m else tail)


def parse_computations(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """``{computation name: instructions}`` and the entry computation's name."""
    comps: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for raw in hlo_text.splitlines():
        line = _COMMENT.sub("", raw)
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            elif _END.match(line):
                current = None
            elif current is not None and comps[current]:
                # A continuation of the previous instruction: a string attribute with newlines in it (a Pallas
                # kernel's backend config), whose lines may start with "}" without ending the computation.
                comps[current][-1].rest += " " + line
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            shape, opcode, rest = _split_instruction(m.group(2))
            comps[current].append(_Instruction(m.group(1), shape, opcode, rest))
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return comps, entry


def _trip_count(instr: _Instruction, comps: dict[str, list[_Instruction]]) -> int:
    m = _TRIP.search(instr.rest)
    if m:
        return int(m.group(1))
    cond = dict((k, v) for k, v in _CALLEES.findall(instr.rest)).get("condition")
    consts: dict[str, int] = {}
    for ins in comps.get(cond, []):
        value = ins.rest.split(")")[0].strip()
        if ins.opcode == "constant" and re.fullmatch(r"[su](32|64)\[\]", ins.shape.split("{")[0]) and \
                re.fullmatch(r"-?\d+", value):
            consts[ins.name] = int(value)
    for ins in comps.get(cond, []):
        if ins.opcode != "compare":
            continue
        operands = re.findall(r"%?([\w.\-]+)", ins.rest.split(")")[0])
        bound = next((consts[o] for o in operands if o in consts), None)
        direction = re.search(r"direction=(\w+)", ins.rest)
        if bound is not None and direction:
            return max(bound + (direction.group(1) in ("LE", "GE")), 0)
    return 1  # unknown: count the body once


def execution_counts(comps: dict[str, list[_Instruction]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of ``entry`` (loop bodies times their trips)."""
    counts: dict[str, int] = defaultdict(int)
    counts[entry] = 1
    # Callers come before callees in a topological order; walk it from the entry.
    order, seen = [], set()

    def visit(name: str) -> None:
        if name in seen or name not in comps:
            return
        seen.add(name)
        for callee, _ in _callees(comps[name], comps):
            visit(callee)
        order.append(name)

    visit(entry)
    for name in reversed(order):
        for callee, times in _callees(comps[name], comps):
            counts[callee] += counts[name] * times
    return dict(counts)


def _callees(instructions: list[_Instruction], comps) -> list[tuple[str, int]]:
    out = []
    for ins in instructions:
        trips = _trip_count(ins, comps) if ins.opcode == "while" else 1
        for kind, callee in _CALLEES.findall(ins.rest):
            out.append((callee, trips + 1 if kind == "condition" else trips))
        for _, names in _CALLEE_LISTS.findall(ins.rest):
            out += [(n.strip().lstrip("%"), 1) for n in names.split(",") if n.strip()]
    return out


def _result_bytes(ins: _Instruction, kind: str) -> float:
    sizes = _array_bytes(ins.shape)
    if not ins.opcode.endswith("-start") or not ins.shape.startswith("("):
        return float(sum(sizes))
    # (operands..., results..., context words): drop the scalar context, keep the results.
    arrays = [s for s, (dt, dims) in zip(sizes, _ARRAY.findall(ins.shape)) if dims or dt not in ("u32", "s32")]
    if kind == "all-reduce" or len(arrays) % 2:
        return float(sum(arrays))
    return float(sum(arrays[len(arrays) // 2:]))


@dataclasses.dataclass
class Module:
    """A parsed HLO module: its computations and how often each runs per call (``parse_module``)."""

    comps: dict[str, list[_Instruction]]
    runs: dict[str, int]


def parse_module(hlo_text: str) -> Module:
    """Parse an optimized HLO module once, for several of the counts below."""
    comps, entry = parse_computations(hlo_text)
    return Module(comps, execution_counts(comps, entry))


def count_collectives(hlo: str | Module) -> dict[str, CollectiveStats]:
    """``{kind: CollectiveStats}`` for the collectives of an optimized HLO module (its text, or ``parse_module``'s
    result), loops weighted by trips."""
    module = parse_module(hlo) if isinstance(hlo, str) else hlo
    comps, runs = module.comps, module.runs
    out: dict[str, CollectiveStats] = {}
    for name, instructions in comps.items():
        times = runs.get(name, 0)
        if not times:
            continue
        for ins in instructions:
            op = ins.opcode[: -len("-start")] if ins.opcode.endswith("-start") else ins.opcode
            if op not in COLLECTIVES:
                continue
            st = out.setdefault(op, CollectiveStats())
            st.count += times
            st.bytes += times * _result_bytes(ins, op)
    return out


def replica_groups(rest: str) -> list[list[int]] | None:
    """The device groups of a collective's attributes (explicit ``{{0,1},{2,3}}`` or iota ``[2,4]<=[4,2]T(1,0)``
    replica groups; a collective-permute's source-target pairs as groups of two), or None when it names none (one
    group of all devices). XLA also prints groups over a device mesh: ``mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0))
    {'a'}``, the devices (an iota, maybe transposed; default in order) laid out as the mesh, one group per
    position of the axes not named."""
    m = _GROUPS_MESH.search(rest)
    if m:
        axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))]
        shape = [size for _, size in axes]
        ids = np.arange(math.prod(shape))
        if m.group(2):
            ids = ids.reshape([int(d) for d in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(p) for p in m.group(3).split(",")])
        ids = ids.reshape(shape)
        named = set(re.findall(r"'([^']+)'", m.group(4)))
        inner = [i for i, (name, _) in enumerate(axes) if name in named]
        outer = [i for i in range(len(axes)) if i not in inner]
        size = math.prod(shape[i] for i in inner)
        return ids.transpose(outer + inner).reshape(-1, size).tolist()
    m = _GROUPS_IOTA.search(rest)
    if m:
        n_groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(n_groups, size).tolist()
    m = _GROUPS_LIST.search(rest)
    if not m or not m.group(1).strip():
        return None
    return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]


def _dcn_fraction(op: str, group: int, spanned: int) -> float:
    k, g = spanned, group
    return {"all-reduce": 2 * (k - 1) / g, "all-gather": (k - 1) / g, "reduce-scatter": float(k - 1),
            "collective-permute": 1.0}.get(op, (k - 1) / k)


def dcn_collectives(hlo: str | Module, slice_of: list[int]) -> dict[str, DcnStats]:
    """``{kind: DcnStats}`` for the collectives that cross slices, loops weighted by trips as in
    ``count_collectives``. Two forms:

    - A TPU program compiled for several slices is the program of one slice: what crosses slices is a host
      transfer to the megascale (DCN) runtime, a ``send`` whose ``_xla_megascale_transfer_type`` names the
      collective (``ALL_REDUCE``...). Its bytes are the send's buffer, and the DCN bytes follow from it as for a
      group of one device per slice.
    - Anywhere else (simulated slices on CPU devices), a collective crosses when one of its groups holds devices
      of more than one slice: ``slice_of[i]`` is the slice of device id i as the HLO's groups number them (the
      compiled step's device order: ``mesh.devices.flat``).

    ``hlo``: the module's text or ``parse_module``'s result."""
    module = parse_module(hlo) if isinstance(hlo, str) else hlo
    comps, runs = module.comps, module.runs
    k_all = len(set(slice_of))
    out: dict[str, DcnStats] = {}
    for name, instructions in comps.items():
        times = runs.get(name, 0)
        for ins in instructions if times else ():
            if ins.opcode in ("send", "send-start"):
                m = _MEGASCALE.search(ins.rest)
                if m:
                    op = m.group(1).lower().replace("_", "-")
                    sent = _array_bytes(ins.shape)[0] if ins.shape.startswith("(") else sum(_array_bytes(ins.shape))
                    st = out.setdefault(op, DcnStats())
                    st.count += times
                    st.bytes += times * sent
                    # a send holds this device's operand: an all-gather's result is k of them, a reduce-scatter's
                    # operand is k results
                    scale = {"all-gather": k_all, "reduce-scatter": 1 / k_all}.get(op, 1)
                    st.dcn_bytes += times * sent * scale * _dcn_fraction(op, k_all, k_all)
                continue
            op = ins.opcode[: -len("-start")] if ins.opcode.endswith("-start") else ins.opcode
            if op not in COLLECTIVES:
                continue
            groups = replica_groups(ins.rest) or [list(range(len(slice_of)))]
            spans = [(len(g), len({slice_of[d] for d in g})) for g in groups]
            g, k = max(spans, key=lambda s: s[1])
            if k < 2:
                continue
            result = _result_bytes(ins, op)
            st = out.setdefault(op, DcnStats())
            st.count += times
            st.bytes += times * result
            st.dcn_bytes += times * result * _dcn_fraction(op, g, k)
    return out
