"""The Ray Data render job on a multi-node cluster (one machine, ``tests/cluster/harness.py``): the LM
pool on the LM node (the demo 5 Hz LM plans every row: metadata and audio codes) and the DiT pool on a
DiT node, placed by the custom resources of the GPU profile (``--lm-resources`` / ``--dit-resources``;
CPUs per actor left to the job's defaults); the DiT node is removed mid-job, and the job, or its rerun
(same command, same output), ends with every input row in the manifest exactly once.

The job runs as its own driver process (as the RayJob's entrypoint does), so a run that outlives its
bound is killed rather than left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import soundfile as sf

from pipelines.manifest import JOURNAL, read_manifest
from tests.cluster.harness import REPO_ROOT, MultiNode, profile_resources, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROWS = 10
RUN_BOUND_S = 600  # one run of the job, model loads included


@pytest.fixture
def nodes():
    """Head (the job's driver and read tasks) + an LM node + two DiT nodes, each with room for one actor:
    the second DiT node takes the DiT actor when the first is gone."""
    import ray

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), old_path]))  # every node's workers
    cluster = MultiNode.start(1, 1.0)
    try:
        cluster.add("lm", 1, 1.0)
        cluster.add("dit", 1, 1.0)
        cluster.add("dit", 1, 1.0)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("PYTHONPATH") if old_path is None else os.environ.update(PYTHONPATH=old_path)


def job_command(prompts, output, checkpoints):
    resources = profile_resources()
    return [sys.executable, "-m", "pipelines.render", "--input", str(prompts), "--output", str(output),
            "--checkpoints", str(checkpoints), "--device", "cpu", "--lm-resources", json.dumps(resources["lm"]),
            "--dit-resources", json.dumps(resources["dit"]), "--dit-rows-in-flight", "1"]


def journal(output):
    path = output / JOURNAL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start_job(command, nodes, log):
    env = {**os.environ, "RAY_ADDRESS": nodes.cluster.address}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def progress(process, output, log_path):
    """The journal's records once it holds two; fails if the job ended first."""
    if process.poll() is not None:
        raise AssertionError(f"the job ended before the node loss:\n{log_path.read_text()[-4000:]}")
    records = journal(output)
    return records if len(records) >= 2 else None


def finish(process, log_path):
    try:
        return process.wait(timeout=RUN_BOUND_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the job ran past {RUN_BOUND_S} s:\n{log_path.read_text()[-4000:]}")


def test_stages_on_their_nodes_and_a_lost_dit_node_loses_no_row(nodes, demo_root, tmp_path):
    ids = [f"song-{i:02d}" for i in range(ROWS)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": row_id, "caption": f"cluster song {i}", "duration": 10,
                                           "seed": 100 + i, "thinking": True}) + "\n"
                               for i, row_id in enumerate(ids)))
    output, command = tmp_path / "out", job_command(prompts, tmp_path / "out", demo_root)
    (lm_node,) = [n.node_id for n in nodes.of_kind("lm")]
    dit_nodes = {n.node_id for n in nodes.of_kind("dit")}

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        first = start_job(command, nodes, log)
        early = wait_for(lambda: progress(first, output, first_log), RUN_BOUND_S, "two rows in the journal")
        lost = early[0]["nodes"]["dit"]
        assert lost in dit_nodes and {r["nodes"]["dit"] for r in early} == {lost}
        assert len(early) < ROWS  # the node goes mid-job
        nodes.remove(nodes.nodes[lost])
        first_code = finish(first, first_log)

    rerun_log = tmp_path / "rerun.log"
    with open(rerun_log, "w") as log:
        assert finish(start_job(command, nodes, log), rerun_log) == 0, rerun_log.read_text()[-4000:]
    summary = re.search(r"render: (\d+) rows done, (\d+) failed, (\d+) skipped \(of (\d+)\)", rerun_log.read_text())
    assert summary and int(summary[2]) == 0 and int(summary[4]) == ROWS, rerun_log.read_text()[-4000:]
    if first_code == 0:  # the first run finished despite the loss: the rerun had nothing left
        assert int(summary[3]) == ROWS

    records = read_manifest(output)
    assert [r["id"] for r in records] == ids  # each input row once, in input order
    assert len((output / "manifest.jsonl").read_text().splitlines()) == ROWS
    for record in records:
        assert record["error"] is None and record["seeds"] == [100 + record["index"]]
        assert record["lm_metadata"] and record["codes"][0].startswith("<|audio_code_")  # planned by the LM
        assert record["time_costs"]["lm_total_time"] > 0
        (name,) = record["files"]
        data, rate = sf.read(output / name)
        assert rate == 48000 and data.shape == (480000, 2)
    assert sorted(p.name for p in (output / "audio").iterdir() if not p.name.startswith(".")) == \
        sorted(r["files"][0].split("/")[-1] for r in records)
    # the LM pool stayed on the LM node; the DiT pool rendered on DiT nodes only, after the loss on the other
    assert {r["nodes"]["lm"] for r in records} == {lm_node}
    rendered_on = {r["nodes"]["dit"] for r in records}
    assert rendered_on <= dit_nodes and rendered_on - {lost}, rendered_on
