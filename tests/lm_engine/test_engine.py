"""``LMEngine`` gives the plain path's (``PtRunner``) tokens for the same seeds, in fp32 on CPU:
CoT and codes phases with paired CFG and constraints, every sampling knob, requests joining a
running batch, rows reused after requests leave."""

from __future__ import annotations

import collections
import threading

import pytest

from acestep.lm.engine import EngineSettings, LMEngine
from acestep.lm.engine import masks as M
from acestep.steploop import StepLoop
from tests.lm_engine.conftest import make_engine

SAMPLING = [{}, {"lm_top_k": 50}, {"lm_top_p": 0.9}, {"lm_top_k": 30, "lm_top_p": 0.8},
            {"lm_temperature": 0.0}, {"lm_temperature": 1.3, "lm_top_p": 0.95}]


@pytest.fixture
def plan_kinds(monkeypatch):
    """Counts the kinds of device plans the engine builds (static / argmax_one / branch)."""
    counts = collections.Counter()
    real = M.plan_row

    def spy(state, tables, table):
        plan = real(state, tables, table)
        counts["argmax_one" if plan.argmax_one else "branch" if plan.if_true != plan.if_false else "static"] += 1
        return plan

    monkeypatch.setattr(M, "plan_row", spy)
    return counts


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _outcomes(outcomes):
    return {o.key: o for o in outcomes}


def _assert_same(plain, fast):
    diffs = [(i, _first_difference(p, f)) for i, (p, f) in enumerate(zip(plain, fast)) if p != f]
    assert not diffs, f"{len(diffs)}/{len(plain)} requests differ (request, first differing step): {diffs}"


def test_cot_phase_matches_plain_path_for_20_seeds(runner, fast_engine, make_request, plan_kinds):
    # seeds 13/41/48 at temperature 1.3 end their caption early: the device decides the branch
    requests = [make_request("cot", seed, 2.0, 150, lm_temperature=1.3) for seed in (13, 41, 48)]
    requests += [make_request("cot", seed, 2.0, 120, **SAMPLING[seed % len(SAMPLING)]) for seed in range(7)]
    requests += [make_request("cot", seed, 2.5, 60, use_cot_caption=False, **SAMPLING[seed % len(SAMPLING)])
                 for seed in range(10, 20)]
    _assert_same(runner.generate(requests), fast_engine.generate(requests))
    assert plan_kinds["argmax_one"] >= 10 and plan_kinds["branch"] >= 3  # the device made FSM decisions


def test_codes_phase_matches_plain_path_for_20_seeds(runner, fast_engine, make_request):
    requests = [make_request("codes", seed, 2.0, **SAMPLING[seed % len(SAMPLING)]) for seed in range(20)]
    plain = runner.generate(requests)
    assert all(len(t) == 51 for t in plain)  # 10 s: exactly 50 codes, then EOS
    _assert_same(plain, fast_engine.generate(requests))


def test_plain_rows_penalty_and_mixed_cfg(runner, fast_engine, make_request):
    requests = [make_request("cot", 3, 1.0, 80), make_request("codes", 4, 1.0, lm_top_k=100),
                make_request("cot", 5, 3.0, 80, use_cot_caption=False)]
    for request in requests[:2]:
        request.sampling = type(request.sampling)(**{**request.sampling.__dict__, "repetition_penalty": 1.5})
    _assert_same(runner.generate(requests), fast_engine.generate(requests))


def test_requests_joining_a_running_batch_get_their_solo_tokens(fast_engine, make_request):
    requests = [make_request("cot", 30, 2.0, 70), make_request("codes", 31, 2.0),
                make_request("cot", 32, 1.0, 70, use_cot_caption=False), make_request("codes", 33, 1.0)]
    solo = [fast_engine.generate([r])[0] for r in requests]
    joins = {0: [0], 3: [1], 11: [2, 3]}  # step -> requests that join before it
    rids, outcomes, step = {}, {}, 0
    while step <= max(joins) or fast_engine.has_work:
        for index in joins.get(step, []):
            rids[index] = fast_engine.add(requests[index])
        outcomes.update((o.key, o.get()) for o in fast_engine.step())
        step += 1
    assert [outcomes[rids[i]] for i in range(len(requests))] == solo


def test_small_engine_admits_in_chunks_and_reuses_rows(peaked, runner, make_request):
    engine = make_engine(peaked, max_rows=4, max_len=1024, max_admit_per_step=1)
    requests = [make_request("codes", 40 + i, 2.0 if i % 2 else 1.0) for i in range(5)]
    rids = [engine.add(r) for r in requests]
    outcomes = _outcomes(engine.step())
    assert len(engine.scheduler.running) == 1  # max_admit_per_step 1: one request joins per step
    outcomes.update(_outcomes(engine.step()))
    assert [s.rows for s in engine.scheduler.running] == [[0], [1, 2]]
    while engine.has_work:
        outcomes.update(_outcomes(engine.step()))
        assert engine.scheduler.span() <= 4
    _assert_same(runner.generate(requests), [outcomes[r].get() for r in rids])


def test_gpu_shaped_steps_give_the_same_tokens(peaked, runner, make_request):
    """The GPU path's shapes and kernels run eagerly on CPU -- joining prompts prefilled in one
    forward, decode rows padded to a bucket (idle rows at position 0), grouped-query attention over
    a length bucket: same tokens as the plain path."""
    engine = make_engine(peaked, max_rows=12, max_len=700, max_admit_per_step=2, batch_prefill=True,
                         decode_attention="gqa", check_fsm=True)
    engine.decoder.bucketed = True
    assert engine.decoder.rows == [2, 4, 8, 12] and engine.decoder.lengths == [256, 512, 700]
    requests = [make_request("codes", 70 + i, 2.0 if i % 2 else 1.0) for i in range(5)]
    requests.append(make_request("cot", 75, 2.0, 60, use_cot_caption=False))
    plain = runner.generate(requests)
    assert sum(len(set(tokens)) for tokens in plain[:5]) > 25  # varied codes, not one repeated token
    _assert_same(plain, engine.generate(requests))


