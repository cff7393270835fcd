"""The job's default CPU claims (``pipelines.placement``) and the DiT limits a device gets, the one rule
the Ray Data stage and the Serve config share."""

from __future__ import annotations

import pytest

from acestep.dit.batch import DiTLimits
from pipelines.placement import LIGHT_CPUS, MAX_ACTOR_CPUS, MIN_ACTOR_CPUS, READ_ROOM_CPUS, Pool, fit_cpus
from pipelines.render import parse_options
from serve.config import DiTBatchSettings


def test_default_pools_leave_room_for_the_reads_on_two_cpus():
    claims = fit_cpus(2.0, Pool(1, None), Pool(1, None))
    assert claims.lm == claims.dit and claims.lm + claims.dit <= 2.0 - READ_ROOM_CPUS
    three = fit_cpus(2.0, Pool(1, None), Pool(2, None))
    assert three.lm == three.dit and three.lm + 2 * three.dit <= 2.0 - READ_ROOM_CPUS


def test_plenty_of_cpus_give_each_actor_one_and_none_free_the_least():
    assert fit_cpus(64.0, Pool(1, None), Pool(2, None)) == fit_cpus(64.0, Pool(1, None), Pool(1, None))
    assert fit_cpus(64.0, Pool(1, None), Pool(2, None)).dit == MAX_ACTOR_CPUS
    assert fit_cpus(0.0, Pool(1, None), Pool(1, None)).dit == MIN_ACTOR_CPUS


def test_the_users_cpus_and_a_light_lm_pool_are_kept_and_the_rest_shared():
    claims = fit_cpus(2.0, Pool(1, 1.0), Pool(2, None))
    assert claims.lm == 1.0 and 1.0 + 2 * claims.dit <= 2.0 - READ_ROOM_CPUS
    no_lm = fit_cpus(2.0, Pool(1, None, light=True), Pool(1, None))
    assert no_lm.lm == LIGHT_CPUS and no_lm.dit == MAX_ACTOR_CPUS
    assert fit_cpus(2.0, Pool(1, 0.5, light=True), Pool(1, 3.0)) == type(claims)(lm=0.5, dit=3.0)


def test_cpu_options_are_unset_unless_given():
    options = parse_options(["--input", "x.jsonl", "--output", "out", "--demo"])
    assert options.lm_cpus is None and options.dit_cpus is None
    assert parse_options(["--input", "x", "--output", "o", "--demo", "--dit-cpus", "2"]).dit_cpus == 2.0


@pytest.mark.parametrize("device,rows", [("cpu", 1), ("cuda", 32), ("cuda:1", 32)])
def test_dit_limits_for_a_device_and_the_serve_default_agree(device, rows):
    assert DiTLimits.for_device(device).max_forward_rows == rows
    assert DiTBatchSettings().to_library(device).max_forward_rows == rows
    assert DiTBatchSettings(max_forward_rows=4).to_library(device).max_forward_rows == 4  # a configured value wins


def test_auto_is_the_device_this_process_would_use():
    import torch

    assert DiTLimits.for_device("auto") == DiTLimits.for_device("cuda" if torch.cuda.is_available() else "cpu")
    assert DiTBatchSettings().to_library().max_forward_rows == DiTLimits.for_device("auto").max_forward_rows
