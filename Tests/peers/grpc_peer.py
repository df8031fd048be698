#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the gateway's tests, with raw-bytes messages (no protoc needed).

Server: python3 grpc_peer.py server PORT [CERT KEY]
  Serves echo.Echo on 127.0.0.1:PORT (h2c, or TLS with CERT and KEY) and prints "ready" once listening.
  Unary         answers the request; "fail" -> NOT_FOUND "no such thing"; "sleep:N" sleeps N ms first.
  ServerStream  "N" -> N messages "msg-0".."msg-(N-1)".
  ClientStream  all requests -> one message "<count>:<total bytes>".
  Bidi          echoes each message as it arrives.
  Every call sets the trailing metadata x-peer-trailer: yes.

Client: python3 grpc_peer.py client TARGET KIND [ARG] [--timeout S] [--metadata k=v]... [--count N] [--size B]
  Makes one call through TARGET (host:port, h2c) and prints one JSON line: code, details, messages (or their
  sizes with --size), trailing metadata.
  KIND: unary ARG | server N | client (N messages of --size bytes) | bidi (N messages of --size bytes, each
  sent after the previous answer arrived) | load N (N unary calls, 8 at a time; prints the codes counted).
"""
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc
from peer_common import exit_with_parent

SERVICE = "echo.Echo"


def identity(value):
    return value


def trailer(context):
    context.set_trailing_metadata((("x-peer-trailer", "yes"),))


def unary(request, context):
    trailer(context)
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request.startswith(b"sleep:"):
        time.sleep(int(request[6:]) / 1000)
    return request


def server_stream(request, context):
    trailer(context)
    for index in range(int(request)):
        yield b"msg-%d" % index


def client_stream(requests, context):
    trailer(context)
    count = 0
    total = 0
    for message in requests:
        count += 1
        total += len(message)
    return b"%d:%d" % (count, total)


def bidi(requests, context):
    trailer(context)
    for message in requests:
        yield message


def serve(port, cert=None, key=None):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, identity, identity),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, identity, identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, identity, identity),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = "127.0.0.1:%d" % port
    if cert:
        with open(cert, "rb") as c, open(key, "rb") as k:
            credentials = grpc.ssl_server_credentials(((k.read(), c.read()),))
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    server.start()
    print("ready", flush=True)
    exit_with_parent()
    server.wait_for_termination()


def call(target, kind, arg, timeout, metadata, count, size):
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    )
    path = "/" + SERVICE + "/"
    result = {"code": "OK", "details": "", "messages": [], "trailers": {}}
    try:
        if kind == "unary":
            method = channel.unary_unary(path + "Unary", identity, identity)
            reply, state = method.with_call(arg.encode(), timeout=timeout, metadata=metadata)
            result["messages"] = [reply.decode()]
            result["trailers"] = dict(state.trailing_metadata() or ())
        elif kind == "server":
            method = channel.unary_stream(path + "ServerStream", identity, identity)
            stream = method(arg.encode(), timeout=timeout, metadata=metadata)
            result["messages"] = [m.decode() for m in stream]
            result["trailers"] = dict(stream.trailing_metadata() or ())
        elif kind == "client":
            method = channel.stream_unary(path + "ClientStream", identity, identity)
            messages = (bytes([65 + i % 26]) * size for i in range(count))
            reply, state = method.with_call(messages, timeout=timeout, metadata=metadata)
            result["messages"] = [reply.decode()]
            result["trailers"] = dict(state.trailing_metadata() or ())
        elif kind == "bidi":
            # Each message goes out only after the answer to the one before arrived: both directions are open
            # at once, which a gateway that buffers either side would deadlock.
            method = channel.stream_stream(path + "Bidi", identity, identity)
            turn = threading.Semaphore(1)

            def requests():
                for i in range(count):
                    if not turn.acquire(timeout=10):
                        return
                    yield bytes([97 + i % 26]) * size

            stream = method(requests(), timeout=timeout, metadata=metadata)
            sizes = []
            for message in stream:
                sizes.append(len(message))
                if message != bytes([97 + (len(sizes) - 1) % 26]) * size:
                    result["code"] = "CORRUPT"
                turn.release()
            result["messages"] = sizes
            result["trailers"] = dict(stream.trailing_metadata() or ())
        elif kind == "load":
            method = channel.unary_unary(path + "Unary", identity, identity)
            counts = {}
            lock = threading.Lock()

            def one(i):
                try:
                    reply = method(b"load-%d" % i, timeout=timeout, metadata=metadata)
                    code = "OK" if reply == b"load-%d" % i else "CORRUPT"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    counts[code] = counts.get(code, 0) + 1

            with futures.ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(one, range(int(arg))))
            result["messages"] = [counts]
    except grpc.RpcError as error:
        result["code"] = error.code().name
        result["details"] = error.details() or ""
        result["trailers"] = dict(error.trailing_metadata() or ())
    channel.close()
    print(json.dumps(result), flush=True)


def main():
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), *sys.argv[3:5])
        return
    target, kind = sys.argv[2], sys.argv[3]
    rest = sys.argv[4:]
    arg = ""
    if rest and not rest[0].startswith("--"):
        arg = rest.pop(0)
    timeout, metadata, count, size = 20.0, [], 3, 16
    while rest:
        flag, value = rest.pop(0), rest.pop(0)
        if flag == "--timeout":
            timeout = float(value)
        elif flag == "--metadata":
            name, _, text = value.partition("=")
            metadata.append((name, text))
        elif flag == "--count":
            count = int(value)
        elif flag == "--size":
            size = int(value)
    call(target, kind, arg, timeout, metadata, count, size)


if __name__ == "__main__":
    main()
