"""Built-in precheck checks: Python, packages, disk, RAM, project root, datasets.

Written as any third-party plugin would be: ``register_checks`` registers
``remoteops.Check`` instances; each probe runs under the server's plain
Python, so probes use only the standard library.
"""

from remoteops.api import Check, hookimpl


def _gb(n_bytes):
    return n_bytes / 1e9


class PythonCheck(Check):
    name = "python"
    probe = '''
def probe(ctx):
    import sys, platform
    return {"version": list(sys.version_info[:3]), "executable": sys.executable,
            "host": platform.node()}
'''

    def evaluate(self, value, settings):
        version = ".".join(str(v) for v in value["version"])
        need = tuple(int(x) for x in str(settings["precheck.min_python"]).split("."))
        shown = f"{version} ({value['executable']})"
        if tuple(value["version"][:len(need)]) < need:
            return self.fail(shown, f"remoteops needs Python >= {settings['precheck.min_python']}; "
                             "set remote_python to a newer interpreter")
        return self.ok(shown)


class PackagesCheck(Check):
    name = "packages"
    probe = '''
def probe(ctx):
    import importlib
    pre = ctx["settings"]["precheck"]
    out = {}
    for name in pre["required_packages"] + pre["optional_packages"]:
        try:
            module = importlib.import_module(name)
            out[name] = {"version": str(getattr(module, "__version__", "?"))}
        except BaseException as exc:
            out[name] = {"error": "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:160]
                                               if str(exc) else "")}
    return out
'''

    def evaluate(self, value, settings):
        required = set(settings["precheck.required_packages"])
        rows = []
        for pkg, info in value.items():
            row_name = f"package {pkg}"
            if "version" in info:
                rows.append(self.ok(info["version"], name=row_name))
            elif pkg in required:
                rows.append(self.fail(info["error"], f"install it in the server's Python: "
                                      f"{settings['remote_python']} -m pip install {pkg}",
                                      name=row_name))
            else:
                rows.append(self.warn(info["error"], f"optional; install {pkg} if you need it",
                                      name=row_name))
        return rows


class DiskCheck(Check):
    name = "disk"
    probe = '''
def probe(ctx):
    import os, shutil
    path = os.path.expanduser(ctx["project_root"])
    while not os.path.exists(path) and path not in ("", "/"):
        path = os.path.dirname(path)
    usage = shutil.disk_usage(path or "/")
    return {"path": path, "free": usage.free, "total": usage.total}
'''

    def evaluate(self, value, settings):
        need = float(settings["precheck.min_disk_gb"])
        free = _gb(value["free"])
        shown = f"{free:.1f} GB free of {_gb(value['total']):.0f} GB at {value['path']}"
        if free < need:
            return self.fail(shown, f"free at least {need:g} GB (precheck.min_disk_gb) for "
                             "checkpoints and adapters")
        return self.ok(shown)


class RamCheck(Check):
    name = "ram"
    probe = '''
def probe(ctx):
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, rest = line.split(":", 1)
            info[key] = int(rest.split()[0]) * 1024
    return {"total": info.get("MemTotal", 0), "available": info.get("MemAvailable", 0)}
'''

    def evaluate(self, value, settings):
        need = float(settings["precheck.min_ram_gb"])
        shown = f"{_gb(value['available']):.1f} GB available of {_gb(value['total']):.1f} GB"
        if _gb(value["total"]) < need:
            return self.warn(shown, f"less than {need:g} GB RAM (precheck.min_ram_gb); loading "
                             "a large base model may fail")
        return self.ok(shown)


class ProjectRootCheck(Check):
    name = "project root"
    probe = '''
def probe(ctx):
    import os, tempfile
    root = os.path.expanduser(ctx["project_root"])
    if not os.path.isdir(root):
        parent = root
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        return {"root": root, "exists": False, "creatable": os.access(parent or "/", os.W_OK)}
    try:
        fd, name = tempfile.mkstemp(dir=root, prefix=".remoteops-write-test-")
        os.close(fd)
        os.unlink(name)
        writable = True
    except OSError:
        writable = False
    return {"root": root, "exists": True, "writable": writable}
'''

    def evaluate(self, value, settings):
        root = value["root"]
        if value["exists"]:
            if value["writable"]:
                return self.ok(f"{root} (writable)")
            return self.fail(f"{root} is not writable", "log in as the user who owns it, or "
                             "set project_root to a writable folder")
        if value["creatable"]:
            return self.warn(f"{root} does not exist yet", "deploy-bundle will create it")
        return self.fail(f"{root} does not exist and cannot be created",
                         "create it on the server, or set project_root / --project-root")


class DatasetsCheck(Check):
    name = "datasets"
    probe = '''
def probe(ctx):
    import json, os
    root = os.path.expanduser(ctx["project_root"])
    out = {}
    for rel in ctx["datasets"]:
        path = rel if os.path.isabs(rel) else os.path.join(root, rel)
        if not os.path.isfile(path):
            out[rel] = {"missing": True}
            continue
        count, bad = 0, None
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError("a line must be a JSON object")
                    count += 1
                except ValueError as exc:
                    bad = {"line": lineno, "error": str(exc)[:160]}
                    break
        out[rel] = {"rows": count, "bad": bad}
    return out
'''

    def evaluate(self, value, settings):
        if not value:
            return self.skip("no datasets configured", "name them in [stages.<name>] dataset "
                             "or datasets = [...]")
        rows = []
        for rel, info in value.items():
            name = f"dataset {rel}"
            if info.get("missing"):
                rows.append(self.fail("missing", "deploy the project (invoke deploy-bundle) or "
                                      "fix the path in remoteops.toml", name=name))
            elif info["bad"]:
                rows.append(self.fail(f"{rel}:{info['bad']['line']}: {info['bad']['error']}",
                                      "fix that line: each line must be one JSON object",
                                      name=name))
            elif info["rows"] == 0:
                rows.append(self.fail("empty", "add samples to it", name=name))
            else:
                rows.append(self.ok(f"{info['rows']} rows", name=name))
        return rows


@hookimpl
def register_checks(register):
    for check in (PythonCheck, PackagesCheck, DiskCheck, RamCheck, ProjectRootCheck,
                  DatasetsCheck):
        register(check())
