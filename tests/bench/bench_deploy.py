"""Deploy benchmark: remoteops against ``rsync -az`` and ``scp -r`` over a real local sshd.

Builds a reference project in a temp folder (about 2,000 text files, ~40 MB
of code, docs, configs and JSONL data, plus one 100 MB incompressible file),
starts a throwaway sshd on 127.0.0.1 (root's login, so its ``~/.bashrc`` runs
as on a real server) and times, interleaved in the same run:

- a full deploy to an empty root (ours: bundle build included, as a user pays
  it; rsync; ``rsync --fsync``, which like ours has every file on disk when it ends;
  scp);
- a redeploy after changing one 10 KB file (ours; rsync);
- a no-op redeploy (ours; rsync).

Ours runs as a user runs it: ``python -m remoteops deploy-bundle --yes --json``
in the project folder. Each measurement is repeated and the median reported.
Loopback throughput is noisy: compare only figures of the same run.

    python -m tests.bench.bench_deploy [--repeats 3] [--json]

With ``--rtt-ms`` and/or ``--mbps`` every tool goes through a shaping proxy
(tests/harness/shaper.py) between the client and sshd: half the round trip added
each way, the bandwidth capped each way (megabits/s), and the bytes each way and
the round trips (client->server then server->client flips) counted per command:

    python -m tests.bench.bench_deploy --rtt-ms 100 --mbps 160 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness.install import ensure_tools  # noqa: E402

ALIAS = "benchbox"
SMALL = "src/pkg00/module_000.py"  # the 10 KB file the incremental case changes
SMALL_SIZE = 10 * 1024
BLOB = "data/blob.bin"

# after a reset on a file system without a journal, this long before the full deploys
# are timed (see ``Bench.reset``)
SETTLE_S = 31

TARGETS = {"full_vs_rsync": 1.0, "one_file_vs_rsync": 1.0, "noop_seconds": 1.0}


# -- the reference project -----------------------------------------------------------------

def _vocab(rng: random.Random, n: int = 6000) -> tuple[list[str], list[float]]:
    syll = ["ka", "lo", "ri", "ten", "mar", "sul", "vi", "on", "de", "tra", "pe", "qu",
            "in", "as", "el", "mo", "ne", "ra", "st", "ch", "ba", "go", "li", "um", "ex"]
    words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4)))
                    for _ in range(n * 2)})[:n]
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
    return words, weights


class _Text:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words, weights = _vocab(rng)
        self.cum = list(itertools.accumulate(weights))

    def w(self, k: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum, k=k)

    def sentence(self) -> str:
        ws = self.w(self.rng.randint(6, 22))
        return " ".join(ws).capitalize() + self.rng.choice([".", ".", ".", "?", "!"])

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(2, 7)))

    def ident(self) -> str:
        return "_".join(self.w(self.rng.randint(1, 3)))

    def code(self, size: int) -> str:
        rng, out, n = self.rng, [], 0
        imports = sorted({f"import {self.ident()}" for _ in range(rng.randint(2, 8))})
        out += ['"""' + self.sentence() + '"""', "", "from __future__ import annotations", "",
                *imports, "", ""]
        n = sum(len(l) + 1 for l in out)
        while n < size:
            if rng.random() < 0.25:
                block = [f"class {self.ident().title().replace('_', '')}:",
                         f'    """{self.sentence()}"""', ""]
            else:
                args = ", ".join(self.ident() for _ in range(rng.randint(0, 4)))
                block = [f"def {self.ident()}({args}):", f'    """{self.sentence()}"""']
                for _ in range(rng.randint(2, 12)):
                    kind = rng.random()
                    if kind < 0.4:
                        block.append(f"    {self.ident()} = {self.ident()}.{self.ident()}("
                                     f"{self.ident()}, {rng.randint(0, 4096)})")
                    elif kind < 0.6:
                        block.append(f"    if {self.ident()} is None or {self.ident()} > "
                                     f"{rng.randint(0, 99)}:")
                        block.append(f"        raise ValueError({self.sentence()!r})")
                    elif kind < 0.8:
                        block.append(f"    # {self.sentence()}")
                    else:
                        block.append(f"    for {self.ident()} in {self.ident()}:")
                        block.append(f"        {self.ident()}.append({self.ident()})")
                block.append(f"    return {self.ident()}")
                block += ["", ""]
            out += block
            n += sum(len(l) + 1 for l in block)
        return "\n".join(out) + "\n"

    def markdown(self, size: int) -> str:
        out, n = [f"# {' '.join(self.w(4)).title()}", ""], 0
        while n < size:
            part = (f"## {' '.join(self.w(3)).title()}\n\n" if self.rng.random() < 0.2 else "")
            part += self.paragraph() + "\n\n"
            out.append(part)
            n += len(part)
        return "\n".join(out)

    def jsonl(self, size: int) -> str:
        out, n = [], 0
        while n < size:
            line = json.dumps({"instruction": self.sentence(), "input": "",
                               "output": self.paragraph(),
                               "tags": self.w(self.rng.randint(1, 4))}, ensure_ascii=False)
            out.append(line)
            n += len(line) + 1
        return "\n".join(out) + "\n"

    def config(self, size: int) -> str:
        data, n = {}, 0
        while n < size:
            key = self.ident()
            data[key] = {"value": self.rng.random(), "enabled": self.rng.random() < 0.5,
                         "name": self.ident(), "items": self.w(self.rng.randint(1, 6))}
            n += 110
        return json.dumps(data, indent=2) + "\n"


def _fit(text: str, size: int) -> str:
    """``text`` cut or padded (with comment lines) to exactly ``size`` bytes."""
    data = text.encode()[:size]
    while len(data) < size:
        data += b"# " + b"pad " * 20 + b"\n"
    return data[:size - 1].decode(errors="ignore").ljust(size - 1, "#") + "\n"


def make_project(root: Path, files: int = 2000, text_mb: float = 40, blob_mb: int = 100,
                 seed: int = 1) -> dict:
    """Write the reference project; return its file count and bytes."""
    rng = random.Random(seed)
    gen = _Text(rng)
    budget = int(text_mb * 1_000_000)
    n_jsonl, n_md, n_json = max(1, files // 20), max(1, files // 7), max(1, files // 10)
    n_py = files - n_jsonl - n_md - n_json - 2  # README + the blob
    shares = {"py": 0.30, "md": 0.10, "json": 0.04, "jsonl": 0.56}
    written = 0

    def put(rel: str, text: str) -> None:
        nonlocal written
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written += len(text.encode())

    put("README.md", gen.markdown(4000))
    put(SMALL, _fit(gen.code(SMALL_SIZE + 2000), SMALL_SIZE))
    for i in range(1, n_py):
        size = int(rng.lognormvariate(0, 0.8) * budget * shares["py"] / n_py / 1.38)
        put(f"src/pkg{i // 40:02d}/module_{i:03d}.py", gen.code(max(300, size)))
    for i in range(n_md):
        size = int(rng.lognormvariate(0, 0.7) * budget * shares["md"] / n_md / 1.28)
        put(f"docs/section{i // 50}/page_{i:03d}.md", gen.markdown(max(300, size)))
    for i in range(n_json):
        size = int(rng.lognormvariate(0, 0.6) * budget * shares["json"] / n_json / 1.2)
        put(f"configs/exp_{i:03d}.json", gen.config(max(200, size)))
    remaining = max(budget - written, n_jsonl * 1000)
    for i in range(n_jsonl):
        put(f"data/train/part_{i:03d}.jsonl", gen.jsonl(remaining // n_jsonl))
    blob = root / BLOB
    with open(blob, "wb") as fh:
        brng = random.Random(seed + 1)
        for _ in range(blob_mb):
            fh.write(brng.randbytes(1 << 20))
    (root / "run.sh").write_text("#!/bin/sh\nexec python -m src.pkg00.module_000 \"$@\"\n")
    (root / "run.sh").chmod(0o755)
    count = sum(1 for p in root.rglob("*") if p.is_file())
    return {"files": count, "text_bytes": written, "blob_bytes": blob.stat().st_size,
            "total_bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file())}


def change_small_file(project: Path, round_no: int) -> None:
    """A new version of the 10 KB file (same size, a few lines differ)."""
    path = project / SMALL
    lines = path.read_text().splitlines(keepends=True)
    lines[5] = f"# edited in round {round_no}: {hashlib.sha256(str(round_no).encode()).hexdigest()}\n"
    path.write_text(_fit("".join(lines), SMALL_SIZE))


def tree_digest(root: Path, skip: tuple[str, ...] = (".remoteops/", "bundles/")) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -- the three tools -----------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, server, log=print, server_dir: Path | None = None):
        self.work, self.server, self.log = work, server, log
        # where the server's trees go: a journalled ext4 of its own when one could be
        # mounted (``journalled_fs``), else beside the project
        self.journalled = server_dir is not None
        self.shaper = None  # a ShapingProxy in front of sshd, when the link is shaped
        self.cold = False  # True: ours with [ssh] persist = 0 (a login per deploy)
        self.link_mark: dict | None = None
        self.project = work / "proj"
        self.home = work / "home"
        self.roots = {name: (server_dir or work / "server") / name
                      for name in ("ours", "rsync", "rsync-fs", "scp")}
        self.ssh_config = work / "ssh_config"
        (self.home / ".ssh").mkdir(parents=True)
        alias = (f"Host {ALIAS}\n  HostName {server.host}\n  Port {server.port}\n  User root\n"
                 f"  IdentityFile {server.client_key}\n")
        (self.home / ".ssh" / "config").write_text(alias)
        known = work / "known_hosts"
        known.write_text(server.known_hosts_line)
        self.ssh_config.write_text(alias + f"  IdentitiesOnly yes\n  BatchMode yes\n"
                                   f"  UserKnownHostsFile {known}\n"
                                   "  StrictHostKeyChecking yes\n")

    def trust(self) -> None:
        path = self.project / ".remoteops" / "known_hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.server.known_hosts_line)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REMOTEOPS_", "TRAIN_SYNC_", "SSH_AUTH_SOCK"))}
        env.update(HOME=str(self.home), REMOTEOPS_REMOTE_PYTHON=sys.executable, COLUMNS="200")
        if self.cold:  # every deploy logs in (no kept connection)
            env["REMOTEOPS_SSH__PERSIST"] = "0"
        return env

    def close_kept(self) -> None:
        """Close the kept connections our deploys left (this project's only)."""
        from remoteops.laptop.kept import close, running

        for row in running():
            if row.get("project") == str(self.project):
                close(row)

    def mark(self) -> None:
        """Just before a timed command starts: the data earlier commands wrote goes to disk
        first (untimed), and the shaper's counters are noted. rsync and scp never sync
        what they write, and a deploy makes its files durable (``syncfs``), which would
        otherwise also write out the previous tool's 145 MB in our time."""
        os.sync()
        self.link_mark = self.shaper.snapshot() if self.shaper else None

    def link_delta(self) -> dict | None:
        if self.shaper is None or self.link_mark is None:
            return None
        time.sleep(0.05)  # let the last delayed chunks be forwarded and counted
        return self.shaper.delta(self.link_mark, self.shaper.snapshot())

    def ours(self) -> tuple[float, int, dict]:
        cmd = [sys.executable, "-m", "remoteops", "deploy-bundle", "--host", ALIAS,
               "--project-root", str(self.roots["ours"]), "--yes", "--json"]
        before = self.server.log().count("Accepted publickey")
        self.mark()
        started = time.perf_counter()
        res = subprocess.run(cmd, cwd=self.project, env=self.env(), capture_output=True,
                             text=True, timeout=900)
        seconds = time.perf_counter() - started
        self.settle()
        if res.returncode != 0:
            raise RuntimeError(f"remoteops deploy failed ({res.returncode}):\n{res.stdout}\n"
                               f"{res.stderr}")
        out = json.loads(res.stdout)
        out["logins"] = self.server.log().count("Accepted publickey") - before
        return seconds, int(out["sent_bytes"]), out

    def settle(self) -> None:
        """Wait (untimed) for the bundle a redeploy writes after it answered, so that its CPU
        is not charged to the next tool measured."""
        from remoteops.laptop.build import writer_lock

        if (self.project / "bundles").is_dir():
            writer_lock(self.project / "bundles").close()

    def _ssh(self) -> str:
        return f"ssh -F {self.ssh_config}"

    def rsync(self, durable: bool = False) -> tuple[float, int, dict]:
        cmd = ["rsync", "-az", *(["--fsync"] if durable else []), "--delete", "--stats",
               "-e", self._ssh(), "--exclude=/bundles/", "--exclude=/.remoteops/",
               f"{self.project}/", f"{ALIAS}:{self.roots['rsync-fs' if durable else 'rsync']}/"]
        self.mark()
        started = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - started
        if res.returncode != 0:
            raise RuntimeError(f"rsync failed ({res.returncode}): {res.stderr}")
        sent = next(int(l.split(":")[1].split()[0].replace(",", ""))
                    for l in res.stdout.splitlines() if l.startswith("Total bytes sent"))
        return seconds, sent, {}

    def rsync_fs(self) -> tuple[float, int, dict]:
        """``rsync -az --fsync``: every file on disk before it ends, as ours (the full case
        only: a like-for-like durability figure beside the target's plain rsync)."""
        return self.rsync(durable=True)

    def scp(self) -> tuple[float, int, dict]:
        dest = self.roots["scp"]
        subprocess.run(["ssh", "-F", str(self.ssh_config), ALIAS, f"mkdir -p {dest}"],
                       check=True, capture_output=True)
        top = sorted(p for p in self.project.iterdir() if p.name not in ("bundles", ".remoteops"))
        cmd = ["scp", "-r", "-q", "-F", str(self.ssh_config), *map(str, top), f"{ALIAS}:{dest}/"]
        self.mark()
        started = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - started
        if res.returncode != 0:
            raise RuntimeError(f"scp failed ({res.returncode}): {res.stderr}")
        payload = sum(p.stat().st_size for t in top for p in ([t] if t.is_file() else
                                                              t.rglob("*")) if p.is_file())
        return seconds, payload, {}

    def reset(self) -> None:
        """An empty server, and no bundle built yet on the laptop.

        On an ext4 without a journal (this project's VMs), creating a file skips every
        inode freed in the last 30 s (in the last 330 s when its inode table block is
        dirty), one by one: the 6,000 files deleted here cost the next tools up to ~0.5 s
        each, rsync far more than ours, and most to whichever ran first. A journalled
        ext4, as on real servers, has no such check: the server's trees live on one when
        it can be mounted (``journalled_fs``); else the reset waits ``SETTLE_S``, which
        removes most of it (perf: ~1% of a full rsync's samples after the wait, ~15% of the
        machine's right after the delete)."""
        empty_trees(self.roots.values(), [self.project], self.journalled)


def empty_trees(roots, projects, journalled: bool) -> None:
    """Every server root empty and no project with a bundle, written out; then, on a file
    system without a journal, ``SETTLE_S`` (see ``Bench.reset``)."""
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    for project in projects:
        shutil.rmtree(project / "bundles", ignore_errors=True)
    os.sync()
    if not journalled:
        time.sleep(SETTLE_S)


def compile_package(checkout: Path = REPO) -> None:
    """``checkout``'s remoteops as byte code, as pip installs it (an editable checkout under
    PYTHONDONTWRITEBYTECODE=1 would compile every module on every run: ~60 ms a command)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "remoteops")],
                   capture_output=True, check=False)


def journalled_fs(image: Path, mountpoint: Path, size_mb: int, log=print) -> bool:
    """A journalled ext4 in ``image`` (sparse, ``size_mb``) mounted at ``mountpoint`` for the
    server's trees, as a real server has; False (nothing left behind) when this machine
    cannot (not root, no ``mkfs.ext4``, no loop device)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        return False
    try:
        with open(image, "wb") as fh:
            fh.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True,
                       capture_output=True, timeout=120)
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"(no journalled file system for the server's trees: {exc})")
        image.unlink(missing_ok=True)
        return False
    mountpoint.chmod(0o755)
    return True


