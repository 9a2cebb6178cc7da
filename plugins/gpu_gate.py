"""The GPU gate: NVIDIA driver, CUDA through torch, and free VRAM.

Levels (setting ``gpu_gate`` or ``--gpu-gate``): ``strict`` (default) makes a
driver problem fail precheck; ``warn`` reports it as a warning and precheck
passes; ``off`` skips the gate.
"""

from remoteops.api import Check, hookimpl

PROBE = '''
def probe(ctx):
    import shutil, subprocess
    out = {"smi": None, "torch": None}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        out["smi"] = {"state": "missing"}
    else:
        try:
            proc = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,memory.free",
                                   "--format=csv,noheader,nounits"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=30)
            text = proc.stdout.decode("utf-8", "replace").strip()
            if proc.returncode != 0:
                out["smi"] = {"state": "error", "output": text[-300:]}
            else:
                gpus = [[c.strip() for c in line.split(",")] for line in text.splitlines() if line]
                out["smi"] = {"state": "ok", "gpus": gpus}
        except subprocess.TimeoutExpired:
            out["smi"] = {"state": "error", "output": "nvidia-smi hung for 30 s"}
    try:
        import torch
        info = {"available": bool(torch.cuda.is_available()), "cuda": torch.version.cuda}
        if info["available"]:
            info["devices"] = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                info["devices"].append([torch.cuda.get_device_name(i), free, total])
        out["torch"] = info
    except BaseException as exc:
        out["torch"] = {"error": "%s: %s" % (type(exc).__name__, exc)}
    return out
'''


class GpuGate(Check):
    name = "gpu gate"
    probe = PROBE

    def evaluate(self, value, settings):
        level = settings["gpu_gate"]
        if level == "off":
            return self.skip("gate off: GPU and driver not checked", "use --gpu-gate strict to "
                             "check them")
        problem = self.warn if level == "warn" else self.fail
        escape = "" if level == "warn" else ", or pass --gpu-gate warn to go on without a GPU"
        rows = [self._driver_row(value["smi"], problem, escape),
                self._cuda_row(value["torch"], problem, escape)]
        need = float(settings["precheck.min_vram_gb"])
        devices = (value["torch"] or {}).get("devices") or []
        if need > 0 and devices:
            free = max(d[1] for d in devices) / 1e9
            shown = f"{free:.1f} GB free on the emptiest GPU"
            rows.append(problem(shown, f"free GPU memory or lower precheck.min_vram_gb ({need:g})",
                                name="gpu vram") if free < need else self.ok(shown, name="gpu vram"))
        return rows

    def _driver_row(self, smi, problem, escape):
        hint = "install the NVIDIA driver on the server" + escape
        if smi["state"] == "missing":
            return problem("no NVIDIA driver: nvidia-smi not found", hint, name="gpu driver")
        if smi["state"] == "error":
            return problem(f"nvidia-smi failed: {smi['output']}", hint, name="gpu driver")
        gpus = smi["gpus"]
        names = ", ".join(sorted({g[0] for g in gpus}))
        return self.ok(f"driver {gpus[0][1]}: {len(gpus)}x {names}", name="gpu driver")

    def _cuda_row(self, info, problem, escape):
        if info is None or "error" in info:
            why = info["error"] if info else "torch not importable"
            return problem(f"cannot ask torch about CUDA ({why})", "install torch with CUDA "
                           "support in the server's Python" + escape, name="gpu cuda")
        if not info["available"]:
            return problem(f"torch sees no CUDA device (torch CUDA build: {info['cuda']})",
                           "install a CUDA build of torch that matches the driver" + escape,
                           name="gpu cuda")
        return self.ok(f"CUDA {info['cuda']}, {len(info['devices'])} device(s)", name="gpu cuda")


@hookimpl
def register_checks(register):
    register(GpuGate())
