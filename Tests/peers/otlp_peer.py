#!/usr/bin/env python3
"""A real OTLP/HTTP trace receiver for the gateway's tests: it decodes what an exporter posts.

Server: python3 otlp_peer.py server PORT
  Listens on 127.0.0.1:PORT and prints "ready". POST /v1/traces takes an ExportTraceServiceRequest as OTLP JSON
  (Content-Type application/json) and keeps every span, flattened; GET /spans answers them as one JSON list of
  {"trace_id", "span_id", "parent_span_id" (lower-case hex), "name", "kind" ("server", "client", "internal"),
  "service", "attributes": {key: value}}.
  A body that is not OTLP JSON is answered 400 and counted; GET /stats answers {"requests", "rejected"}.
"""
import base64
import binascii
import json
import string
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

spans = []
stats = {"requests": 0, "rejected": 0}
lock = threading.Lock()


def value_of(any_value):
    """An OTLP AnyValue as a plain value."""
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "arrayValue" in any_value:
        return [value_of(v) for v in any_value["arrayValue"].get("values", [])]
    return None


def span_id(text, size):
    """An id as lower-case hex: OTLP JSON says hex; protobuf's own JSON mapping (which some exporters use) says
    base64 of the bytes. Either is read."""
    if len(text) == size * 2 and all(c in string.hexdigits for c in text):
        return text.lower()
    try:
        return base64.b64decode(text).hex() if text else ""
    except (binascii.Error, ValueError):
        return text


KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def flatten(request):
    out = []
    for resource_spans in request.get("resourceSpans", []):
        resource = {a["key"]: value_of(a["value"]) for a in resource_spans.get("resource", {}).get("attributes", [])}
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                out.append({
                    "trace_id": span_id(span.get("traceId", ""), 16),
                    "span_id": span_id(span.get("spanId", ""), 8),
                    "parent_span_id": span_id(span.get("parentSpanId", ""), 8),
                    "name": span.get("name"),
                    "kind": KINDS.get(span.get("kind"), str(span.get("kind", "")).lower().replace("span_kind_", "")),
                    "service": resource.get("service.name"),
                    "attributes": {a["key"]: value_of(a["value"]) for a in span.get("attributes", [])},
                })
    return out


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        with lock:
            stats["requests"] += 1
        if self.path != "/v1/traces" or "json" not in self.headers.get("Content-Type", ""):
            with lock:
                stats["rejected"] += 1
            return self.answer(400, {"error": "expected OTLP JSON at /v1/traces"})
        try:
            received = flatten(json.loads(body))
        except (ValueError, AttributeError, KeyError, TypeError):
            with lock:
                stats["rejected"] += 1
            return self.answer(400, {"error": "not OTLP JSON"})
        with lock:
            spans.extend(received)
        self.answer(200, {})

    def do_GET(self):
        with lock:
            body = list(spans) if self.path == "/spans" else dict(stats)
        self.answer(200, body)


def main():
    if len(sys.argv) < 3 or sys.argv[1] != "server":
        sys.exit("usage: otlp_peer.py server PORT")
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
