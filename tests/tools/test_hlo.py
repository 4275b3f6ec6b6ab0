"""deepseek_jax.tools.hlo: collectives of hand-written HLO snippets, counted per execution."""

from __future__ import annotations

import pytest

from deepseek_jax.tools.hlo import count_collectives, execution_counts, parse_computations

# A 12-trip loop (trip count only in the condition: i < 12) whose body all-gathers 4x8 f32 (128 bytes) and
# all-reduces 16 bf16 (32 bytes); the entry adds one reduce-scatter of 2x2 f32 (16 bytes).
LOOP = """
HloModule loop, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %slice = f32[4,2]{1,0} slice(%x), slice={[0:4], [0:2]}
  %ag = f32[4,8]{1,0} all-gather(%slice), channel_id=1, replica_groups=[1,4]<=[4], dimensions={1}
  %h = bf16[16]{0} bitcast(%ag)
  %ar = bf16[16]{0} all-reduce(%h), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%next, %ag)
}

%cond (q: (s32[], f32[4,8])) -> pred[] {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (x: f32[4,8]) -> f32[2,2] {
  %x = f32[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%zero, %x)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
  %y = f32[4,8]{1,0} get-tuple-element(%w), index=1
  %z = f32[8,2]{1,0} bitcast(%y)
  ROOT %rs = f32[2,2]{1,0} reduce-scatter(%z), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}
"""


def test_loop_of_n_trips():
    got = count_collectives(LOOP)
    assert got["all-gather"].count == 12 and got["all-gather"].bytes == 12 * 4 * 8 * 4
    assert got["all-reduce"].count == 12 and got["all-reduce"].bytes == 12 * 16 * 2
    assert got["reduce-scatter"].count == 1 and got["reduce-scatter"].bytes == 2 * 2 * 4
    comps, entry = parse_computations(LOOP)
    runs = execution_counts(comps, entry)
    assert runs["body"] == 12 and runs["cond"] == 13 and runs["main"] == 1


# An outer loop of 3 trips (its trip count recorded by the compiler) around an inner loop of 5 (i <= 4); the inner
# body collective-permutes through an async pair whose start returns (operand, result, u32 context, u32 context),
# and the outer body all-gathers through an async pair (operand, result). The entry's tuple shape carries an
# index comment with an "=" in it.
NESTED = """
HloModule nested

%inner_body (p: (s32[], bf16[8])) -> (s32[], bf16[8]) {
  %p = (s32[], bf16[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = bf16[8]{0} get-tuple-element(%p), index=1
  %cp-start = (bf16[8]{0}, bf16[8]{0}, u32[], u32[]) collective-permute-start(%v), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cp-done = bf16[8]{0} collective-permute-done(%cp-start)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8]{0}) tuple(%next, %cp-done)
}

%inner_cond (q: (s32[], bf16[8])) -> pred[] {
  %q = (s32[], bf16[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %four = s32[] constant(4)
  ROOT %le = pred[] compare(%j, %four), direction=LE
}

%outer_body (p: (s32[], bf16[8])) -> (s32[], bf16[8]) {
  %p = (s32[], bf16[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = bf16[8]{0} get-tuple-element(%p), index=1
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8]{0}) tuple(%zero, %v)
  %w = (s32[], bf16[8]{0}) while(%init), condition=%inner_cond, body=%inner_body
  %r = bf16[8]{0} get-tuple-element(%w), index=1
  %half = bf16[2]{0} slice(%r), slice={[0:2]}
  %ag-start = (bf16[2]{0}, bf16[8]{0}) all-gather-start(%half), channel_id=5, replica_groups=[1,4]<=[4], dimensions={0}
  %ag-done = bf16[8]{0} all-gather-done(%ag-start)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8]{0}) tuple(%next, %ag-done)
}

%outer_cond (q: (s32[], bf16[8])) -> pred[] {
  %q = (s32[], bf16[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %big = s32[] constant(1000)
  ROOT %lt = pred[] compare(%j, %big), direction=LT
}

ENTRY %main (x: bf16[8]) -> (s32[], bf16[8], bf16[8], bf16[8], bf16[8], /*index=5*/bf16[8]) {
  %x = bf16[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8]{0}) tuple(%zero, %x)
  %w = (s32[], bf16[8]{0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  %y = bf16[8]{0} get-tuple-element(%w), index=1
  %ars = bf16[8]{0} all-reduce-start(%y), channel_id=6, replica_groups={{0,1}}, to_apply=%add
  %ard = bf16[8]{0} all-reduce-done(%ars)
  %a2a = (bf16[8]{0}, bf16[8]{0}, bf16[8]{0}, bf16[8]{0}, bf16[8]{0}, /*index=5*/bf16[8]{0}) all-to-all(%y, %y, %y, %y, %y, /*index=5*/%y), channel_id=7, replica_groups={{0,1,2,3,4,5}}
  ROOT %out = (s32[], bf16[8]{0}, bf16[8]{0}, bf16[8]{0}, bf16[8]{0}, /*index=5*/bf16[8]{0}) tuple(%zero, %ard, %y, %y, %y, /*index=5*/%y)
}
"""


def test_nested_loops_async_pairs_and_index_comments():
    got = count_collectives(NESTED)
    # known_trip_count (3) wins over the condition's constant (1000); the inner i <= 4 runs 5 times.
    assert got["collective-permute"].count == 3 * 5
    assert got["collective-permute"].bytes == 3 * 5 * 8 * 2  # the result only: not the operand, not the u32s
    assert got["all-gather"].count == 3 and got["all-gather"].bytes == 3 * 8 * 2  # the gathered result
    assert got["all-reduce"].count == 1 and got["all-reduce"].bytes == 8 * 2
    assert got["all-to-all"].count == 1 and got["all-to-all"].bytes == 6 * 8 * 2  # all six tuple results
    assert set(got) == {"collective-permute", "all-gather", "all-reduce", "all-to-all"}  # *-done not counted again


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="no ENTRY"):
        count_collectives("%f (x: f32[]) -> f32[] {\n  ROOT %x = f32[] parameter(0)\n}\n")


def test_a_kernel_config_spanning_lines_does_not_end_the_computation():
    """A Pallas kernel's custom call carries a backend config with newlines; lines of it start with "}". The
    loop body's all-gather after the kernel still counts, 12 times."""
    kernel = (
        '  %k = f32[4,8]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", '
        'backend_config={"custom_call_config": {"body": "abc", \n'
        '"xprof_metadata":"{\\"block_q\\": 512, \\"block_kv\\": 512}"\n'
        '}}, metadata={op_name="splash"}\n'
    )
    text = LOOP.replace("  %slice = f32[4,2]{1,0} slice(%x)", kernel + "  %slice = f32[4,2]{1,0} slice(%k)")
    assert "\n}}, metadata" in text
    got = count_collectives(text)
    assert got["all-gather"].count == 12 and got["all-gather"].bytes == 12 * 4 * 8 * 4
    assert got["all-reduce"].count == 12
