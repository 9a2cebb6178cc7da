"""What ``train.base_model`` names, where that model lives on this machine, and whether the
folder holding it is complete. Pure standard library, and standalone on purpose: the
base-model precheck probe (``plugins/base_model.py``) carries this module's source to the
server's plain Python, where remoteops may not be installed.

``train.base_model`` is one of:

- a folder: absolute, ``~/...``, ``./...``, or relative to the project (``outputs/demo-model``);
- a Hugging Face id ``org/name`` (or ``hf:org/name``), optionally ``@revision``. It is looked
  up in the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
  ``~/.cache/huggingface/hub``: ``models--org--name/snapshots/<rev>/``, ``refs/main``) and
  fetched from ``HF_ENDPOINT`` (a mirror such as https://hf-mirror.com) or huggingface.co;
- a ModelScope id ``modelscope:org/name`` (cache ``MODELSCOPE_CACHE``, else
  ``~/.cache/modelscope/hub``; hub ``MODELSCOPE_DOMAIN``, else www.modelscope.cn).

A bare ``org/name`` could be either a folder or a hub id: it is the folder when the project
holds one by that name (as transformers decides), else the hub id (``choose``).
"""

import fnmatch
import json
import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,199}")
HF_ENDPOINT = "https://huggingface.co"
MODELSCOPE_DOMAIN = "www.modelscope.cn"
# Files that never count as a model's own: our upload area, huggingface's local_dir metadata.
INCOMING = ".remoteops-incoming"
SKIP_DIRS = frozenset({INCOMING, ".cache", ".git", "__pycache__"})
SKIP_SUFFIXES = (".incomplete", ".part", ".lock", ".tmp")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"),
                  ("vocab.txt",), ("spiece.model",), ("tiktoken.model",), ("qwen.tiktoken",))
USAGE = ("set train.base_model to a folder (outputs/my-model, /data/Qwen3-8B), a Hugging "
         "Face id (Qwen/Qwen3-8B) or a ModelScope id (modelscope:Qwen/Qwen3-8B)")


class ModelRef:
    """A parsed ``train.base_model``: ``kind`` is local, hf or modelscope; ``name`` the
    folder as written or the hub's ``org/name``; ``ambiguous`` for a bare ``org/name``."""

    __slots__ = ("kind", "name", "revision", "ambiguous", "text")

    def __init__(self, kind, name, revision=None, ambiguous=False, text=""):
        self.kind = kind
        self.name = name
        self.revision = revision
        self.ambiguous = ambiguous
        self.text = text or name

    def __eq__(self, other):
        return isinstance(other, ModelRef) and (self.kind, self.name, self.revision,
                                                self.ambiguous) == (
            other.kind, other.name, other.revision, other.ambiguous)

    def __repr__(self):
        return (f"ModelRef({self.kind!r}, {self.name!r}, revision={self.revision!r}, "
                f"ambiguous={self.ambiguous!r})")

    @property
    def hub(self):
        return self.kind in ("hf", "modelscope")

    def canonical(self):
        """Text that parses back to this ref with no ambiguity (what the laptop sends)."""
        if self.kind == "local":
            name = self.name
            return name if name.startswith(("/", "~", "./", "../")) else "./" + name
        rev = f"@{self.revision}" if self.revision and self.revision != default_revision(
            self.kind) else ""
        return f"{self.kind}:{self.name}{rev}"

    def as_local(self):
        return ModelRef("local", self.name, None, False, self.text)

    def shown(self):
        return self.text


def default_revision(kind):
    return {"hf": "main", "modelscope": "master"}.get(kind)


