#!/usr/bin/env python3
"""A real OTLP/HTTP trace receiver for the gateway's tests: it decodes what an exporter posts.

Server: python3 otlp_peer.py server PORT
  Listens on 127.0.0.1:PORT and prints "ready". POST /v1/traces takes an ExportTraceServiceRequest as protobuf
  (Content-Type application/x-protobuf, decoded here by the wire format and opentelemetry-proto's field numbers)
  or as OTLP JSON (application/json), and keeps every span, flattened; GET /spans answers them as one JSON list of
  {"trace_id", "span_id", "parent_span_id" (lower-case hex), "name", "kind" ("server", "client", "internal"),
  "service", "attributes": {key: value}}.
  A body that is not OTLP JSON is answered 400 and counted; GET /stats answers {"requests", "rejected"}.
"""
import base64
import binascii
import json
import string
import struct
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


def fields(data):
    """The fields of a protobuf message: (number, wire type, value) with varints as ints, fixed64 as 8 bytes,
    length-delimited as bytes."""
    position, out = 0, []
    while position < len(data):
        key, position = varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = varint(data, position)
        elif wire == 1:
            value, position = data[position:position + 8], position + 8
        elif wire == 2:
            length, position = varint(data, position)
            value, position = data[position:position + length], position + length
        elif wire == 5:
            value, position = data[position:position + 4], position + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, wire, value))
    return out


def varint(data, position):
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def any_value(data):
    """An AnyValue message as the JSON mapping writes it."""
    for number, wire, value in fields(data):
        if number == 1:
            return {"stringValue": value.decode()}
        if number == 2:
            return {"boolValue": bool(value)}
        if number == 3:
            return {"intValue": str(value - (1 << 64) if value >= 1 << 63 else value)}
        if number == 4:
            return {"doubleValue": struct.unpack("<d", value)[0]}
        if number == 5:
            return {"arrayValue": {"values": [any_value(v) for n, _, v in fields(value) if n == 1]}}
    return {}


def key_values(data_list):
    out = []
    for data in data_list:
        key, value = "", {}
        for number, _, field in fields(data):
            if number == 1:
                key = field.decode()
            elif number == 2:
                value = any_value(field)
        out.append({"key": key, "value": value})
    return out


def from_protobuf(body):
    """An ExportTraceServiceRequest in protobuf, as the OTLP JSON mapping writes it (ids in hex)."""
    request = {"resourceSpans": []}
    for number, _, resource_spans in fields(body):
        if number != 1:
            continue
        entry = {"resource": {"attributes": []}, "scopeSpans": []}
        for n, _, part in fields(resource_spans):
            if n == 1:
                entry["resource"]["attributes"] = key_values([v for m, _, v in fields(part) if m == 1])
            elif n == 2:
                spans = []
                for m, _, span_data in fields(part):
                    if m != 2:
                        continue
                    span, attributes = {}, []
                    for k, _, value in fields(span_data):
                        if k == 1:
                            span["traceId"] = value.hex()
                        elif k == 2:
                            span["spanId"] = value.hex()
                        elif k == 4:
                            span["parentSpanId"] = value.hex()
                        elif k == 5:
                            span["name"] = value.decode()
                        elif k == 6:
                            span["kind"] = value
                        elif k in (7, 8):
                            span["startTimeUnixNano" if k == 7 else "endTimeUnixNano"] = str(
                                struct.unpack("<Q", value)[0])
                        elif k == 9:
                            attributes.append(value)
                        elif k == 15:
                            span["status"] = {"code": next((v for c, _, v in fields(value) if c == 3), 0)}
                    span["attributes"] = key_values(attributes)
                    spans.append(span)
                entry["scopeSpans"].append({"spans": spans})
        request["resourceSpans"].append(entry)
    return request


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
        content_type = self.headers.get("Content-Type", "")
        if self.path != "/v1/traces" or not ("json" in content_type or "protobuf" in content_type):
            with lock:
                stats["rejected"] += 1
            return self.answer(400, {"error": "expected OTLP protobuf or JSON at /v1/traces"})
        try:
            received = flatten(from_protobuf(body) if "protobuf" in content_type else json.loads(body))
        except (ValueError, AttributeError, KeyError, TypeError, IndexError, UnicodeDecodeError, struct.error):
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