def unmount(mountpoint: Path, image: Path, log=print) -> None:
    """Unmount the server's file system (lazily when it is still busy, e.g. a kept
    connection's agent in it: it goes once they end) and remove its image."""
    if subprocess.run(["umount", str(mountpoint)], capture_output=True,
                      timeout=120).returncode != 0:
        res = subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            log(f"(could not unmount {mountpoint}: {res.stderr.strip()}; unmount it by hand)")
    image.unlink(missing_ok=True)


def _zstd_size(data: bytes, level: int = 3) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(data))


def _median_row(samples: list[tuple[float, int]]) -> dict:
    times = [s for s, _ in samples]
    sent = [b for _, b in samples]
    return {"median_s": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times],
            "median_bytes": int(statistics.median(sent)), "bytes": sent}


def _link_row(samples: list[dict]) -> dict:
    return {k: int(statistics.median(s[k] for s in samples)) for k in samples[0]}


def run_bench(repeats: int = 3, files: int = 2000, text_mb: float = 40, blob_mb: int = 100,
              keep: bool = False, log=print, rtt_ms: float | None = None,
              mbps: float | None = None, cold: bool = False) -> dict:
    """Run every measurement ``repeats`` times (interleaved); return the results dict.
    With ``rtt_ms`` or ``mbps`` every tool goes through a shaping proxy in front of sshd."""
    from tests.harness.sshd import start_sshd

    compile_package()  # ours starts from byte code, as installed
    work = Path(tempfile.mkdtemp(prefix="remoteops-bench-"))
    work.chmod(0o755)
    server = shaper = bench = None
    shaped = rtt_ms is not None or mbps is not None
    image, mounted = work / "server-fs.img", work / "server-fs"
    journalled = False
    try:
        started = time.perf_counter()
        info = make_project(work / "proj", files, text_mb, blob_mb)
        log(f"reference project: {info['files']} files, {info['text_bytes'] / 1e6:.1f} MB text "
            f"+ {info['blob_bytes'] / 1e6:.0f} MB incompressible "
            f"(made in {time.perf_counter() - started:.1f}s) in {work}")
        size = info["text_bytes"] + info["blob_bytes"]
        journalled = journalled_fs(image, mounted, max(512, 8 * size >> 20), log)
        log("server trees: " + ("a journalled ext4 of their own (loop-mounted), as on a real "
                                "server" if journalled else
                                f"beside the project, {SETTLE_S} s after each reset"))
        server = start_sshd(work / "sshd")
        target = server
        if shaped:
            from tests.harness.shaper import ShapingProxy

            shaper = ShapingProxy((server.host, server.port), rtt_ms or 0, mbps)
            # the same sshd seen at the shaper's port (known_hosts names host:port)
            target = dataclasses.replace(server, port=shaper.port)
            log(f"shaped link: {rtt_ms or 0:g} ms round trip, "
                f"{f'{mbps:g} Mbit/s' if mbps else 'no bandwidth cap'} each way, "
                f"via 127.0.0.1:{shaper.port}")
        bench = Bench(work, target, log, mounted if journalled else None)
        bench.shaper = shaper
        bench.cold = cold
        log("ours: " + ("a login per deploy ([ssh] persist = 0)" if cold else
                        "the default: later deploys go through the kept connection the first "
                        "one leaves ([ssh] persist)"))
        bench.trust()
        samples: dict[str, dict[str, list]] = {"full": {}, "one_file": {}, "noop": {}}
        extra: dict = {"full_upload_bytes": [], "one_file_manifest_bytes": []}
        link: dict[str, dict[str, list]] = {"full": {}, "one_file": {}, "noop": {}}

        def record(case: str, tool: str, result: tuple) -> None:
            seconds, sent, _ = result
            samples[case].setdefault(tool, []).append((seconds, sent))
            wire = bench.link_delta()
            tail = ""
            if wire is not None:
                link[case].setdefault(tool, []).append(wire)
                tail = (f"  wire {wire['bytes_up'] / 1e6:.3f} MB up "
                        f"{wire['bytes_down'] / 1e6:.3f} MB down, "
                        f"{wire['round_trips']} round trips, {wire['connections']} conn")
            if "logins" in result[2]:  # ours: did it log in, or go through the kept connection
                tail += f"  ({result[2]['logins']} login{'s' * (result[2]['logins'] != 1)})"
            log(f"  {case:8s} {tool:8s} {seconds:7.3f}s  {sent / 1e6:10.3f} MB sent{tail}")

        def rotate(i: int, tools: list) -> list:
            return tools[i % len(tools):] + tools[:i % len(tools)]

        for i in range(repeats):
            log(f"round {i + 1}/{repeats}")
            bench.reset()
            for tool in rotate(i, ["ours", "rsync", "rsync-fs", "scp"]):
                result = getattr(bench, tool.replace("-", "_"))()
                record("full", tool, result)
            change_small_file(bench.project, i)
            for tool in rotate(i, ["ours", "rsync"]):
                result = getattr(bench, tool)()
                record("one_file", tool, result)
                if tool == "ours":
                    manifest = next(iter(sorted((bench.project / "bundles").glob(
                        f"*-v{result[2]['version']}.manifest.json"))))
                    extra["one_file_manifest_bytes"].append(manifest.stat().st_size)
                    if result[2]["plan"]["changed"] != [SMALL]:
                        raise RuntimeError(f"unexpected plan: {result[2]['plan']}")
            for tool in rotate(i, ["ours", "rsync"]):
                result = getattr(bench, tool)()
                record("noop", tool, result)
                if tool == "ours" and not result[2]["noop"]:
                    raise RuntimeError("the no-op redeploy was not a no-op")
        want = tree_digest(bench.project)
        for name in ("ours", "rsync"):
            if tree_digest(bench.roots[name]) != want:
                raise RuntimeError(f"the {name} server tree differs from the project")

        small = (bench.project / SMALL).read_bytes()
        small_z = _zstd_size(small)
        manifest_bytes = int(statistics.median(extra["one_file_manifest_bytes"]))
        rows = {case: {tool: _median_row(s) for tool, s in tools.items()}
                for case, tools in samples.items()}
        ratios = {case: {"time": round(rows[case]["ours"]["median_s"]
                                       / rows[case]["rsync"]["median_s"], 3),
                         "bytes": round(rows[case]["ours"]["median_bytes"]
                                        / max(1, rows[case]["rsync"]["median_bytes"]), 3)}
                  for case in rows}
        byte_budget = 2 * small_z + manifest_bytes
        targets = {
            "full_deploy_le_1x_rsync": ratios["full"]["time"] <= TARGETS["full_vs_rsync"],
            "one_file_le_1x_rsync": ratios["one_file"]["time"] <= TARGETS["one_file_vs_rsync"],
            "one_file_bytes_le_budget": rows["one_file"]["ours"]["median_bytes"] <= byte_budget,
            "one_file_bytes_le_rsync": ratios["one_file"]["bytes"] <= 1.0,
            "noop_le_1x_rsync": ratios["noop"]["time"] <= 1.0,
            "noop_under_1s": rows["noop"]["ours"]["median_s"] < TARGETS["noop_seconds"],
        }
        out = {"repeats": repeats, "project": info, "kept_connection": not cold, "rows": rows,
                "ratios": ratios,
                "one_file": {"path": SMALL, "size": len(small), "zstd_bytes": small_z,
                             "manifest_bytes": manifest_bytes, "byte_budget": byte_budget},
                "targets": targets, "work": str(work) if keep else None,
                "journalled": journalled,
                "rsync": subprocess.run(["rsync", "--version"], capture_output=True,
                                        text=True).stdout.split("\n")[0]}
        if shaped:
            out["link"] = {"rtt_ms": rtt_ms or 0, "mbps": mbps,
                           "rows": {case: {tool: _link_row(s) for tool, s in tools.items()}
                                    for case, tools in link.items()}}
        return out
    finally:
        if bench is not None and not cold:
            bench.close_kept()
        if shaper is not None:
            shaper.close()
        if server is not None:
            server.stop()
        if journalled:
            unmount(mounted, image, log)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    lines = [f"deploy benchmark: medians of {result['repeats']} interleaved runs "
             f"({result['project']['files']} files, {result['project']['total_bytes'] / 1e6:.0f}"
             f" MB; {result['rsync']}; ours " + ("with the kept connection"
                                                 if result["kept_connection"]
                                                 else "logging in each time") + "; server "
             + ("trees on a journalled ext4" if result.get("journalled") else
                f"trees beside the project, {SETTLE_S} s after each reset") + ")",
             f"{'case':10s} {'tool':8s} {'median s':>9s} {'sent MB':>10s}   runs (s)"]
    for case, tools in result["rows"].items():
        for tool, row in tools.items():
            lines.append(f"{case:10s} {tool:8s} {row['median_s']:9.3f} "
                         f"{row['median_bytes'] / 1e6:10.3f}   "
                         + " ".join(f"{t:.2f}" for t in row["times_s"]))
    lines.append("ours/rsync: " + ", ".join(
        f"{case} time {r['time']:.2f}x bytes {r['bytes']:.2f}x"
        for case, r in result["ratios"].items()))
    full = result["rows"]["full"]
    if "rsync-fs" in full:
        lines.append(f"ours/rsync --fsync (every file on disk at the end, as ours): full time "
                     f"{full['ours']['median_s'] / full['rsync-fs']['median_s']:.2f}x")
    one = result["one_file"]
    lines.append(f"one-file byte budget: 2 x {one['zstd_bytes']} (zstd of the 10 KB file) + "
                 f"{one['manifest_bytes']} (manifest) = {one['byte_budget']}; ours sent "
                 f"{result['rows']['one_file']['ours']['median_bytes']}")
    if result.get("link"):
        lines += render_link(result)
    lines.append("targets: " + ", ".join(f"{k} {'MET' if v else 'MISSED'}"
                                         for k, v in result["targets"].items()))
    return "\n".join(lines)


