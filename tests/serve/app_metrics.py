"""Metrics and structured logs of the running app: real local Ray (its metrics agent on a free port),
demo checkpoints and adapters, real HTTP; the Prometheus text the agent serves and the JSON lines of
the Serve log files are read back as an operator would. A group of tests/serve/test_hardening.py,
run first on its app (``hard_app``: adapters "warm" and "bright", one loaded at a time)."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import SPECS

CAPTION = "glass harmonica under midnight rain, obs-caption-7f3a"
LYRICS = "[verse]\nobs-lyric-91c2 the lanterns hum"
SONG = {"caption": CAPTION, "lyrics": LYRICS, "duration": 10, "inference_steps": 2, "batch_size": 1,
        "audio_format": "wav", "use_random_seed": False, "seeds": [3]}
UNKNOWN_TASK = "obs-unknown-task-5d1e"
# one adapter loaded then evicted by the next: every family gets a sample.
# A training job's families: shown by the studio's training test (tests/web/test_studio_training.py),
# whose app runs one (this app runs none)
TRAINING_FAMILIES = {name for name in SPECS if name.startswith("acestep_training_")}
ALL_FAMILIES = set(SPECS) - TRAINING_FAMILIES


@pytest.fixture(scope="module")
def traffic(http):
    """Two generations (the first with a chosen X-Request-ID, the LM planning it; each with its own
    adapter), a 404 on a templated route and a 422; the first generation's ids."""
    request_id = f"obs-req-{secrets.token_hex(6)}"
    first = http.post("/v1/generate", json={**SONG, "thinking": True, "lora": "warm"},
                      headers={"X-Request-ID": request_id})
    assert first.status_code == 200, first.text
    assert first.headers["x-request-id"] == request_id, "Serve echoes the client's request id"
    second = http.post("/v1/generate", json={**SONG, "thinking": False, "lora": "bright"})
    assert second.status_code == 200, second.text
    assert http.get(f"/v1/tasks/{UNKNOWN_TASK}").status_code == 404
    assert http.post("/v1/tasks", json={**SONG, "bpm": 5}).status_code == 422
    return {"request_id": request_id, "task_id": first.json()["task_id"]}


def _scrape(app):
    """{family name without ``ray_``: [(sample name, labels, value)]} of our metrics."""
    text = httpx.get(app.metrics_url, timeout=10).text
    families = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("ray_acestep_"):
            families[family.name[len("ray_"):]] = [(s.name, s.labels, s.value) for s in family.samples]
    return families


def _nonzero(samples) -> bool:
    """A counter or gauge sample above zero, or a histogram that counted something."""
    return any(value > 0 for name, _, value in samples if not name.endswith(("_bucket", "_sum")))


def _poll(condition, timeout_s: float = 120.0, period_s: float = 1.0):
    """``condition()`` until it returns something truthy; Ray exports metrics every few seconds, so
    this bounds the wait (against hangs) and never asserts how long it took."""
    deadline = time.time() + timeout_s
    while True:
        found = condition()
        if found or time.time() > deadline:
            return found
        time.sleep(period_s)


