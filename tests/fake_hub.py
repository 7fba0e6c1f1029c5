"""A Hugging Face Hub stand-in on 127.0.0.1 for the push tests: the few endpoints merge_and_push.py's push calls
(create a repo, check a card's YAML, ask how to upload each file, commit), answered from memory, and failures on
demand. It listens on a free port only inside `running_hub()` and stops by itself after `lifetime_s` at the latest."""

import base64
import json
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers import free_port

COMMIT_OID = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, failure=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.failure = failure  # None, "create_repo" (HTTP 500) or "drop_commit" (connection closed mid-upload)
        self.repos, self.commits, self.unknown = [], [], []

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.unknown.append(("GET", self.path))
        self.answer(404, {"error": "not in the fake Hub"})

    def do_POST(self):
        hub, path = self.server, self.path.split("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        if hub.failure == "drop_commit" and "/commit/" in path:
            self.rfile.read(min(length, 1024))  # part of the upload, then the connection goes away
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        if path == "/api/repos/create":
            if hub.failure == "create_repo":
                return self.answer(500, {"error": "Internal Error: the fake Hub is down"})
            request = json.loads(body)
            repo_id = "/".join(filter(None, [request.get("organization"), request["name"]]))
            hub.repos.append(repo_id)
            return self.answer(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self.answer(200, {})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return self.answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                "oid": None} for f in files]})  # fmt: skip
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path)
        if match:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}  # fmt: skip
            hub.commits.append((match.group(1), files))
            return self.answer(200, {"commitUrl": f"{hub.endpoint}/{match.group(1)}/commit/{COMMIT_OID}",
                                     "commitOid": COMMIT_OID, "pullRequestUrl": None})  # fmt: skip
        hub.unknown.append(("POST", path))
        self.answer(404, {"error": "not in the fake Hub"})


@contextmanager
def running_hub(failure=None, lifetime_s=60):
    """Yields a FakeHub serving in a thread; stops when the block ends, or after lifetime_s whatever happens."""
    hub = FakeHub(failure)
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stop = threading.Timer(lifetime_s, hub.shutdown)
    stop.daemon = True
    stop.start()
    try:
        yield hub
    finally:
        stop.cancel()
        hub.shutdown()
        hub.server_close()


def closed_port_endpoint():
    """An endpoint on 127.0.0.1 where nothing listens: connections to it are refused."""
    return f"http://127.0.0.1:{free_port()}"
