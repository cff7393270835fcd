"""Host plans of the device-side FSM: static sets become cached table rows; the language's first
token and a caption's line end become device decisions that ``advance_row`` replays."""

from __future__ import annotations

import torch

from acestep.lm import fsm as F
from acestep.lm.engine import masks as M


def _walk_to(state, tables, until):
    """Feed the first allowed token until ``until(state)``."""
    for _ in range(200):
        if until(state):
            return
        ids = F.allowed(state, tables, lambda ids: torch.zeros(ids.numel()))
        F.advance(state, tables, int(ids[0]))
    raise AssertionError("state never reached")


def test_plans_static_sets_decisions_and_branches(runner):
    tables = runner.tables.to("cpu")
    encode = runner.encode
    table = M.MaskTable(runner.model.config.vocab_size, "cpu")
    assert M.plan_row(None, tables, table) == M.UNCONSTRAINED

    codes = F.new_state(F.FsmSpec(phase="codes", target_codes=3), tables, encode)
    plan = M.plan_row(codes, tables, table)
    assert plan == M.RowPlan.static(plan.if_true) and table.counts[plan.if_true] == 64000
    assert M.plan_row(codes, tables, table) == plan and table.size == 3  # cached, no new row

    cot = F.new_state(F.FsmSpec(phase="cot", skip_caption=True, stop_at_reasoning=True), tables, encode)
    _walk_to(cot, tables, lambda st: st.current.kind == "value" and st.current.name == "language")
    plan = M.plan_row(cot, tables, table)
    assert plan.argmax_one and table.counts[plan.decide] > 1
    first = tables.tries["language"][()]
    pick = int(first[-1])
    M.advance_row(cot, tables, pick, decision=pick, check=True)
    assert cot.value == (pick,)

    caption = F.new_state(F.FsmSpec(phase="cot", stop_at_reasoning=True), tables, encode)
    _walk_to(caption, tables, lambda st: st.current.kind == "caption")
    word = int(tables.sets["text_first"][0])
    line_end = min(tables.line_end_ids)
    M.advance_row(caption, tables, word, word)
    M.advance_row(caption, tables, line_end, line_end)
    plan = M.plan_row(caption, tables, table)
    assert not plan.argmax_one and plan.if_true != plan.if_false
    assert table.counts[plan.if_true] == int(tables.masks["text_continuation"].sum())
    ended = int(tables.sets["text_body"][0])  # not whitespace-led: the caption ends
    nxt = F.allowed(caption.__class__(**caption.__dict__), tables, lambda ids: (ids == ended).float())
    assert table.counts[plan.if_false] == nxt.numel()
    M.advance_row(caption, tables, int(nxt[0]), ended, check=True)
    assert caption.current.kind != "caption"
