"""A scripted origin for the cache tests: each path answers with the responses a test put there, in order.

    cache_origin.py server PORT

PUT /_script/<path> with a JSON list of responses sets what <path> answers: the first request gets the first one,
and so on; the last one repeats. A response is {"status": 200, "headers": [["Name", "value"], ...], "body": "...",
"interim": [{"status": 103, "headers": [...]}]}. A Date field is added unless the response has one, and a
Content-Length unless the status has no body. GET /_log/<path> answers the requests <path> received:
[{"method": ..., "headers": [[name, value], ...]}]. Any method is accepted, unknown ones too.
"""
import json
import sys
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from peer_common import exit_with_parent

scripts = {}
received = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def __getattr__(self, name):
        # BaseHTTPRequestHandler calls do_<METHOD>: every method, unknown ones too, is answered by the script.
        if name.startswith("do_"):
            return self.answer
        raise AttributeError(name)

    def write_head(self, status, headers):
        lines = ["HTTP/1.1 %d Scripted" % status] + ["%s: %s" % (name, value) for name, value in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def reply(self, status, body, content_type="text/plain"):
        data = body.encode()
        self.write_head(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        self.wfile.write(data)

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0]
        if path.startswith("/_script/"):
            with lock:
                scripts[path[len("/_script"):]] = json.loads(body)
                received[path[len("/_script"):]] = []
            return self.reply(200, "ok")
        if path.startswith("/_log/"):
            with lock:
                entries = list(received.get(path[len("/_log"):], []))
            return self.reply(200, json.dumps(entries), "application/json")
        with lock:
            received.setdefault(path, []).append(
                {"method": self.command, "headers": [[name, value] for name, value in self.headers.items()]})
            steps = scripts.get(path) or [{"status": 404, "body": "no script"}]
            step = steps.pop(0) if len(steps) > 1 else steps[0]
        for interim in step.get("interim", []):
            self.write_head(interim["status"], interim.get("headers", []))
            self.wfile.flush()
        status = step.get("status", 200)
        headers = [tuple(pair) for pair in step.get("headers", [])]
        names = {name.lower() for name, _ in headers}
        if "date" not in names:
            headers.append(("Date", formatdate(usegmt=True)))
        data = step.get("body", "").encode()
        if status not in (204, 304) and "content-length" not in names:
            headers.append(("Content-Length", str(len(data))))
        self.write_head(status, headers)
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(data)
        self.wfile.flush()


if __name__ == "__main__":
    exit_with_parent()
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
