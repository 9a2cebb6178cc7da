"""Developer tasks for remoteops itself, on top of every user-facing task."""

import shlex
import sys

from invoke import task

from remoteops.laptop.tasks import make_namespace

ns = make_namespace()


LATEST_VENV = ".venv-latest"


@task(help={"k": "only tests matching this expression (pytest -k)",
            "x": "stop at the first failure",
            "workers": "test processes (pytest-xdist, one test file each at a time; default 2: "
                       "the tests wait on real servers and processes more than they compute); "
                       "1 runs them in this process",
            "latest": "run against the newest releases (a separate .venv-latest, no "
                      "constraints) to see upstream drift on purpose"})
def test(c, k=None, x=False, latest=False, workers=2):
    """Run the whole test suite (installs openssh-server, rsync, strace and Slurm (slurmctld,
    slurmd, slurm-client, munge) first when missing)."""
    from tests.harness.install import ensure_sshd

    ensure_sshd()
    python = sys.executable
    if latest:
        python = _latest_env(c)
    args = [python, "-m", "pytest", "-q", "--durations=15"]  # the slowest, to keep CI short
    if int(workers) > 1:  # a file's tests stay together (its module fixtures, its order)
        args += ["-n", str(int(workers)), "--dist", "loadfile"]
    args += ["-k", k] if k else []
    args += ["-x"] if x else []
    # the quantization tests run, not skip: the test command installs the [quant] extra
    c.run(shlex.join(args), pty=False, env={"PYTHONUNBUFFERED": "1", "CI_REQUIRE_QUANT": "1"})


def _pins(text: str) -> dict[str, str]:
    """name -> version of each ``name==version`` line (local labels like +cpu dropped)."""
    return {n.strip().lower().replace("_", "-"): v.split("+")[0].strip()
            for n, _, v in (l.split("#")[0].partition("==") for l in text.splitlines()) if v}


def _moved_pins(constraints: str, frozen: str) -> list[str]:
    pinned, now = _pins(constraints), _pins(frozen)
    return [f"{n} {pinned[n]} -> {v}" for n, v in sorted(now.items())
            if n in pinned and pinned[n] != v]


def _latest_env(c) -> str:
    """Build .venv-latest with the newest releases the ranges in pyproject.toml allow."""
    from pathlib import Path

    venv = Path(LATEST_VENV)
    if not venv.exists():
        c.run(shlex.join([sys.executable, "-m", "venv", str(venv)]))
    pip = str(venv / "bin" / "pip")
    # torch stays at the CPU build on disk; everything else goes to its newest release
    c.run(shlex.join([pip, "install", "-q", "--upgrade", "--upgrade-strategy", "eager",
                      "torch==2.13.0", "-e", ".[train,quant,serve,dev]"]))
    frozen = c.run(shlex.join([str(venv / "bin" / "python"), "-m", "pip", "freeze",
                               "--exclude-editable"]), hide=True).stdout
    changed = _moved_pins(Path("constraints.txt").read_text(), frozen)
    print("newer than constraints.txt: " + (", ".join(changed) if changed else "nothing"))
    return str(venv / "bin" / "python")


ns.add_task(test)


@task(help={"rtt_ms": "shape the link through a proxy: this round trip (half each way)",
            "mbps": "shape the link through a proxy: this many megabits/s each way",
            "files": "files in the reference project (default 2000)",
            "text_mb": "MB of text in it (default 40)",
            "blob_mb": "MB of the incompressible file (default 100)",
            "cold": "ours logs in for every deploy (no kept connection, [ssh] persist = 0)"})
def bench_deploy(c, repeats=3, rtt_ms=None, mbps=None, files=None, text_mb=None, blob_mb=None,
                 cold=False):
    """Benchmark deploys against rsync and scp over a real local sshd (prints ratios);
    --rtt-ms/--mbps run them through a shaped link and add round trips per deploy."""
    from tests.bench.bench_deploy import main

    args = ["--repeats", str(repeats)] + (["--cold"] if cold else [])
    for flag, value in (("--rtt-ms", rtt_ms), ("--mbps", mbps), ("--files", files),
                        ("--text-mb", text_mb), ("--blob-mb", blob_mb)):
        args += [flag, str(value)] if value is not None else []
    main(args)


@task
def bench_trainer(c, steps=40, repeats=3):
    """Benchmark our trainer against a plain transformers.Trainer (step-time ratio)."""
    import json

    from tests.bench.bench_trainer import run_bench

    print(json.dumps(run_bench(steps=steps, repeats=repeats), indent=2))


@task
def bench_qlora(c, steps=30, repeats=2, end_to_end=False):
    """QLoRA on a CUDA GPU: tokens/s of our trainer against a plain HF 4-bit run."""
    from tests.bench.bench_qlora import main

    main(["--steps", str(steps), "--repeats", str(repeats)]
         + (["--end-to-end"] if end_to_end else []))


@task
def bench_pipeline(c):
    """Benchmark pipeline overhead per stage and `invoke status` over a slow login shell."""
    from tests.bench.bench_pipeline import main

    main([])


@task(help={"nproc": "torchrun ranks", "work": "seconds the program works",
            "repeats": "runs of each way (medians)",
            "only": "rows to run, comma-separated (default: all)"})
def bench_executors(c, nproc=2, work=2.0, repeats=3, only=""):
    """Benchmark what a stage's executor adds over the same command bare (torchrun, process,
    slurm: against `sbatch --wait`; a 3-stage Slurm chain against a hand-made afterok chain)."""
    from tests.bench.bench_executors import main

    main(["--nproc", str(nproc), "--work", str(work), "--repeats", str(repeats),
          "--only", only])


@task(help={"model": "a Hugging Face model folder (default: the tiny demo model)",
            "adapter": "a peft adapter for --model (default: a random LoRA)",
            "gguf": "a GGUF file (default: made from the merged model)",
            "tokens": "tokens per answer", "repeats": "requests per server"})
def bench_serve(c, model=None, adapter=None, gguf=None, tokens=64, repeats=3):
    """Benchmark serving: first-token latency and tokens/s, adapter server vs GGUF q4_k_m."""
    from tests.bench.bench_serve import main

    args = ["--tokens", str(tokens), "--repeats", str(repeats)]
    for flag, value in (("--model", model), ("--adapter", adapter), ("--gguf", gguf)):
        args += [flag, value] if value else []
    main(args)


@task(help={"samples": "samples for the throughput run", "scp_samples": "how many of them "
            "the scp loop sends (scaled to all)", "live_samples": "samples for the latency runs"})
def bench_sync(c, samples=1000, scp_samples=100, live_samples=40):
    """Benchmark sync-data against an scp loop: throughput, and latency to the server."""
    from tests.bench.bench_sync import main

    main(["--samples", str(samples), "--scp-samples", str(scp_samples),
          "--live-samples", str(live_samples)])


for _t in (bench_deploy, bench_trainer, bench_qlora, bench_pipeline, bench_executors,
           bench_serve, bench_sync):
    ns.add_task(_t)
