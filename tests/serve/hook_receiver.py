"""A webhook receiver for tests: a real HTTP server on loopback that records every POST and checks
each copy's signature the documented way (``serve.webhooks.verify_signature``)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serve.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, verify_signature


class Receiver:
    """A real HTTP server on loopback recording every POST; answers ``statuses`` in turn, then 204."""

    def __init__(self, secret: str, statuses=()):
        self.secret, self.received, self.statuses, self.lock = secret, [], list(statuses), threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append((dict(self.headers), body, self.path))
                    status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def by_delivery(self):
        """{delivery id: [bodies]}, each copy's signature checked on the way."""
        seen = {}
        for headers, body, path in list(self.received):
            assert path == "/hook" and verify_signature(self.secret, headers[SIGNATURE_HEADER], body)
            payload = json.loads(body)
            assert headers[DELIVERY_HEADER] == payload["id"] and headers[EVENT_HEADER] == payload["event"]
            seen.setdefault(payload["id"], []).append(body)
        return seen

    def wait_for(self, task_ids, timeout_s=240.0):
        """``by_delivery()`` once every task in ``task_ids`` has a delivery (a bounded wait)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            copies = self.by_delivery()
            if {delivery.rsplit(".", 1)[0] for delivery in copies} >= set(task_ids):
                return copies
            time.sleep(0.2)
        missing = set(task_ids) - {d.rsplit(".", 1)[0] for d in self.by_delivery()}
        raise AssertionError(f"webhooks missing for {missing}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()
