"""The base model: is ``train.base_model`` on the server, complete, and is there room for it?

- a folder: config.json, weights (every shard that ``model.safetensors.index.json`` names,
  no truncated .safetensors) and tokenizer files;
- a Hugging Face or ModelScope id: in the server's cache (complete, as above), or else the
  configured hub or mirror (``HF_ENDPOINT``, ``MODELSCOPE_DOMAIN``) answers a short request
  for it (``[plugins.base_model] timeout_seconds``, default 5);
- the disk where it goes holds what is still to be fetched (the size from the hub's file
  list, or from the laptop's copy).

Each failure says in one line what to do, usually ``invoke fetch-model --host H`` (download
on the server) or ``invoke fetch-model --host H --from-laptop`` (upload this laptop's copy).
Every distinct model that the planned training stages use is checked once: the top-level
one, and a stage's own (``[stages.X.train] base_model``), whose rows name the stage(s).
Skipped when no stage uses the built-in trainer. The probe carries
``remoteops/common/model_ref.py``'s source: the server's plain Python runs it.
"""

import inspect
import os

from remoteops.api import Check, hookimpl, human_size, model_ref

PROBE = inspect.getsource(model_ref) + r'''

def _training_stages(settings):
    """The stages that train with the built-in trainer: those of pipeline.stages (the plan;
    sample not when skip_sample is set), else any other [stages.X] (run with --stages X)."""
    tables = settings.get("stages") or {}
    planned = list((settings.get("pipeline") or {}).get("stages") or [])

    def trains(name):
        table = tables.get(name) or {}
        if not isinstance(table, dict):
            return False
        kind = table.get("kind") or (name if name in ("precheck", "collect") else (
            "command" if table.get("command") else "train"))
        return kind == "train" and bool(table.get("dataset"))

    names = [n for n in dict.fromkeys(planned) if trains(n)
             and not (n == "sample" and settings.get("skip_sample"))]
    return names or [n for n in tables if n not in planned and trains(n)]


def _models(settings):
    """Each distinct base model the training stages use, once: (text, [stages], top-level?)."""
    top = (settings.get("train") or {}).get("base_model")
    out = {}
    for name in _training_stages(settings):
        table = (settings.get("stages") or {}).get(name) or {}
        own = (table.get("train") or {}).get("base_model") if isinstance(
            table.get("train"), dict) else None
        text = own if own is not None else top
        try:
            ref = parse(text)
            key = (ref.kind, ref.name, ref.revision, ref.ambiguous)
        except ValueError:
            key = ("?", str(text))
        entry = out.setdefault(key, [text, [], False])
        entry[1].append(name)
        entry[2] = entry[2] or own is None or own == top
    return list(out.values())


def _free(path):
    import shutil
    where = nearest_existing(path)
    return {"path": where, "bytes": shutil.disk_usage(where).free}


def _request(url, timeout, token=None, method="HEAD"):
    """(status, body or None); 3xx counts as an answer (the file is elsewhere, a CDN)."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "remoteops-precheck"})
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, (resp.read(8 << 20) if method == "GET" else None)
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _ask_hub(ref, env, timeout):
    import urllib.parse
    endpoint = hub_endpoint(ref, env)
    out = {"endpoint": endpoint, "state": "unreachable", "detail": "", "bytes": None}
    if ref.kind == "hf" and hf_offline(env):
        out.update(state="offline", detail="HF_HUB_OFFLINE is set")
        return out
    quoted = urllib.parse.quote(ref.revision or "main", safe="")
    token = hf_token(env) if ref.kind == "hf" else None
    if ref.kind == "hf":
        url = "%s/%s/resolve/%s/config.json" % (endpoint, ref.name, quoted)
    else:
        url = "%s/api/v1/models/%s" % (endpoint, ref.name)
    try:
        status, _ = _request(url, timeout, token)
    except Exception as exc:  # refused, timeout, DNS, TLS: all mean "cannot reach it"
        reason = getattr(exc, "reason", exc)
        out["detail"] = ("%s: %s" % (type(reason).__name__, reason))[:200]
        return out
    if status < 400:
        out["state"] = "exists"
    elif status in (401, 403):
        out["state"] = "refused"
    elif status == 404:
        out["state"] = "missing"
    else:
        out["detail"] = "HTTP %s" % status
        return out
    out["status"] = status
    if out["state"] == "exists":
        try:
            if ref.kind == "hf":
                status, body = _request("%s/api/models/%s/revision/%s?blobs=true" % (
                    endpoint, ref.name, quoted), timeout, token, "GET")
                files = {s["rfilename"]: int(s.get("size") or 0)
                         for s in json.loads(body)["siblings"]}
            else:
                status, body = _request("%s/api/v1/models/%s/repo/files?Revision=%s&Recursive="
                                        "true" % (endpoint, ref.name, quoted), timeout, None,
                                        "GET")
                files = {f["Path"]: int(f.get("Size") or 0)
                         for f in json.loads(body)["Data"]["Files"] if f.get("Type") != "tree"}
            out["bytes"] = sum(files[n] for n in hub_selected(files))
        except Exception:
            pass  # the size is a bonus; the hub answered
    return out


def probe(ctx):
    settings = ctx["settings"]
    models = _models(settings)
    out = {"target": ctx.get("target") or "", "target_kind": ctx.get("target_kind"),
           "used": bool(models), "models": []}
    for text, stages, top in models:
        one = _probe_one(ctx, settings, text)
        one.update(stages=stages, top=top)
        out["models"].append(one)
    return out


def _probe_one(ctx, settings, text):
    env = os.environ
    opts = (settings.get("plugins") or {}).get("base_model") or {}
    out = {}
    try:
        ref = parse(text)
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    root = os.path.expanduser(ctx["project_root"])
    out.update(text=ref.text, kind=ref.kind, id=ref.name, revision=ref.revision,
               ambiguous=ref.ambiguous)
    if ref.kind == "local" or ref.ambiguous:
        folder = local_folder(ref.as_local(), root)
        out["local"] = inspect_folder(folder)
        out["free_folder"] = _free(folder)
        if out["local"]["exists"] or not ref.ambiguous:
            out["kind"] = "local"
            return out
    cached = cache_folder(ref, env)
    out["cache_root"] = hf_hub_cache(env) if ref.kind == "hf" else modelscope_cache(env)
    if cached:
        out["cache"] = inspect_folder(cached)
        if not out["cache"]["problems"]:
            return out
    out["hub"] = _ask_hub(ref, env, float(opts.get("timeout_seconds", 5)))
    out["free_cache"] = _free(out["cache_root"])
    return out
'''


