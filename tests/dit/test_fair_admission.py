"""The DiT running batch admits waiting items in the fair-share order (``acestep.fairness``): a
tenant's flood takes turns with a later tenant, and a higher priority class goes first."""

from __future__ import annotations

from acestep.dit.batch import DiTLimits
from acestep.dit.running import RunningBatch
from tests.dit.conftest import prepare_each

ONE_ROW = DiTLimits(max_forward_rows=1)  # one item running at a time (turbo: one row per item)


def _admitted(handler, tenants_and_classes):
    """Each (tenant, priority) as a one-item request queued in that order → the order they ran in."""
    specs = [dict(caption=f"song {i}", duration=10, inference_steps=2) for i in range(len(tenants_and_classes))]
    batch = RunningBatch(handler.bundle, ONE_ROW)
    for (item, settings), (tenant, priority) in zip(prepare_each(handler, specs, 11), tenants_and_classes):
        batch.track(item, settings, owner=tenant, tenant=tenant, priority=priority)
    order = []
    while batch.has_work:
        order += [t.owner for t in batch.step()]
    return order


def test_a_flood_takes_turns_with_a_later_tenant(turbo_handler):
    order = _admitted(turbo_handler, [("a", 1)] * 4 + [("b", 1)])
    assert order == ["a", "b", "a", "a", "a"]


def test_a_higher_class_runs_first(turbo_handler):
    order = _admitted(turbo_handler, [("a", 0), ("a", 0), ("b", 2)])
    assert order == ["b", "a", "a"]


def test_the_handler_passes_each_requests_share_to_the_batch(turbo_handler):
    """Through ``submit_render``: requests queued while the worker is busy run by class and turn."""
    from acestep.fairness import Share
    from acestep.handler import AceStepHandler
    from acestep.inference import GenerationConfig, GenerationParams, RenderJob, prepare_request, submit_render
    from tests.dit.test_batching import held

    def job(seed):
        params, config, seeds = prepare_request(
            GenerationParams(thinking=False, caption=f"song {seed}", duration=10, inference_steps=2),
            GenerationConfig(batch_size=1, seeds=[seed], use_random_seed=False))
        return RenderJob(params, config, seeds)

    handler = AceStepHandler.from_bundle(turbo_handler.bundle, ONE_ROW)
    try:
        finished = []
        shares = [Share("a", 0), Share("a", 0), Share("a", 1), Share("b", 1)]
        with held(handler):
            futures = [submit_render(handler, job(i + 1), share=share) for i, share in enumerate(shares)]
            for i, future in enumerate(futures):
                future.add_done_callback(lambda _, i=i: finished.append(i))
        for future in futures:
            future.result(timeout=300)
        assert finished == [2, 3, 0, 1]  # the normal class first (in arrival order), then the low one
    finally:
        handler.loop.close()
