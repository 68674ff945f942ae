"""A real HTTP reward server on loopback for the tests, speaking rlhf_cluster's reward protocol:
POST {"prompts", "responses", "extras"} -> {"rewards"}."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_cluster.rewards import exact_answer


class RewardServer:
    """A real reward server on loopback. Routes: /len (reward = len(response) + extras' bonus), /exact
    (rlhf_cluster.rewards:exact_answer on extras' answer), /flaky (503 twice, then /len), /down (always 500),
    /slow (answers after 2 s), /bad (not JSON), /auth (401 without the key)."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.flaky_left = 2
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body, dict(self.headers)))
                if self.path == "/flaky" and server.flaky_left > 0:
                    server.flaky_left -= 1
                    return self._send(503, b"busy")
                if self.path == "/down":
                    return self._send(500, b"boom")
                if self.path == "/slow":
                    time.sleep(2.0)
                if self.path == "/bad":
                    return self._send(200, b"<html>")
                if self.path == "/auth" and self.headers.get("Authorization") != "Bearer s3cret":
                    return self._send(401, b"who are you")
                if self.path == "/exact":
                    rewards = exact_answer(body["prompts"], body["responses"], [e["answer"] for e in body["extras"]])
                else:
                    rewards = [len(r) + (e.get("bonus") or 0) for r, e in zip(body["responses"], body["extras"])]
                self._send(200, json.dumps({"rewards": rewards}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