class BaseModelCheck(Check):
    name = "base model"
    probe = PROBE

    def evaluate(self, value, settings):
        if not value.get("used"):
            return self.skip("no stage uses the built-in trainer", "train.base_model is read "
                             "by training stages ([stages.NAME] dataset = ...)")
        rows = []
        for model in value.get("models") or []:
            one = self._evaluate_one({**value, **model}, settings)
            one = one if isinstance(one, list) else [one]
            if not model.get("top"):  # a stage's own model: the rows name its stage(s)
                setting = ", ".join(f"[stages.{n}.train]" for n in model["stages"])
                for row in one:
                    row.name += f" ({', '.join(model['stages'])})"
                    row.hint = row.hint.replace("train.base_model", f"{setting} base_model")
            rows += one
        return rows

    def _evaluate_one(self, value, settings):
        if value.get("error"):
            return self.fail(value["error"], "fix train.base_model in remoteops.toml")
        host = value.get("target") or "H"
        fetch = f"invoke fetch-model --host {host}"
        laptop = self._laptop_copy(value, settings)
        upload = (f"run `{fetch} --from-laptop` to upload this laptop's copy "
                  f"({human_size(laptop['bytes'])}; remote-train does it by itself)"
                  if laptop else None)
        if value["kind"] == "local" or (value.get("ambiguous") and not value.get("cache") and
                                        laptop and laptop.get("folder")):
            return self._local(value, upload, laptop)  # a folder here: a folder there too
        return self._hub(value, settings, fetch, upload, laptop)

    @staticmethod
    def _laptop_copy(value, settings):
        """This machine's complete copy, when it is not the server's own folder."""
        try:
            ref = model_ref.parse(value["text"])
        except ValueError:
            return None
        project = str(settings.project_dir)
        if value["kind"] == "local" or value.get("ambiguous"):
            folder = model_ref.local_folder(ref.as_local(), project)
            server = (value.get("local") or {}).get("path")
            if folder != server and os.path.isdir(folder):
                report = model_ref.inspect_folder(folder)
                return {**report, "folder": True} if not report["problems"] else None
        if ref.hub and value["kind"] != "local":
            folder = model_ref.cache_folder(ref, os.environ)
            server = (value.get("cache") or {}).get("path")
            if folder and folder != server:
                report = model_ref.inspect_folder(folder)
                return report if not report["problems"] else None
        return None

    def _disk(self, value, need, what, where="free_cache"):
        free = value.get(where)
        if not need or not free:
            return None
        shown = f"{what} needs {human_size(need)}; {human_size(free['bytes'])} free at {free['path']}"
        if free["bytes"] < need * 1.02 + (64 << 20):
            return self.fail(shown, "free space there (or point HF_HOME / the folder at a larger "
                             "disk), then run precheck again", name="base model disk")
        return self.ok(shown, name="base model disk")

    def _local(self, value, upload, laptop):
        report = value["local"]
        path, text = report["path"], value["text"]
        if not report["problems"]:
            return self.ok(f"{text}: {path} ({report['files']} files, "
                           f"{human_size(report['bytes'])})")
        rows = []
        if not report["exists"]:
            rows.append(self.fail(
                f"{text} is not on the server (no folder {path})",
                upload or "fix train.base_model: a folder on the server, a Hugging Face id "
                "(org/name) or modelscope:org/name; for the demo, remoteops-agent "
                "make-demo-model builds it there"))
        else:
            rows.append(self.fail(
                f"{text} on the server is incomplete: {'; '.join(report['problems'])}",
                upload or f"copy the missing files into {path}, or point train.base_model at "
                "a complete model folder"))
        if laptop:
            disk = self._disk(value, max(laptop["bytes"] - report["bytes"], 0), "the upload",
                              "free_folder")
            if disk:
                rows.append(disk)
        return rows

    def _hub(self, value, settings, fetch, upload, laptop):
        ident, hub = value["id"], value.get("hub") or {}
        where = "Hugging Face" if value["kind"] == "hf" else "ModelScope"
        cache = value.get("cache")
        if cache and not cache["problems"]:
            return self.ok(f"{ident} in the server's {where} cache: {cache['path']} "
                           f"({cache['files']} files, {human_size(cache['bytes'])})")
        endpoint = hub.get("endpoint", "the hub")
        absent = (f"{ident} in the server's {where} cache is incomplete "
                  f"({'; '.join(cache['problems'])})" if cache else
                  f"{ident} is not in the server's {where} cache")
        variable = "HF_ENDPOINT" if value["kind"] == "hf" else "MODELSCOPE_DOMAIN"
        mirror = " (e.g. https://hf-mirror.com)" if value["kind"] == "hf" else ""
        offline_fix = upload or (f"set {variable} on the server to a mirror it reaches{mirror}"
                                 + ("" if value.get("target_kind") == "local" else
                                    f", or download {ident} on this laptop and run "
                                    f"`{fetch} --from-laptop`"))
        state = hub.get("state")
        if state == "exists":
            size = f" ({human_size(hub['bytes'])})" if hub.get("bytes") else ""
            rows = [self.warn(f"{absent}; {endpoint} has it{size}; the first training stage "
                              "downloads it",
                              f"run `{fetch}` to download it now (resumable, verified)")]
            need = (hub.get("bytes") or 0) - (cache["bytes"] if cache else 0)
            disk = self._disk(value, max(need, 0), "the download")
            return rows + ([disk] if disk else [])
        detail = hub.get("detail") or "no answer"
        first = value["text"].split("/")[0]
        if value.get("ambiguous") and not cache and not laptop and os.path.isdir(
                os.path.join(str(settings.project_dir), first)):  # a folder, or a hub id?
            folder = f"{value['text']}: no folder {value['local']['path']} on the server"
            if state in ("missing", "refused"):
                return self.fail(f"{folder}, and {endpoint} has no model {ident}",
                                 upload or "fix train.base_model: a folder on the server, or a "
                                 "hub id (hf:org/name, modelscope:org/name)")
            return self.fail(f"{folder} nor {ident} in its Hugging Face cache, and {endpoint} "
                             f"cannot be reached from the server ({detail})", offline_fix)
        if state in ("missing", "refused"):
            why = "has no model" if state == "missing" else "refuses (gated, private or missing)"
            fix = ("check the id on the hub" if state == "missing" else
                   "accept the model's license on the hub and set HF_TOKEN in the server's "
                   "environment, or check the id")
            return self.fail(f"{absent}; {endpoint} {why} {ident}", upload or fix)
        rows = [self.fail(f"{absent}, and {endpoint} cannot be reached from the server "
                          f"({detail})", offline_fix)]
        if laptop:
            need = laptop["bytes"] - (cache["bytes"] if cache else 0)
            disk = self._disk(value, max(need, 0), "the upload")
            if disk:
                rows.append(disk)
        return rows


@hookimpl
def register_checks(register):
    register(BaseModelCheck())
