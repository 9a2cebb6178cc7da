"""Deploys of this checkout against another one and rsync, interleaved, to tell a change's
effect from a shared machine's noise.

``bench_deploy`` compares remoteops with rsync and scp; on a loaded machine its three runs
per case move more from run to run than a change moves them. This runs, on the same sshd,
in rotating order: this checkout with paramiko (``new``), this checkout with
``ssh.client = "openssh"`` (``new-ssh``), the baseline checkout (``base``: any other
commit, e.g. ``git archive <commit> | tar -x -C /tmp/base``, whose agent runs from there
too) and ``rsync -az``: a full deploy ``--full-repeats`` times, then ``--repeats`` rounds
of a one-file change and a no-op. Each tool has its own copy of the project and its own
server root. It prints the medians, the ratios to rsync and the load average.

    python -m tests.bench.bench_deploy_ab --baseline /tmp/base [--shaped] [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
if str(HERE.parents[2]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[2]))

from tests.bench.bench_deploy import (  # noqa: E402
    ALIAS, Bench, change_small_file, compile_package, empty_trees, journalled_fs, make_project,
    unmount)

TOOLS = ("new", "new-ssh", "base", "rsync")


def run(baseline: Path, repeats: int, full_repeats: int, shaped: bool, log=print) -> dict:
    from tests.harness.sshd import start_sshd

    for checkout in (baseline, HERE.parents[2]):  # both start from byte code, as installed
        compile_package(checkout)
    work = Path(tempfile.mkdtemp(prefix="remoteops-ab-"))
    work.chmod(0o755)
    server = shaper = None
    image, mounted = work / "server-fs.img", work / "server-fs"
    journalled = False
    try:
        info = make_project(work / "proj", *((200, 8, 16) if shaped else (2000, 40, 100)))
        # the server's trees on a journalled ext4 of their own, as bench-deploy puts them
        # (see Bench.reset), else beside the project with a wait after each delete
        size = info["text_bytes"] + info["blob_bytes"]
        journalled = journalled_fs(image, mounted, max(512, 8 * size >> 20), log)
        server = start_sshd(work / "sshd")
        seen = server
        if shaped:
            from tests.harness.shaper import ShapingProxy

            shaper = ShapingProxy((server.host, server.port), 100, 160)
            seen = dataclasses.replace(server, port=shaper.port)
        bench = Bench(work, seen, log, mounted if journalled else None)
        bench.trust()
        bench.reset()
        wrapper = work / "base-python"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={baseline} exec {sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        projects = {"new": bench.project}
        for tool in ("new-ssh", "base"):
            projects[tool] = work / f"proj-{tool}"
            shutil.copytree(bench.project, projects[tool], symlinks=True)
        roots = {tool: (mounted if journalled else work / "server") / tool for tool in TOOLS}

        def ours(tool: str) -> tuple[float, dict]:
            env = bench.env()
            if tool == "new-ssh":
                env["REMOTEOPS_SSH__CLIENT"] = "openssh"
            if tool == "base":
                env.update(PYTHONPATH=str(baseline), REMOTEOPS_REMOTE_PYTHON=str(wrapper))
            cmd = [sys.executable, "-m", "remoteops", "deploy-bundle", "--host", ALIAS,
                   "--project-root", str(roots[tool]), "--yes", "--json"]
            started = time.perf_counter()
            res = subprocess.run(cmd, cwd=projects[tool], env=env, capture_output=True,
                                 text=True, timeout=900)
            took = time.perf_counter() - started
            if (projects[tool] / "bundles").is_dir():  # a bundle written after the answer
                from remoteops.laptop.build import writer_lock

                writer_lock(projects[tool] / "bundles").close()
            if res.returncode:
                raise RuntimeError(f"{tool} failed: {res.stderr[-2000:]}")
            return took, json.loads(res.stdout)

        def rsync() -> tuple[float, dict]:
            started = time.perf_counter()
            subprocess.run(["rsync", "-az", "--delete", "-e", bench._ssh(),
                            "--exclude=/bundles/", "--exclude=/.remoteops/",
                            f"{bench.project}/", f"{ALIAS}:{roots['rsync']}/"],
                           check=True, capture_output=True, timeout=900)
            return time.perf_counter() - started, {}

        def call(tool: str) -> tuple[float, dict]:
            os.sync()  # untimed, as bench_deploy's ``mark``: a deploy's syncfs would also
            # write out what the tool before it left unwritten (rsync never syncs)
            return rsync() if tool == "rsync" else ours(tool)

        def order(i: int) -> list[str]:
            k = i % len(TOOLS)
            return list(TOOLS[k:] + TOOLS[:k])

        runs = {case: {tool: [] for tool in TOOLS} for case in ("full", "one_file", "noop")}
        loads = []
        for i in range(full_repeats):
            empty_trees(roots.values(), projects.values(), journalled)
            loads.append(os.getloadavg()[0])
            for tool in order(i):
                runs["full"][tool].append(call(tool)[0])
            log(f"full {i + 1}: " + ", ".join(f"{t} {v[-1]:.2f}s" for t, v in
                                               runs["full"].items()))
        time.sleep(3.5)  # past the caches' racy window, as any later redeploy is
        for i in range(repeats):
            for project in projects.values():
                change_small_file(project, i)
            loads.append(os.getloadavg()[0])
            for case, rotation in (("one_file", order(i)), ("noop", order(i + 1))):
                for tool in rotation:
                    seconds, out = call(tool)
                    if case == "noop" and tool != "rsync" and not out["noop"]:
                        raise RuntimeError(f"{tool}: the no-op redeploy was not a no-op")
                    runs[case][tool].append(seconds)
            log(f"round {i + 1}: " + "; ".join(
                f"{case} " + ", ".join(f"{t} {v[-1]:.2f}s" for t, v in runs[case].items())
                for case in ("one_file", "noop")))
        medians = {case: {t: round(statistics.median(v), 3) for t, v in tools.items()}
                   for case, tools in runs.items()}
        return {"shaped": shaped, "journalled": journalled, "medians": medians,
                "ratios": {case: {t: round(m[t] / m["rsync"], 2) for t in TOOLS}
                           for case, m in medians.items()},
                "load1": [round(min(loads), 2), round(max(loads), 2)], "runs": runs}
    finally:
        if shaper is not None:
            shaper.close()
        if server is not None:
            server.stop()
        if journalled:
            unmount(mounted, image, log)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, type=Path,
                        help="a checkout of the code to compare with (its repository root)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--full-repeats", type=int, default=3)
    parser.add_argument("--shaped", action="store_true",
                        help="100 ms round trip, 160 Mbit/s, 201 files (25 MB)")
    args = parser.parse_args(argv)
    if not (args.baseline / "remoteops" / "__init__.py").is_file():
        print(f"error: {args.baseline} is not a remoteops checkout (no remoteops/__init__.py); "
              "make one with: mkdir /tmp/base && git archive <commit> | tar -x -C /tmp/base",
              file=sys.stderr)
        return 2
    result = run(args.baseline.resolve(), args.repeats, args.full_repeats, args.shaped)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