def parse(text):
    """``train.base_model`` as a ``ModelRef``; ValueError (one line, with the fix) if bad."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"train.base_model is empty; {USAGE}")
    raw = text.strip()
    low = raw.lower()
    for prefix, kind in (("modelscope:", "modelscope"), ("ms:", "modelscope"), ("hf:", "hf"),
                         ("huggingface:", "hf")):
        if low.startswith(prefix):
            return _hub(kind, raw[len(prefix):], raw, ambiguous=False)
    if raw.startswith(("/", "~", ".")) or "\\" in raw:
        return ModelRef("local", raw, None, False, raw)
    if "@" in raw or HUB_ID.fullmatch(raw):
        return _hub("hf", raw, raw, ambiguous="@" not in raw)
    return ModelRef("local", raw, None, False, raw)


def _hub(kind, rest, raw, ambiguous):
    rest = rest.strip()
    name, _, revision = rest.partition("@")
    if not HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise ValueError(f"train.base_model {raw!r} is not a valid hub id (org/name); {USAGE}")
    if revision and not REVISION.fullmatch(revision) or ".." in revision:
        raise ValueError(f"train.base_model {raw!r} has an invalid revision after '@'; use a "
                         "branch, tag or commit")
    return ModelRef(kind, name, revision or default_revision(kind), ambiguous, raw)


def choose(ref, project_dir, isdir=os.path.isdir):
    """A bare ``org/name`` is the folder when ``project_dir`` holds it, else the hub id."""
    if ref.ambiguous and isdir(os.path.join(os.path.expanduser(str(project_dir)), ref.name)):
        return ref.as_local()
    return ref


def local_folder(ref, project_dir):
    """The absolute folder a local ref names (relative to ``project_dir``)."""
    path = os.path.expanduser(ref.name)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser(str(project_dir)), path)
    return os.path.normpath(path)


# -- Hugging Face -----------------------------------------------------------------------------

def _truthy(value):
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def hf_home(env):
    if env.get("HF_HOME"):
        return os.path.expanduser(env["HF_HOME"])
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                     ".cache")
    return os.path.join(os.path.expanduser(base), "huggingface")


def hf_hub_cache(env):
    """The hub cache huggingface_hub uses with this environment."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return os.path.expanduser(env[key])
    return os.path.join(hf_home(env), "hub")


def hf_endpoint(env):
    return (env.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def hf_offline(env):
    return _truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE"))


def hf_token(env):
    """The token huggingface_hub would send (the value never leaves this machine)."""
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(key):
            return env[key].strip()
    path = env.get("HF_TOKEN_PATH") or os.path.join(hf_home(env), "token")
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def hf_repo_dir(ref, env):
    return os.path.join(hf_hub_cache(env), "models--" + ref.name.replace("/", "--"))


def hf_snapshot(ref, env):
    """The cached snapshot folder of ``ref`` (its revision through ``refs/``), or None."""
    repo = hf_repo_dir(ref, env)
    revision = ref.revision or "main"
    commit = None
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        try:
            with open(os.path.join(repo, "refs", revision), encoding="utf-8") as fh:
                commit = fh.read().strip()
        except OSError:
            return None
    path = os.path.join(repo, "snapshots", commit)
    return path if commit and os.path.isdir(path) else None


# Never fetched from a hub: other frameworks' weights, copies for other runtimes. ``*.bin``
# too when the repository has safetensors (the same weights twice).
HUB_SKIP = ("*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot",
            "*.tflite", "*.mlmodel", "original/*", "onnx/*", "coreml/*", "flax_model*",
            "tf_model*", "rust_model*")


def hub_ignore_patterns(names):
    """What a download leaves out of a repository holding ``names``."""
    names = list(names)
    return list(HUB_SKIP) + (["*.bin"] if any(n.endswith(".safetensors") for n in names)
                             else [])


def hub_selected(names):
    skip = hub_ignore_patterns(names)
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in skip)]


# -- ModelScope -------------------------------------------------------------------------------

def modelscope_cache(env):
    if env.get("MODELSCOPE_CACHE"):
        return os.path.expanduser(env["MODELSCOPE_CACHE"])
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", "modelscope", "hub")


def modelscope_dirs(ref, env):
    """Where modelscope keeps ``ref``: today's layout first (``models/org/name``), then the
    older one; a dot in a name is stored as ``___``."""
    org, name = ref.name.split("/", 1)
    cache = modelscope_cache(env)
    out = []
    for n in (name.replace(".", "___"), name):
        for path in (os.path.join(cache, "models", org, n), os.path.join(cache, org, n)):
            if path not in out:
                out.append(path)
    return out


