"""Developer tasks for remoteops itself, on top of every user-facing task."""

import shlex
import sys

from invoke import task

from remoteops.tasks import make_namespace

ns = make_namespace()


@task(help={"k": "only tests matching this expression (pytest -k)",
            "x": "stop at the first failure"})
def test(c, k=None, x=False):
    """Run the whole test suite (installs openssh-server first when sshd is missing)."""
    from tests.harness.install import ensure_sshd

    ensure_sshd()
    args = [sys.executable, "-m", "pytest", "-q"]
    args += ["-k", k] if k else []
    args += ["-x"] if x else []
    # the quantization tests run, not skip: the test command installs the [quant] extra
    c.run(shlex.join(args), pty=False, env={"PYTHONUNBUFFERED": "1", "CI_REQUIRE_QUANT": "1"})


ns.add_task(test)


@task
def bench_deploy(c, repeats=3):
    """Benchmark deploys against rsync and scp over a real local sshd (prints ratios)."""
    from tests.bench.bench_deploy import main

    main(["--repeats", str(repeats)])


@task
def bench_trainer(c, steps=40, repeats=3):
    """Benchmark our trainer against a plain transformers.Trainer (step-time ratio)."""
    import json

    from remoteops.trainer.bench import run_bench

    print(json.dumps(run_bench(steps=steps, repeats=repeats), indent=2))


@task
def bench_pipeline(c):
    """Benchmark pipeline overhead per stage and `invoke status` over a slow login shell."""
    from tests.bench.bench_pipeline import main

    main([])


for _t in (bench_deploy, bench_trainer, bench_pipeline):
    ns.add_task(_t)