def test_a_request_whose_sampling_raises_fails_alone_and_its_seven_mates_are_unchanged(peaked, make_request,
                                                                                       monkeypatch):
    """Eight one-row requests share every step; the sampler raises whenever it sees the marked
    request's row after its fifth token (a fault on one row's own step, below intake): that
    request's future gets the error, the others their tokens without it."""
    from acestep.lm.engine import llm_engine as engine_module

    engine = make_engine(peaked, max_rows=8, max_len=1024, check_fsm=True)
    requests = [make_request("codes", 80 + i, 1.0) for i in range(8)]
    bad = requests[5]
    mates = [r for r in requests if r is not bad]
    without = engine.generate(mates)
    real = engine_module.sample

    def sample(logits, table, seen, x):
        marked = [s.cond_row for s in engine.scheduler.running if s.request is bad and len(s.tokens) >= 5]
        if marked and marked[0] in x.cond.tolist():
            raise RuntimeError("poisoned row")
        return real(logits, table, seen, x)

    monkeypatch.setattr(engine_module, "sample", sample)
    loop = StepLoop(engine, "test-lm-engine")
    try:
        release = threading.Event()
        held = loop.call(release.wait)  # all eight are handed to the engine in one go
        futures = [loop.submit(r) for r in requests]
        release.set()
        held.result(timeout=60)
        with pytest.raises(RuntimeError, match="poisoned row"):
            futures[5].result(timeout=120)
        assert [f.result(timeout=120) for f in futures[:5] + futures[6:]] == without
    finally:
        loop.close()
    stats = engine.stats()
    assert stats["requests_failed"] == 1 and stats["rows_in_use"] == 0
    assert stats["rows_per_step"][8] == 6  # all eight: its five tokens, then the step that raised


def test_a_request_whose_prefill_raises_fails_alone(peaked, make_request, monkeypatch):
    engine = make_engine(peaked, max_rows=8, max_len=1024, batch_prefill=True)
    requests = [make_request("codes", 90 + i, 2.0 if i % 2 else 1.0) for i in range(4)]
    requests[2] = bad = make_request("codes", 92, 1.0, caption="the one marked prompt")
    without = engine.generate(requests[:2] + requests[3:])
    real = engine.net.prefill_many

    def prefill_many(prompts, rows):
        if any(list(p) == list(bad.prompt_ids) for p in prompts):
            raise RuntimeError("poisoned prompt")
        return real(prompts, rows)

    monkeypatch.setattr(engine.net, "prefill_many", prefill_many)
    with pytest.raises(RuntimeError, match="poisoned prompt"):
        engine.generate(requests)  # the others finish first: generate raises once all have left
    rids = [engine.add(r) for r in requests]
    outcomes = {}
    while engine.has_work:
        outcomes.update(_outcomes(engine.step()))
    with pytest.raises(RuntimeError, match="poisoned prompt"):
        outcomes[rids[2]].get()
    assert [outcomes[rid].get() for rid in rids[:2] + rids[3:]] == without
    assert engine.stats()["rows_in_use"] == 0


def test_rejects_requests_longer_than_the_cache(lm_handler, make_request):
    engine = make_engine(lm_handler.llm, max_rows=2, max_len=16)
    with pytest.raises(ValueError, match="max_len"):
        engine.add(make_request("cot", 1, 2.0, 10))


@pytest.mark.gpu
def test_cuda_graph_engine_matches_eager_engine(lm_handler, make_request):
    """On a GPU: decode steps replayed from CUDA graphs (bucketed rows and lengths) give the
    eager engine's tokens (fp32; bucketed lengths may change float rounding, hence 'most')."""
    backend = lm_handler.llm
    model = backend.model.to("cuda")
    try:
        requests = [make_request("codes", 60 + i, 2.0) for i in range(4)]
        make = lambda graphs: LMEngine(model, backend.tables, backend.encode, backend.pad_id,  # noqa: E731
                                       EngineSettings(max_rows=8, max_len=1024, use_cuda_graphs=graphs))
        graphed, eager = make(True), make(False)
        assert graphed.capture_cuda_graphs() == len(graphed.decoder.rows) * len(graphed.decoder.lengths)
        got, want = graphed.generate(requests), eager.generate(requests)
        assert sum(g == w for g, w in zip(got, want)) >= 3
    finally:
        backend.model.to("cpu")


def test_a_requests_share_sets_its_place_in_the_engines_admission_order(peaked, lm_handler):
    """A planner request carries its caller's tenant and class into the engine's queue: a later,
    higher class request joins before the earlier ones."""
    from acestep.fairness import Share
    from acestep.lm import planner
    from acestep.params import GenerationParams

    engine = make_engine(peaked, max_rows=4, max_len=1024, max_admit_per_step=1)
    params = GenerationParams(caption="calm piano", lyrics="[Verse]\nhello", lm_cfg_scale=1.0)

    def add(seed, share):
        request = planner.cot_request(lm_handler, params, {}, seed, share=share)
        request.max_new_tokens = 8
        return engine.add(request)

    early = [add(seed, Share("a", 0)) for seed in (1, 2)]
    late = add(3, Share("b", 2))
    engine.step()
    assert [s.rid for s in engine.scheduler.running] == [late]
    assert engine.scheduler.running[0].tenant == "b" and len(early) == 2
    while engine.has_work:
        engine.step()
