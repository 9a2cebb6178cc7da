"""A growing JSONL source over the noisy sshd: only complete lines are samples, each line is
sent once, --status and --done tell the truth, and bad input is one line of advice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _lines(dest: Path) -> list[dict]:
    return [json.loads(l) for l in (dest / ".manifest.jsonl").read_text().splitlines()]


def test_jsonl_half_written_last_line_waits_then_goes_once(cli, project, synced):
    root, env = synced
    (project / "remoteops.toml").write_text('[sync]\nsource = "gen/out.jsonl"\n'
                                            'format = "jsonl"\nsettle_seconds = 0.2\n')
    src = project / "gen" / "out.jsonl"
    src.parent.mkdir()
    rows = [json.dumps({"prompt": f"q{i}", "answer": "a" * i}) + "\n" for i in range(5)]
    src.write_text("".join(rows) + '{"prompt": "q5", "ans')  # the writer is mid-line
    res = cli("sync-data", "--host", "box", env=env)
    assert res.returncode == 0, res.stderr
    assert "sent 5 sample(s)" in res.stdout and "the server has 5" in res.stdout
    assert "1 still being written here" in res.stdout
    dest = root / "data" / "live"
    assert [l["id"] for l in _lines(dest)] == [f"line-00000{i}.jsonl" for i in range(1, 6)]
    for i, row in enumerate(rows, 1):
        assert (dest / f"line-00000{i}.jsonl").read_text() == row

    status = cli("sync-data", "--host", "box", "--status", env=env)
    assert status.returncode == 0, status.stderr
    assert "local       5 complete sample(s), 1 still being written" in status.stdout
    assert "server      5 verified sample(s) in box:data/live" in status.stdout
    assert "lag         1 sample(s) not on the server yet" in status.stdout
    assert "last error  none" in status.stdout

    with open(src, "a") as fh:  # the line ends, two more follow, one of them not JSON
        fh.write('wer": "done"}\n{broken\n{"prompt": "q7"}\n')
    rows.append('{"prompt": "q5", "answer": "done"}\n')
    res = cli("sync-data", "--host", "box", "--json", env=env)
    out = json.loads(res.stdout)
    assert out["sent"] == 2 and out["server"] == 7 and out["bad"] == ["line 7"]
    assert (dest / "line-000006.jsonl").read_text() == rows[5]
    assert (dest / "line-000008.jsonl").read_text() == '{"prompt": "q7"}\n'
    again = json.loads(cli("sync-data", "--host", "box", "--json", env=env).stdout)
    assert again["sent"] == 0 and again["server"] == 7 and again["batches"] == 0

    done = cli("sync-data", "--host", "box", "--done", env=env)
    assert done.returncode == 0, done.stderr
    assert "data/live: marked complete with 7 sample(s)" in done.stdout
    assert json.loads((dest / ".complete").read_text())["samples"] == 7
    with open(src, "a") as fh:
        fh.write('{"prompt": "late"}\n')
    late = cli("sync-data", "--host", "box", env=env)
    assert late.returncode == 2 and "Traceback" not in late.stderr
    assert "was marked complete" in late.stderr and ".complete" in late.stderr
    watch = cli("sync-data", "--host", "box", "--watch", env=env, timeout=60)
    assert watch.returncode == 2 and "was marked complete" in watch.stderr  # no retry loop
    assert "1 new sample(s) were not sent" in watch.stderr
    assert "marked complete" in cli("sync-data", "--host", "box", "--status", env=env).stdout
    assert len(_lines(dest)) == 7


def test_bad_settings_and_sources_are_one_line_of_advice(cli, project, synced):
    root, env = synced
    res = cli("sync-data", env=env)
    assert res.returncode == 2 and "no sync source is set" in res.stderr
    assert "Traceback" not in res.stderr
    (project / "remoteops.toml").write_text('[sync]\nsource = "nowhere"\nformat = "dir"\n')
    res = cli("sync-data", env=env)
    assert res.returncode == 2 and "'sync.format' is 'dir'" in res.stderr
    assert "one of dirs, files, jsonl" in res.stderr
    (project / "remoteops.toml").write_text('[sync]\nsource = "nowhere"\ndest = "../out"\n')
    res = cli("sync-data", env=env)
    assert res.returncode == 2 and "remoteops.toml:3" in res.stderr and "data/live" in res.stderr
    (project / "remoteops.toml").write_text('[sync]\nsource = "nowhere"\n')
    res = cli("sync-data", env=env)
    assert res.returncode == 2 and "nowhere is not a folder" in res.stderr
    res = cli("sync-data", "--stage", "style", env=env)
    assert res.returncode == 2 and "there is no stage 'style'" in res.stderr
    res = cli("sync-data", "--help")
    assert res.returncode == 0 and "--watch" in res.stdout and "--done" in res.stdout


def test_stage_dest_and_a_files_source_with_temp_names(cli, project, synced):
    root, env = synced
    (project / "remoteops.toml").write_text(
        '[sync]\nsource = "out"\nformat = "files"\nsettle_seconds = 0.2\n'
        '[stages.grow]\ndataset_live = "data/grow"\n')
    out = project / "out"
    out.mkdir()
    (out / "a.json").write_text('{"a": 1}\n')
    (out / "b.json").write_text('{"b": 2}\n')
    (out / "c.json.tmp").write_text("being written")
    (out / ".d.json").write_text("hidden")
    for name in ("a.json", "b.json"):
        os.utime(out / name, (time.time() - 90, time.time() - 90))
    status = cli("sync-data", "--host", "box", "--stage", "grow", "--status", env=env)
    assert status.returncode == 0, status.stderr
    assert "server      0 verified sample(s) in box:data/grow" in status.stdout
    assert "lag         3 sample(s) not on the server yet (oldest waiting 9" in status.stdout
    res = cli("sync-data", "--host", "box", "--stage", "grow", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sent"] == 2
    dest = root / "data" / "grow"
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == \
        ["a.json", "b.json"]
    assert (dest / "b.json").read_text() == '{"b": 2}\n'
    status = cli("sync-data", "--host", "box", "--stage", "grow", "--status", env=env)
    assert "local       2 complete sample(s), 1 still being written" in status.stdout
    (out / "b.json").write_text('{"b": 3}\n')  # rewritten after it was sent
    res = cli("sync-data", "--host", "box", "--stage", "grow", "--json", env=env)
    assert json.loads(res.stdout)["sent"] == 0
    status = cli("sync-data", "--host", "box", "--stage", "grow", "--status", env=env)
    assert "changed     1 sample(s) changed here after they were sent (b.json)" in status.stdout
    assert (dest / "b.json").read_text() == '{"b": 2}\n'