def modelscope_endpoint(env):
    domain = (env.get("MODELSCOPE_DOMAIN") or MODELSCOPE_DOMAIN).rstrip("/")
    return domain if "://" in domain else "https://" + domain


# -- where the model is on this machine -------------------------------------------------------

def hub_endpoint(ref, env):
    return hf_endpoint(env) if ref.kind == "hf" else modelscope_endpoint(env)


def cache_folder(ref, env):
    """Where a hub model is (or would be) kept here: the HF snapshot, or the first ModelScope
    folder holding a config.json (else where fetch-model puts it)."""
    if ref.kind == "hf":
        return hf_snapshot(ref, env)
    for path in modelscope_dirs(ref, env):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    return None


def model_folder(ref, project_dir, env):
    """The folder holding the model on this machine, or None when a hub model is not cached
    (a local ref always has its folder, present or not)."""
    if ref.kind == "local":
        return local_folder(ref, project_dir)
    return cache_folder(ref, env)


def upload_dest(ref, project_dir, env, snapshot=None):
    """Where an uploaded copy goes: the folder itself, the HF cache's ``snapshots/<snapshot>``,
    or ModelScope's ``models/org/name``."""
    if ref.kind == "local":
        return local_folder(ref, project_dir)
    if ref.kind == "hf":
        return os.path.join(hf_repo_dir(ref, env), "snapshots", snapshot or "0" * 40)
    return modelscope_dirs(ref, env)[0]


def nearest_existing(path):
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


# -- is a folder a complete model? ------------------------------------------------------------

def model_files(folder):
    """``{relative path: size}`` of a model folder's files (links followed; our upload area,
    caches and partial downloads left out)."""
    out = {}
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(SKIP_SUFFIXES):
                continue
            path = os.path.join(top, name)
            try:
                size = os.stat(path).st_size
            except OSError:
                continue  # a dangling link (a blob that never arrived) is no file
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = size
    return out


def safetensors_gap(path, size):
    """Bytes a .safetensors file lacks against its own header (0 when whole, None when the
    header cannot be read): a download that died half way is caught here."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size, 200 << 20):
                return None
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    end = 0
    for key, value in header.items():
        if key != "__metadata__" and isinstance(value, dict):
            offsets = value.get("data_offsets") or [0, 0]
            end = max(end, int(offsets[1]))
    return max(0, 8 + n + end - size)


def inspect_folder(folder):
    """What a model folder holds and lacks: ``problems`` is empty when it is complete."""
    report = {"path": folder, "exists": os.path.isdir(folder), "files": 0, "bytes": 0,
              "weights": [], "expected_bytes": None, "problems": []}
    if not report["exists"]:
        report["problems"].append("missing")
        return report
    files = model_files(folder)
    report["files"], report["bytes"] = len(files), sum(files.values())
    problems = report["problems"]
    if "config.json" not in files:
        problems.append("no config.json")
    index = next((n for n in INDEXES if n in files), None)
    if index:
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as fh:
                data = json.load(fh)
            shards = sorted(set(data["weight_map"].values()))
            total = (data.get("metadata") or {}).get("total_size")
            report["expected_bytes"] = int(total) if total else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{index} cannot be read")
            shards = []
        missing = [s for s in shards if s not in files]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            problems.append(f"{len(missing)} of {len(shards)} weight shards missing "
                            f"({missing[0]}{more})")
        report["weights"] = [s for s in shards if s in files]
    else:
        report["weights"] = [n for n in SINGLE_WEIGHTS if n in files] or sorted(
            n for n in files if "/" not in n and n.endswith(".safetensors"))
        if not report["weights"]:
            problems.append("no weights (model.safetensors, or an index with its shards)")
    for name in report["weights"]:
        if name.endswith(".safetensors"):
            gap = safetensors_gap(os.path.join(folder, name), files[name])
            if gap is None or gap > 0:
                problems.append(f"{name} is truncated" + (f" ({gap} bytes short)" if gap else
                                                          " (unreadable header)"))
    if not any(all(n in files for n in group) for group in TOKENIZER_SETS):
        problems.append("no tokenizer (tokenizer.json, tokenizer.model or vocab.json + "
                        "merges.txt)")
    return report
