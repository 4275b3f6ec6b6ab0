"""deepseek_jax.parallel.mesh's layouts (one slice, several slices over DCN) and tools/hlo.py's count of what crosses
slices; a train step on a two-slice mesh equals one slice's."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from train_helpers import run_on_8_devices

from deepseek_jax.parallel.mesh import device_grid, parse_dcn_spec, parse_mesh_spec
from deepseek_jax.tools.hlo import dcn_collectives, replica_groups


def _devices(n=8, **attrs):
    return [SimpleNamespace(id=i, platform="cpu", **{k: v[i] for k, v in attrs.items()}) for i in range(n)]


def _ids(grid):
    return np.vectorize(lambda d: d.id)(grid).squeeze().tolist()


def test_one_slice_is_the_devices_in_order():
    assert _ids(device_grid("data=2,fsdp=4", _devices())) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_slices_sit_outermost_on_the_axes_that_span_them():
    # Two simulated slices: ids 0-3 and 4-7. By default the first axis the slice count divides (data) spans them.
    assert _ids(device_grid("data=2,fsdp=4", _devices(), num_slices=2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # fsdp spans them instead: each fsdp row is (slice 0's two devices, slice 1's two), data stays within a slice.
    assert _ids(device_grid("data=2,fsdp=4", _devices(), num_slices=2, dcn="fsdp=2")) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # Four slices over data x fsdp, expert within each slice.
    assert _ids(device_grid("data=2,fsdp=2,expert=2", _devices(), num_slices=4, dcn="data=2,fsdp=2")) == \
        [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_slices_come_from_the_devices_when_they_say():
    # Devices that carry their slice (a pod) are grouped by it, not by id; then by process (one host per slice).
    devs = _devices(slice_index=[1, 1, 1, 1, 0, 0, 0, 0])
    assert _ids(device_grid("data=2,fsdp=4", devs, num_slices=2)) == [[4, 5, 6, 7], [0, 1, 2, 3]]
    devs = _devices(process_index=[0, 1, 0, 1, 0, 1, 0, 1])
    assert _ids(device_grid("data=2,fsdp=4", devs, num_slices=2)) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_dcn_spec_errors_name_the_axis():
    sizes = parse_mesh_spec("data=2,fsdp=32,expert=8", 512)
    assert parse_dcn_spec(None, sizes, 2)["data"] == 2
    assert parse_dcn_spec("fsdp=4", sizes, 4)["fsdp"] == 4
    with pytest.raises(ValueError, match="spans 2 slices, but there are 4"):
        parse_dcn_spec("data=2", sizes, 4)
    with pytest.raises(ValueError, match="expert=8 cannot span 3"):
        parse_dcn_spec("expert=3", sizes, 3)
    with pytest.raises(ValueError, match="can span 3 slices"):
        parse_dcn_spec(None, sizes, 3)
    with pytest.raises(ValueError, match="needs --num-slices > 1"):
        device_grid("data=8", _devices(), dcn="data=2")
    with pytest.raises(ValueError, match="at least 1 slice"):
        parse_dcn_spec("data=0,fsdp=2", sizes, 2)
    with pytest.raises(ValueError, match="expected comma-separated axis=slices"):
        parse_dcn_spec("pipeline=2", sizes, 2)
    with pytest.raises(ValueError, match="axis fsdp has size 0"):
        parse_mesh_spec("data=2,fsdp=0", 2)
    assert parse_mesh_spec("expert=2,data=-1", 8) == dict(data=4, fsdp=1, expert=2, context=1, tensor=1)


def test_replica_groups_in_each_form_xla_prints():
    assert replica_groups("replica_groups={{0,1},{2,3}}, to_apply=%add") == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert replica_groups("replica_groups={}, to_apply=%add") is None
    assert replica_groups("source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]
    # A mesh a=4 x b=1 x c=2 whose devices are iota([2,4]) transposed: position (i, 0, j) holds 4j + i; a group
    # over a fixes j.
    text = "replica_groups=mesh['a'=4,'b'=1,'c'=2], device_ids=([2,4]T(1,0)) {'a'}, dimensions={0}"
    assert replica_groups(text) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}, use_global_device_ids=true") == \
        [[0, 4], [1, 5], [2, 6], [3, 7]]


HLO = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]) parameter(0)
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %ar = f32[256]{0} all-reduce(%x), channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  %ag = f32[1024]{0} all-gather(%x), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %tok = token[] after-all()
  %snd = (bf16[64]{0}, u32[], token[]) send(%x, %tok), channel_id=3, is_host_transfer=true, \
frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[256]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[256]) -> (s32[], f32[256]) {
  %x = f32[256]{0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[256]) tuple(%z, %x)
  ROOT %w = (s32[], f32[256]) while(%t), condition=%cond, body=%body
}
""".replace("\\\n", "")


