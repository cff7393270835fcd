"""The engine service: one loop thread drives one engine; requests join between decode steps,
never wait for another request's wave, can be cancelled, and report progress (fp32, CPU, the raw
demo LM, CFG and constraints on)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

from acestep.lm.request import Cancellation
from acestep.params import GenerationConfig, GenerationParams
from acestep.steploop import StepLoop
from tests.lm_engine.conftest import make_engine

DEADLINE_S = 120  # generous bound on waits, only so a broken loop fails instead of hanging


class Tokens:
    """An ``on_step`` callback that lets a test wait until a request has made some tokens."""

    def __init__(self):
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self, tokens: int) -> None:
        with self._cond:
            self.count = tokens
            self._cond.notify_all()

    def wait_for(self, tokens: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= tokens, DEADLINE_S), f"stuck below {tokens} tokens"


def _solo(handler, requests):
    return [handler.submit(r).result(DEADLINE_S) for r in requests]


def test_requests_joining_mid_decode_get_their_solo_tokens(lm_handler, make_request):
    requests = [make_request("cot" if seed % 2 else "codes", seed, 2.0, 90 if seed % 2 else None)
                for seed in range(100, 110)]
    solo = _solo(lm_handler, requests)
    background_progress = Tokens()
    background = lm_handler.submit(make_request("codes", 99, 2.0, duration=60), background_progress)
    background_progress.wait_for(10)
    joined = []
    for request in requests:  # each joins a few steps after the previous one
        progress = Tokens()
        joined.append(lm_handler.submit(request, progress))
        progress.wait_for(3)
    assert [f.result(DEADLINE_S) for f in joined] == solo
    assert len(background.result(DEADLINE_S)) == 301


def test_a_short_request_behind_a_long_one_finishes_first(lm_handler, make_request):
    finished = []
    long_progress = Tokens()
    long = lm_handler.submit(make_request("codes", 1, 2.0, duration=240), long_progress)
    long.add_done_callback(lambda _: finished.append("long"))
    long_progress.wait_for(5)
    short = lm_handler.submit(make_request("codes", 2, 2.0, duration=10))
    short.add_done_callback(lambda _: finished.append("short"))
    assert len(short.result(DEADLINE_S)) == 51
    assert not long.done(), "the short request waited for the long one"
    assert len(long.result(DEADLINE_S)) == 1201 and finished == ["short", "long"]


def test_cancelling_one_of_four_frees_its_rows_and_leaves_the_others_unchanged(lm_handler, make_request):
    requests = [make_request("codes", 200 + i, 2.0, duration=30) for i in range(4)]
    solo = _solo(lm_handler, requests)
    loop = StepLoop(make_engine(lm_handler.llm, max_rows=8, max_len=1024), "test-lm-engine")  # four CFG pairs
    try:
        progress = [Tokens() for _ in requests]
        futures = [loop.submit(r, p) for r, p in zip(requests, progress)]
        for p in progress:
            p.wait_for(5)
        late_progress = Tokens()
        late = loop.submit(make_request("codes", 300, 2.0, duration=10), late_progress)
        assert loop.stats()["waiting"] == 1  # the engine is full
        assert futures[1].cancel()
        late_progress.wait_for(1)  # it got the cancelled request's rows ...
        assert not any(f.done() for f in futures[::2] + futures[3:])  # ... before anyone else finished
        with pytest.raises(CancelledError):
            futures[1].result()
        assert [futures[i].result(DEADLINE_S) for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]
        assert len(late.result(DEADLINE_S)) == 51
        stats = loop.stats()
        assert stats["requests_aborted"] == 1 and stats["requests_finished"] == 4
        assert stats["peak_rows_in_use"] == 8 and stats["rows_in_use"] == 0
        assert sum(stats["rows_per_step"].values()) == stats["steps"] and max(stats["rows_per_step"]) == 8
    finally:
        loop.close()


@pytest.mark.parametrize("allow, chunk, peak", [(True, 2, 2), (True, 8, 4), (False, 8, 1)])
def test_lm_batch_chunk_size_bounds_a_requests_items_in_the_engine(lm_handler, allow, chunk, peak):
    params = GenerationParams(caption="lofi beat", duration=10, bpm=80, keyscale="A minor", timesignature="4")
    config = GenerationConfig(batch_size=4, allow_lm_batch=allow, lm_batch_chunk_size=chunk)
    group = f"chunk-{allow}-{chunk}"
    plans = lm_handler.plan(params, config, [1, 2, 3, 4], group=group)
    assert all(p.audio_codes.count("<|audio_code_") == 50 for p in plans)
    assert lm_handler.stats()["group_peaks"][group] == peak


def test_progress_is_rate_limited_monotone_and_complete(lm_handler):
    events = []
    params = GenerationParams(caption="ambient pads", duration=30, lm_cfg_scale=2.0)
    plans = lm_handler.plan(params, GenerationConfig(batch_size=2, allow_lm_batch=True), [5, 6],
                            progress=events.append)
    codes = [e for e in events if e.phase == "codes"]
    assert events[: len(events) - len(codes)] == [e for e in events if e.phase == "cot"]  # CoT, then codes
    done = [e.tokens_done for e in codes]
    assert done == sorted(set(done)) and 10 <= len(codes) <= 25  # every 5 %, not one per token
    assert codes[-1].tokens_done == codes[-1].tokens_expected == 2 * 151  # 30 s: 150 codes + stop, 2 items
    assert all(p.audio_codes.count("<|audio_code_") == 150 for p in plans)


def test_a_cancelled_plan_raises_and_frees_its_rows(lm_handler):
    cancel, progress = Cancellation(), []
    params = GenerationParams(caption="long drone", duration=240, bpm=60, keyscale="C major", timesignature="4")
    before = lm_handler.stats()["requests_aborted"]

    def on_progress(event):
        progress.append(event)
        if event.tokens_done >= 60:
            cancel.cancel()

    with pytest.raises(CancelledError):
        lm_handler.plan(params, GenerationConfig(batch_size=2, allow_lm_batch=True), [1, 2],
                        progress=on_progress, cancel=cancel)
    assert max(e.tokens_done for e in progress) < 2 * 1201
    _eventually(lambda: lm_handler.stats()["requests_aborted"] == before + 2)  # at the next step
    _eventually(lambda: lm_handler.stats()["rows_in_use"] == 0)


def _eventually(condition) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)
