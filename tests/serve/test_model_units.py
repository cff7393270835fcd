"""Choosing the model deployment for a request (``serve.models``) and the adapter extras."""

from __future__ import annotations

import pytest

from acestep.checkpoints.demo_lora import write_demo_lora
from serve.config import AppConfig
from serve.edge.errors import FieldError
from serve.models import ModelSet, adapter_choice, deployment_name

TURBO = {"acestep-v15-turbo": True, "acestep-v15-base": False, "acestep-v15-sft": False}


def _field(raised):
    return list(raised.value.loc)[-1]


def test_names_and_aliases_resolve_to_served_models():
    models = ModelSet(("acestep-v15-turbo", "acestep-v15-base"), ("acestep-5Hz-lm-0.6B", "acestep-5Hz-lm-1.7B"))
    assert models.dit_name(None) == "acestep-v15-turbo"
    for alias in ("acestep-v15-base", "acestep/acestep-v15-base", "base"):
        assert models.dit_name(alias) == "acestep-v15-base"
    with pytest.raises(FieldError) as raised:
        models.dit_name("gpt-4o")
    assert _field(raised) == "model" and "acestep-v15-turbo, acestep-v15-base" in raised.value.message
    assert raised.value.status_code == 422 and models.dit_name("turbo", status=400) == "acestep-v15-turbo"
    assert models.lm_name("acestep-5Hz-lm-1.7B") == "acestep-5Hz-lm-1.7B" and models.lm_name(None) == "acestep-5Hz-lm-0.6B"
    for bad in ("/models/acestep-5Hz-lm-1.7B", "../acestep-5Hz-lm-1.7B", "acestep-5Hz-lm-4B"):
        with pytest.raises(FieldError) as raised:
            models.lm_name(bad)
        assert _field(raised) == "lm_model" and "never a path" in raised.value.message
    assert deployment_name("dit", "acestep-v15-turbo", "acestep-v15-turbo") == "DiTDeployment"
    assert deployment_name("dit", "acestep-v15-base", "acestep-v15-turbo") == "DiTDeployment-acestep-v15-base"


def test_xl_variants_resolve_by_their_aliases_beside_the_2b_ones():
    served = ("acestep-v15-turbo", "acestep-v15-xl-turbo", "acestep-v15-xl-sft", "acestep-v15-sft",
              "acestep-v15-turbo-shift3")
    models = ModelSet(served, ("lm",))
    for alias, name in (("xl-turbo", "acestep-v15-xl-turbo"), ("acestep/acestep-v15-xl-turbo", "acestep-v15-xl-turbo"),
                        ("xl-sft", "acestep-v15-xl-sft"), ("turbo", "acestep-v15-turbo"), ("sft", "acestep-v15-sft"),
                        ("turbo-shift3", "acestep-v15-turbo-shift3"), ("shift3", "acestep-v15-turbo-shift3")):
        assert models.dit_name(alias) == name, alias
    for unknown in ("xl-base", "xl", "base"):
        with pytest.raises(FieldError) as raised:
            models.dit_name(unknown)
        assert _field(raised) == "model" and "acestep-v15-xl-turbo" in raised.value.message
    only_xl = ModelSet(("acestep-v15-xl-turbo", "acestep-v15-xl-base"), ("lm",))
    assert only_xl.dit_name("turbo") == "acestep-v15-xl-turbo" and only_xl.dit_name("base") == "acestep-v15-xl-base"
    turbo = {"acestep-v15-xl-turbo": True, "acestep-v15-xl-base": False}
    assert only_xl.pick_dit(None, "lego", turbo) == "acestep-v15-xl-base"
    assert only_xl.pick_dit("xl-base", "extract", turbo) == "acestep-v15-xl-base"


def test_base_only_tasks_route_to_a_base_variant_or_name_task_type():
    models = ModelSet(("acestep-v15-turbo", "acestep-v15-base"), ("lm",))
    assert models.pick_dit(None, "text2music", TURBO) == "acestep-v15-turbo"
    assert models.pick_dit(None, "lego", TURBO) == "acestep-v15-base"
    assert models.pick_dit("base", "extract", TURBO) == "acestep-v15-base"
    with pytest.raises(FieldError) as raised:
        models.pick_dit("acestep-v15-turbo", "lego", TURBO)
    assert _field(raised) == "task_type" and "acestep-v15-base (base/sft)" in raised.value.message
    only_turbo = ModelSet(("acestep-v15-turbo",), ("lm",))
    with pytest.raises(FieldError) as raised:
        only_turbo.pick_dit(None, "complete", TURBO)
    assert _field(raised) == "task_type" and "acestep-v15-turbo (turbo)" in raised.value.message