def test_dcn_collectives_by_hand():
    """Slices {0..3} and {4..7}; a loop of 3 trips. The all-reduce's groups pair the slices (g = k = 2): each device
    sends 2 (k - 1) / g = 1x its 1 KB result over DCN per trip. The all-gather stays within a slice. The megascale
    send (a TPU program's DCN all-gather: 128 B of bf16 sent) is k - 1 = 1x its buffer."""
    out = dcn_collectives(HLO, [0, 0, 0, 0, 1, 1, 1, 1])
    assert set(out) == {"all-reduce", "all-gather"}
    assert (out["all-reduce"].count, out["all-reduce"].bytes, out["all-reduce"].dcn_bytes) == (3, 3 * 1024, 3 * 1024)
    assert (out["all-gather"].count, out["all-gather"].bytes, out["all-gather"].dcn_bytes) == (3, 3 * 128, 3 * 128)
    # One slice per device pair instead: the all-gather's groups span 2 slices of 4 devices: (k - 1) / g = 1/4.
    out = dcn_collectives(HLO, [0, 0, 1, 1, 0, 0, 1, 1])
    assert out["all-gather"].count == 3 + 3  # the in-HLO one now crosses, beside the megascale send
    assert out["all-gather"].dcn_bytes == pytest.approx(3 * 4096 / 4 + 3 * 128)
    assert "all-reduce" not in dcn_collectives(HLO, [0, 1, 2, 3, 0, 1, 2, 3])


TWO_SLICES = r"""
import json, numpy as np, jax
import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.tools.plan import plan
from train_helpers import run_steps
out = {}
ref_losses, ref_params, _ = run_steps("data=2,fsdp=2,expert=2")
out["ref"] = ref_losses
for dcn in ("fsdp=2",):
    mesh = make_mesh("data=2,fsdp=2,expert=2", num_slices=2, dcn=dcn)
    losses, params, _ = run_steps(None, mesh=mesh)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    out[str(dcn)] = {"losses": losses, "diff": diff, "ids": [d.id for d in mesh.devices.flat]}
config = dsj.presets["tiny-v3"].replace(num_hidden_layers=2)
for dcn in ("data=2", "expert=2"):
    p = plan(config, mesh="data=2,fsdp=2,expert=2", batch=8, seq_len=32, cpu_devices=8, steps=["train"],
             precision="fp32", remat="none", num_slices=2, dcn=dcn)
    out["plan " + dcn] = {k: [v.count, v.bytes, v.dcn_bytes] for k, v in p.steps[0].dcn.items()}
    out["table " + dcn] = p.table()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_slice_mesh_trains_as_one_slice_and_plan_names_what_crosses():
    out = run_on_8_devices(TWO_SLICES)
    # fsdp split over the slices: another device order (slice 0's halves of each fsdp row first), the same numbers.
    np.testing.assert_allclose(out["fsdp=2"]["losses"], out["ref"], rtol=1e-5)
    assert out["fsdp=2"]["diff"] < 1e-5
    assert out["fsdp=2"]["ids"] == [0, 1, 4, 5, 2, 3, 6, 7]
    # data over DCN: the gradient reduction crosses (and the scalars reduced over every device). The all-to-alls
    # that cross are the embedding's resharding, once per step in the forward and once in the backward (op names
    # read from the HLO), not the MoE's exchange, which runs in every MoE layer.
    over_data, over_expert = out["plan data=2"], out["plan expert=2"]
    assert over_data["all-reduce"][0] > 0 and over_data["all-reduce"][2] > 0
    assert over_data.get("all-to-all", [0])[0] <= 3 and "ragged-all-to-all" not in over_data
    # expert over DCN: the MoE's exchanges cross too, in every MoE layer, forward and backward.
    assert over_expert["all-to-all"][0] > over_data.get("all-to-all", [0])[0]
    assert "across the 2 slices (DCN axes expert=2)" in out["table expert=2"]