def test_each_metric_family_has_a_nonzero_sample(hard_app, http, traffic):
    long = http.post("/v1/tasks", json={**SONG, "duration": 600, "thinking": True, "inference_steps": 8})
    assert long.status_code == 202, long.text
    try:
        fillers, refused = [], None
        for _ in range(hard_app.config.ingress.max_unfinished_tasks):  # up to the app's bound: then a 429
            answer = http.post("/v1/tasks", json={**SONG, "thinking": False})
            if answer.status_code != 202:
                refused = answer
                break
            fillers.append(answer.json()["status_url"])
        for status_url in fillers:
            http.delete(status_url)
        assert refused is not None and refused.status_code == 429 and "retry-after" in refused.headers
        found = {}

        def complete():
            found.update(_scrape(hard_app))
            return all(_nonzero(found.get(name, [])) for name in ALL_FAMILIES)

        _poll(complete)  # the long task holds LM rows meanwhile, so the in-use gauge is above zero
        missing = sorted(name for name in ALL_FAMILIES if not _nonzero(found.get(name, [])))
        assert not missing, f"no non-zero sample yet: {missing}"
    finally:
        http.delete(long.json()["status_url"])
    requests = found["acestep_http_requests"]
    seen = {(labels["route"], labels["method"], labels["status"]) for _, labels, _ in requests}
    assert {("/v1/generate", "POST", "200"), ("/v1/tasks/{task_id}", "GET", "404"), ("/v1/tasks", "POST", "422"),
            ("/v1/tasks", "POST", "202"), ("/v1/tasks", "POST", "429")} <= seen, seen
    assert not any(UNKNOWN_TASK in route for route, _, _ in seen), "routes are templates, never raw paths"
    reasons = {labels["reason"] for _, labels, value in found["acestep_rejections"] if value > 0}
    assert "global" in reasons
    phases = {labels["phase"] for name, labels, value in found["acestep_task_phase_seconds"]
              if name.endswith("_count") and value > 0}
    assert {"lm", "dit", "encode"} <= phases, phases
    assert {labels["deployment"] for _, labels, _ in found["acestep_lm_tokens"]} == {"LMDeployment"}


def _log_lines(hard_app):
    lines, texts = [], []
    for path in sorted(hard_app.serve_logs.glob("*.log")):
        text = path.read_text(errors="replace")
        texts.append(text)
        for line in text.splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines, "\n".join(texts)


def test_json_logs_carry_request_and_task_ids_and_phase_durations(hard_app, traffic):
    request_id, task_id = traffic["request_id"], traffic["task_id"]

    def phase_lines():
        lines, _ = _log_lines(hard_app)
        found = [line for line in lines if line.get("task_id") == task_id and "next_phase" in line]
        return found if any(line["next_phase"] == "done" for line in found) else None

    transitions = _poll(phase_lines, timeout_s=60)
    assert transitions, "the task's phase transitions are logged"
    assert [(line["phase"], line["next_phase"]) for line in transitions] == [
        ("queued", "lm"), ("lm", "dit"), ("dit", "encode"), ("encode", "done")]
    for line in transitions:
        assert line["request_id"] == request_id and line["duration_s"] >= 0
        assert line["deployment"].endswith("Ingress") and line["levelname"] == "INFO"
    lines, text = _log_lines(hard_app)
    accepted = [line for line in lines if line.get("task_id") == task_id and line.get("source") == "v1/generate"]
    assert accepted and all(line["request_id"] == request_id for line in accepted)
    assert any(line.get("request_id") == request_id and "/v1/generate" in line.get("message", "")
               for line in lines), "Serve's own access log line has the id too"
    for secret in hard_app.keys.values():
        assert secret not in text, "no API key in any Serve log"
    assert "obs-caption-7f3a" not in text and "obs-lyric-91c2" not in text, "no caption or lyrics in the logs"


def test_the_dashboard_has_one_panel_per_family_with_fitting_queries():
    """cluster/grafana/acestep.json (no Ray): rates for counters, quantiles for histograms."""
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "cluster/grafana/acestep.json").read_text())
    exprs = {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in dashboard["panels"]}
    for name, spec in SPECS.items():
        series = f"ray_{name}" + {"counter": "_total", "histogram": "_bucket", "gauge": ""}[spec.kind]
        panels = [title for title, queries in exprs.items() if any(f"{series}[" in q or f"{series})" in q
                                                                   for q in queries)]
        assert len(panels) == 1, (name, panels)
        for query in exprs[panels[0]]:
            if spec.kind == "counter":
                assert f"rate({series}[$__rate_interval])" in query, query
            elif spec.kind == "histogram":
                assert query.startswith("histogram_quantile(") and f"rate({series}[" in query, query
    assert len(dashboard["panels"]) == len(SPECS)
    assert all(p["datasource"]["type"] == "prometheus" for p in dashboard["panels"])