def test_adapter_choice_names_lora_and_never_a_path(tmp_path):
    write_demo_lora(tmp_path / "warm")
    config = AppConfig.model_validate({"demo": True, "dit": {"adapters": {"dir": str(tmp_path)}}})
    assert adapter_choice(config, {}) == {}
    assert adapter_choice(config, {"lora": "warm", "lora_scale": 0.5}) == {"adapters": [["warm", 0.5]]}
    assert adapter_choice(config, {"lora": "warm", "lora_scale": 0}) == {"adapters": []}
    for choice, field in (({"lora": "cold"}, "lora"), ({"lora": "../warm"}, "lora"), ({"lora": "/etc"}, "lora"),
                          ({"lora": "warm", "lora_scale": 3}, "lora_scale")):
        with pytest.raises(FieldError) as raised:
            adapter_choice(config, choice)
        assert _field(raised) == field
    with pytest.raises(FieldError) as raised:
        adapter_choice(AppConfig.model_validate({"demo": True}), {"lora": "warm"})
    assert "serves no adapters" in raised.value.message
    defaulted = AppConfig.model_validate({"demo": True, "dit": {"adapters": {"dir": str(tmp_path), "default": "warm",
                                                                            "default_scale": 0.7}}})
    assert adapter_choice(defaulted, {}) == {"adapters": [["warm", 0.7]]}


def test_several_adapters_with_weights_in_loras(tmp_path):
    for name in ("warm", "bright", "dark"):
        write_demo_lora(tmp_path / name)
    config = AppConfig.model_validate({"demo": True, "dit": {"adapters": {"dir": str(tmp_path), "max_loaded": 2}}})
    assert adapter_choice(config, {"loras": {"warm": 0.5, "bright": 1.5}}) == {"adapters": [["bright", 1.5], ["warm", 0.5]]}
    assert adapter_choice(config, {"loras": {"warm": 1.0, "bright": 0}}) == adapter_choice(config, {"lora": "warm"})
    assert adapter_choice(config, {"loras": {"warm": 1, "bright": 1, "dark": 0}}) == {"adapters": [["bright", 1.0], ["warm", 1.0]]}
    for choice in ({"loras": {"warm": 1, "cold": 1}}, {"loras": {"../warm": 1}}, {"loras": {"warm": 2.5}},
                   {"loras": {"warm": 1, "bright": 1, "dark": 1}}, {"loras": {"warm": 1}, "lora": "bright"}):
        with pytest.raises(FieldError) as raised:
            adapter_choice(config, choice)
        assert _field(raised) == "loras", choice
    with pytest.raises(FieldError) as raised:
        adapter_choice(config, {"loras": {"warm": 1, "bright": 1, "dark": 1}})
    assert "at most 2" in raised.value.message


def test_adapter_pools_publish_what_they_hold_and_gone_replicas_drop_out(demo_root, tmp_path):
    import asyncio
    import time

    from serve.adapter_pool import HOLDINGS, AdapterPool, holders
    from serve.store import open_task_store
    from tests.conftest import dit_handler

    for seed, name in enumerate(("warm", "bright"), start=1):
        write_demo_lora(tmp_path / "adapters" / name, seed=seed)
    url = f"sqlite:///{tmp_path}/tasks.db"
    store = open_task_store(url)
    handler = dit_handler(demo_root)
    try:
        pool = AdapterPool(handler, str(tmp_path / "adapters"), max_loaded=1, replica="DiTDeployment#a",
                           open_store=lambda: open_task_store(url))

        async def use(name):
            async with pool.using([name]):
                pass

        assert holders(store, 60) == {}
        asyncio.run(use("warm"))
        assert holders(store, 60) == {"warm": ["DiTDeployment#a"]}
        store.put_setting(HOLDINGS + "DiTDeployment#b", {"loaded": ["warm", "bright"], "at": time.time()})
        asyncio.run(use("bright"))  # evicts warm here; replica b still holds both
        assert holders(store, 60) == {"warm": ["DiTDeployment#b"], "bright": ["DiTDeployment#a", "DiTDeployment#b"]}
        # b stops refreshing (gone): its record ages out and is deleted; a's health checks refresh its own
        store.put_setting(HOLDINGS + "DiTDeployment#b", {"loaded": ["warm"], "at": time.time() - 120})
        store.put_setting(HOLDINGS + "DiTDeployment#a", {"loaded": ["bright"], "at": time.time() - 120})
        pool.refresh()
        deadline = time.time() + 30  # the refresh writes from a thread of its own; a bound, not a timing
        while store.get_setting(HOLDINGS + "DiTDeployment#a")["at"] < time.time() - 60:
            assert time.time() < deadline, "the pool's record was not refreshed"
            time.sleep(0.05)
        assert holders(store, 60) == {"bright": ["DiTDeployment#a"]}
        assert store.get_setting(HOLDINGS + "DiTDeployment#b") is None
        pool.withdraw()  # a graceful shutdown
        assert holders(store, 60) == {} and store.settings(HOLDINGS) == {}
    finally:
        handler.loop.close()


def test_lora_routes_declare_the_client_errors_they_answer():
    """A malformed body (400), an unknown or unloadable adapter name (400) and a field out of range
    (422) are in each route's OpenAPI, so schema-checking clients and fuzzers expect them."""
    import serve.api  # noqa: F401  (registers the routes)
    from serve.http_app import api

    paths = api.openapi()["paths"]
    for route in ("load", "toggle", "scale"):
        assert {"400", "422"} <= set(paths[f"/v1/lora/{route}"]["post"]["responses"]), route
