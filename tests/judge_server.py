"""A real OpenAI-compatible judge on loopback for the tests: POST /chat/completions (or /v1/chat/completions)
with rlhf_cluster.quality.judge's prompt, answered by a deterministic rule so the tests know every verdict."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PART = {name: re.compile(rf"<{name}>\n(.*?)\n</{name}>", re.DOTALL) for name in ("request", "assistant_a", "assistant_b")}
ROUTES = ("/chat/completions", "/v1/chat/completions")


def parse(body: dict) -> dict[str, str] | None:
    """The request, answer A and answer B out of a judge prompt (None if it is not one)."""
    user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
    found = {k: p.search(user) for k, p in _PART.items()}
    return None if None in found.values() else {k: m.group(1) for k, m in found.items()}


class JudgeServer:
    """The rule: the answer with more words is better ([[C]] when they have as many), after a line of reasoning.

    Markers in the request text: FAIL -> HTTP 500 always; REJECT -> HTTP 400; SLOW -> answers after ``slow_s``;
    FLAKY -> 503 on the first attempt of each order, then the rule; GARBLE -> a reply with no verdict.
    ``biased``: always [[A]] (a judge with pure position bias). ``api_key``: 401 unless sent as Bearer.
    ``requests`` records (path, body, headers) of every request, in arrival order."""

    def __init__(self, *, api_key: str | None = None, biased: bool = False, slow_s: float = 1.0):
        self.requests: list[tuple[str, dict, dict]] = []
        self.api_key, self.biased, self.slow_s = api_key, biased, slow_s
        self._flaky_seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (a timeout test): nobody to answer
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append((self.path, body, dict(self.headers)))
                if self.path not in ROUTES:
                    return self._send(404, {"error": f"no route {self.path}"})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": "invalid api key"})
                parts = parse(body)
                if parts is None:
                    return self._send(400, {"error": "not a judge prompt"})
                question, a, b = parts["request"], parts["assistant_a"], parts["assistant_b"]
                if "FAIL" in question:
                    return self._send(500, b"judge crashed")
                if "REJECT" in question:
                    return self._send(400, b"context length exceeded")
                if "SLOW" in question:
                    time.sleep(server.slow_s)
                if "FLAKY" in question:
                    with server._lock:
                        first = (question, a) not in server._flaky_seen
                        server._flaky_seen.add((question, a))
                    if first:
                        return self._send(503, b"overloaded")
                self._send(200, {"id": "judge-1", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": server.verdict(question, a, b)}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def verdict(self, question: str, a: str, b: str) -> str:
        if "GARBLE" in question:
            return "Both answers have merit and I cannot decide."
        if self.biased:
            return "The first answer is better.\n[[A]]"
        la, lb = len(a.split()), len(b.split())
        pick = "A" if la > lb else "B" if lb > la else "C"
        return f"Assistant A has {la} words, Assistant B {lb}; the longer is more helpful.\n[[{pick}]]"

    def asked(self, question: str) -> list[tuple[str, str]]:
        """(answer A, answer B) of every request about ``question``, in arrival order."""
        out = []
        for _, body, _ in self.requests:
            parts = parse(body)
            if parts and parts["request"] == question:
                out.append((parts["assistant_a"], parts["assistant_b"]))
        return out

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
