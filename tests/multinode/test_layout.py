"""The pure parts of a run spanning machines: which stages span, whether the hosts fit,
each node's plan, the torchrun arguments a node gets, and how a dead node is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from remoteops.common.errors import ConfigError
from remoteops.common.multi_node import (bind, check_layout, check_node, lost, node_record,
                                         plan_node, spanning)

REPO = Path(__file__).resolve().parents[2]


def _settings(**stages) -> dict:
    return {"stages": stages}


SPAN = {"executor": "torchrun", "nnodes": 2, "nproc_per_node": 1}


def test_which_stages_span_and_whether_the_hosts_fit():
    settings = _settings(a=SPAN, b={"executor": "torchrun", "nproc_per_node": 2},
                         c={"command": "python x.py"})
    assert spanning(settings) == {"a": 2}
    assert check_layout(settings, ["b", "c"], ["h1", "h2"]) is None  # no spanning stage: a sweep
    assert check_layout(settings, ["a", "c"], ["h1", "h2"]) == 2
    with pytest.raises(ConfigError, match=r"^stage a spans nnodes = 2 machines but --host names "
                                          r"1 \(h1\); name 2 hosts"):
        check_layout(settings, ["a"], ["h1"])
    # one host and its own rdzv_endpoint: the other machines are started by hand, as before
    manual = _settings(a={**SPAN, "rdzv_endpoint": "10.0.0.1:29500"})
    assert check_layout(manual, ["a"], ["h1"]) is None
    assert check_layout(manual, ["a"], ["h1", "h2"]) == 2
    mixed = _settings(a=SPAN, b={**SPAN, "nnodes": 3})
    with pytest.raises(ConfigError, match="different numbers of machines"):
        check_layout(mixed, ["a", "b"], ["h1", "h2"])


def test_a_node_record_is_checked_and_other_nodes_skip_what_does_not_span():
    node = check_node(node_record(1, ["h1", "h2"], "run_20261126T000000Z", "10.0.0.5", 29400))
    for bad, why in (({**node, "rank": 2}, "does not fit"), ({**node, "run_id": "../x"},
                                                               "is not run_<stamp>"),
                     ({**node, "hosts": ["h1"]}, "does not fit"), ("x", "JSON object")):
        with pytest.raises(ValueError, match=why):
            check_node(bad)
    stages = [{"name": n, "status": "pending"} for n in ("precheck", "a", "note", "collect")]
    plan_node(stages, node, {"a": 2})
    assert [(s["name"], s["status"]) for s in stages] == [
        ("precheck", "skipped"), ("a", "pending"), ("note", "skipped"), ("collect", "skipped")]
    assert stages[0]["reason"] == "runs on node 0 (h1)"
    zero = [{"name": "precheck", "status": "pending"}]
    plan_node(zero, {**node, "rank": 0}, {"a": 2})
    assert zero[0]["status"] == "pending"  # node 0 runs everything


def test_a_bound_node_gets_the_static_rendezvous_and_a_dead_process_is_a_lost_node():
    from remoteops.executors import Launch
    from remoteops.plugins import executor_for, get_plugin_manager

    node = node_record(1, ["h1", "h2"], "run_X", "10.0.0.5", 29400)
    executor = executor_for(get_plugin_manager(REPO), _settings(a=SPAN), "a")
    executor.table.update(bind(executor.table, node, "a", "run_X"))
    launch = Launch("a", "train", ["py"], python="py", module="remoteops.agent", args=["train"])
    assert executor.wrap(launch) == [
        "py", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
        "--rdzv_backend", "static", "--rdzv_endpoint", "10.0.0.5:29400", "--rdzv_id",
        "run_X-a", "--rdzv_conf", "timeout=600", "--max_restarts", "0", "--nproc_per_node",
        "1", "-m", "remoteops.agent", "train"]
    assert executor.describe()["node_rank"] == 1
    # without a node (one host, no rdzv_endpoint) the stage cannot start: one line, what to do
    alone = executor_for(get_plugin_manager(REPO), _settings(a=SPAN), "a")
    with pytest.raises(ValueError, match=r"start it on 2 hosts at once"):
        alone.wrap(launch)
    klass, reason = lost("process_died", "the trainer exited with 1", node)
    assert klass == "node_lost" and "(node 1 of 2;" in reason and "--host h1,h2" in reason
    assert lost("nan", "gradient norm is nan", node) == ("nan", "gradient norm is nan")


def test_bad_rendezvous_settings_are_one_line_and_rdzv_host_is_a_host_key(tmp_path):
    from remoteops.common.config import load_settings
    from remoteops.plugins import executor_for, get_plugin_manager

    pm = get_plugin_manager(REPO)
    for key, value, why in (("rdzv_port", 70000, "write a whole number of 1-65535"),
                            ("rdzv_timeout", 0, "write a whole number of seconds")):
        with pytest.raises(ConfigError, match=f"^stages.a.{key} is {value}; {why}"):
            executor_for(pm, _settings(a={**SPAN, key: value}), "a")
    with pytest.raises(ConfigError, match="rdzv_port is a torchrun setting but the stage runs "
                                          "as a plain process"):
        executor_for(pm, _settings(a={"rdzv_port": 29400}), "a")
    env = {"REMOTEOPS_USER_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "remoteops.toml").write_text('[hosts.h1]\nhost = "a"\nrdzv_host = "10.0.0.5"\n')
    assert load_settings(tmp_path, env=env)["hosts"]["h1"]["rdzv_host"] == "10.0.0.5"
    (tmp_path / "remoteops.toml").write_text('[hosts.h1]\nhost = "a"\nrdzv_hots = "10.0.0.5"\n')
    with pytest.raises(ConfigError, match="rdzv_host"):
        load_settings(tmp_path, env=env)