def render_link(result: dict) -> list[str]:
    """A table per case over the shaped link: seconds, bytes, round trips, ours/rsync."""
    link = result["link"]
    cap = f"{link['mbps']:g} Mbit/s" if link["mbps"] else "no cap"
    lines = [f"shaped link: {link['rtt_ms']:g} ms round trip, {cap} each way "
             "(wire = bytes through the proxy; round trips = client->server then "
             "server->client flips, ssh handshake included)"]
    for case, tools in result["rows"].items():
        rsync_s = tools["rsync"]["median_s"]
        lines.append(f"  {case}: {'tool':8s} {'seconds':>8s} {'sent MB':>9s} {'wire up MB':>11s} "
                     f"{'wire down MB':>13s} {'round trips':>12s} {'conns':>6s} {'/rsync':>7s}")
        for tool, row in tools.items():
            wire = link["rows"][case][tool]
            lines.append(f"  {'':{len(case)}s}  {tool:8s} {row['median_s']:8.3f} "
                         f"{row['median_bytes'] / 1e6:9.3f} {wire['bytes_up'] / 1e6:11.3f} "
                         f"{wire['bytes_down'] / 1e6:13.3f} {wire['round_trips']:12d} "
                         f"{wire['connections']:6d} {row['median_s'] / rsync_s:6.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--text-mb", type=float, default=40)
    parser.add_argument("--blob-mb", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rtt-ms", type=float, default=None,
                        help="shape the link: this round trip (half each way) via a proxy")
    parser.add_argument("--mbps", type=float, default=None,
                        help="shape the link: cap each direction at this many megabits/s")
    parser.add_argument("--cold", action="store_true",
                        help="ours logs in for every deploy ([ssh] persist = 0)")
    args = parser.parse_args(argv)
    ensure_tools("sshd", "ssh", "scp", "ssh-keygen", "rsync")  # or stop with one line
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    result = run_bench(args.repeats, args.files, args.text_mb, args.blob_mb, args.keep, log,
                       rtt_ms=args.rtt_ms, mbps=args.mbps, cold=args.cold)
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
