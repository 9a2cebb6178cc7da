"""A tiny Hugging Face hub (or mirror) on 127.0.0.1: enough of its HTTP API for
``huggingface_hub.snapshot_download`` (repo info, tree, resolve with ETag, X-Repo-Commit,
X-Linked-Size and Range), with connections it can cut part way through a file."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos, commit="e" * 40, lfs_min=1000):
        self.repos, self.commit, self.lfs_min = repos, commit, lfs_min
        self.log = []
        self.cut_after = None  # a file's GET is dropped after this many bytes ...
        self.cuts_left = 0     # ... this many times
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, head):
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                repo, rest = "/".join(parts[:2]), parts[2:]
                files = hub.repos.get(repo)
                if files is None or rest[:1] != ["resolve"]:
                    return self.send_error(404)
                name = "/".join(rest[2:])
                if name not in files:
                    return self.send_error(404)
                data = files[name]
                lfs = len(data) >= hub.lfs_min
                etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{etag}"')
                if lfs:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data)-1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                body = data[start:]
                if hub.cuts_left > 0 and len(body) > hub.cut_after:
                    hub.cuts_left -= 1
                    self.wfile.write(body[:hub.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def do_HEAD(self):
                hub.log.append(("HEAD", self.path, None))
                self._file(True)

            def do_GET(self):
                hub.log.append(("GET", self.path, self.headers.get("Range")))
                path = unquote(urlparse(self.path).path).strip("/").split("/")
                if path[:2] == ["api", "models"]:
                    repo = "/".join(path[2:4])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self.send_error(404)
                    if path[4:5] == ["tree"]:
                        return self._json([self._entry(n, d) for n, d in files.items()])
                    return self._json({"id": repo, "sha": hub.commit, "siblings": [
                        {"rfilename": n, "size": len(d)} for n, d in files.items()]})
                self._file(False)

            def _entry(self, name, data):
                e = {"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
                if len(data) >= hub.lfs_min:
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
                return e

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
