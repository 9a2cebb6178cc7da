"""Example single-file plugin: is there room for model downloads in the Hugging Face cache?

Drop this file into your project's plugins/ folder; `invoke plugins` lists it and
`invoke precheck` runs its check. Settings: [plugins.hf_cache] min_free_gb = 30
"""
from remoteops import Check, hookimpl


class HFCacheCheck(Check):
    name = "hf cache"
    probe = '''
def probe(ctx):
    import os, shutil
    path = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return {"path": path, "free": shutil.disk_usage(path).free}
'''

    def evaluate(self, value, settings):
        need = float(settings.get("plugins.hf_cache.min_free_gb", 30))
        shown = f"{value['free'] / 1e9:.1f} GB free at {value['path']}"
        if value["free"] / 1e9 < need:
            return self.warn(shown, f"base models need room: free {need:g} GB or set HF_HOME")
        return self.ok(shown)


@hookimpl
def register_checks(register):
    register(HFCacheCheck())
