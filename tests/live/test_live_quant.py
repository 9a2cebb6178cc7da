"""The quantization checks of a live stage read its samples when it has no eval_set."""

from __future__ import annotations

from remoteops.common.config import load_settings
from remoteops.quant.job import QuantJob
from tests.live.conftest import Producer, make_live_project


def test_a_live_stage_without_eval_set_checks_on_its_arrived_samples(tmp_path, demo_model):
    root = make_live_project(tmp_path / "proj", demo_model)
    producer = Producer(root, tmp_path / "work")
    producer.deliver(0, 3)
    producer.deliver(3, 9)
    settings = load_settings(root, env={"REMOTEOPS_USER_CONFIG": str(root / "none.toml")})

    job = QuantJob.for_stage(settings, "live", tmp_path / "run")

    assert job.eval_set is None
    rows = job._records()
    assert len(rows) == job.max_items == 8  # the first 8 of 12 arrived samples, in order
    assert [r["messages"][-1]["content"] for r in rows] == [
        f"What is item {i}?" for i in range(8)]
    assert [r["reference"] for r in rows] == [f"Item {i} is number {i}." for i in range(8)]
