"""Ray Train (gloo, CPU) on the demo checkpoints: two workers train the same adapter as one worker
on the doubled batch, and a worker lost mid-run is replaced and the run resumes from the latest
checkpoint. One run (checkpoints every 2 steps; rank 1 exits at step 5 of 6) serves both."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from acestep.training.lora import AdapterSpec, adapter_tensors
from acestep.training.loop import TrainConfig, Trainer
from acestep.training.run import load_for_training
from acestep.training.samples import SampleSet
from tests.training.conftest import one_thread

pytestmark = pytest.mark.slow

STEPS = 6


def _config(batch_size: int) -> TrainConfig:
    return TrainConfig(adapter=AdapterSpec(rank=4, alpha=8, dropout=0.0), steps=STEPS, batch_size=batch_size,
                       grad_accumulation=1, learning_rate=1e-2, warmup_steps=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def two_workers(ray_cpus, demo_root, prepared, tmp_path_factory):
    from pipelines.train_lora import TrainJob, run

    job = TrainJob(data=str(prepared), output=str(tmp_path_factory.mktemp("ray_train")), checkpoints=str(demo_root),
                   workers=2, cpus_per_worker=1.0, max_failures=1, fail_once_at=(1, 5))
    return run(job, _config(batch_size=1))


@pytest.fixture(scope="module")
def one_worker(demo_root, prepared):
    """The loop in this process (what one Ray Train worker runs) on batches twice as large."""
    model = load_for_training(str(demo_root), "acestep-v15-turbo")
    trainer = Trainer(model.transformer, model.null_condition, SampleSet(prepared), _config(batch_size=2),
                      model.objective)
    with one_thread():
        for _ in range(STEPS):
            trainer.train_step()
    return trainer


def test_a_lost_worker_is_replaced_and_the_run_resumes_from_the_last_checkpoint(two_workers):
    # rank 1 died at step 5: the run went on from step 4's checkpoint, or step 2's when Ray Train had
    # not yet collected step 4's reports from both workers (it polls them every few seconds)
    assert len(two_workers.resumed_at) == 1 and two_workers.resumed_at[0] in (2, 4)
    assert two_workers.steps == STEPS and len(two_workers.losses) == STEPS
    log = json.loads((two_workers.adapter_dir.parent / "train_log.json").read_text())
    assert log["workers"] == 2 and log["resumed_at"] == two_workers.resumed_at and log["steps_per_s"] > 0
    assert sorted(os.listdir(two_workers.adapter_dir)) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]


def test_two_workers_train_what_one_worker_trains_on_the_doubled_batch(two_workers, one_worker):
    assert two_workers.losses == pytest.approx(one_worker.losses, rel=1e-5)
    theirs = load_file(str(two_workers.adapter_dir / "adapter_model.safetensors"))
    ours = adapter_tensors(one_worker.transformer)
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-4, atol=1e-6)
    assert max(float(t.abs().max()) for n, t in ours.items() if "lora_B" in n) > 1e-3  # it trained
