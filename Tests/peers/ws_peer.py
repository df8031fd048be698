#!/usr/bin/env python3
"""A real WebSocket server and client (Python's websockets) for the gateway's tests.

Server: python3 ws_peer.py server PORT [CERT KEY]
  Listens on 127.0.0.1:PORT (TLS with CERT and KEY) and prints "ready". /refuse answers 403 "refused here";
  every other path echoes each message back as it came (text or binary), after a first text message
  "hello <path> <x-real-ip> <x-consumer-id>".

Client: python3 ws_peer.py client URL MODE [--header k=v]...
  (/flood on the server: 64 MiB in 512 messages, each starting with the time it was sent.)
  echo: sends text and binary messages of 1 B to 1 MiB and checks each echo; prints JSON with "ok", the hello,
        and the sizes echoed.
  slow: reads nothing for 3 s, then all; prints how many messages were sent before reading began.
  idle: waits without sending until the connection closes; prints JSON with "closed_after" (seconds).
  hold N: holds the connection for N seconds sending a message each 100 ms; prints JSON with "ok" and "echoed".
  On a refused handshake: prints JSON with "status" and "body".
"""
import asyncio
import json
import os
import ssl
import struct
import sys
import threading
import time
from http import HTTPStatus

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from peer_common import exit_with_parent

MAX = 8 << 20


BLOCK = os.urandom(128 * 1024)


async def handler(ws):
    headers = ws.request.headers
    await ws.send("hello %s %s %s" % (ws.request.path, headers.get("x-real-ip", "-"), headers.get("x-consumer-id", "-")))
    if ws.request.path.startswith("/flood"):
        # 64 MiB in 512 binary messages, each starting with the time it was sent: a client that reads late can tell
        # whether the sender was held back meanwhile (backpressure) or everything was buffered on the way.
        for _ in range(512):
            await ws.send(struct.pack("!d", time.time()) + BLOCK)
        await ws.close()
        return
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def refuse(connection, request):
    if request.path.startswith("/refuse"):
        return connection.respond(HTTPStatus.FORBIDDEN, "refused here\n")
    return None


async def run_server(port, cert=None, key=None):
    context = None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    async with serve(handler, "127.0.0.1", port, process_request=refuse, max_size=MAX, ssl=context):
        print("ready", flush=True)
        exit_with_parent()
        await asyncio.get_running_loop().create_future()


async def run_client(url, mode, argument, headers):
    result = {"ok": False}
    started = time.monotonic()
    try:
        async with connect(url, additional_headers=headers, max_size=MAX, open_timeout=10, ping_interval=None) as ws:
            result["hello"] = await asyncio.wait_for(ws.recv(), 10)
            if mode == "echo":
                sizes = []
                for size in [1, 125, 126, 65535, 65536, 1 << 20]:
                    for kind in ("text", "binary"):
                        payload = ("x" * size) if kind == "text" else bytes(i % 251 for i in range(size))
                        await ws.send(payload)
                        echoed = await asyncio.wait_for(ws.recv(), 20)
                        if echoed != payload:
                            result["mismatch"] = [kind, size]
                            print(json.dumps(result), flush=True)
                            return
                        sizes.append(size)
                result["sizes"] = sizes
                result["ok"] = True
            elif mode == "slow":
                # Reads nothing for 3 s, then everything: when was the last message sent, relative to that?
                await asyncio.sleep(3)
                started_reading = time.time()
                count = 0
                before = 0
                async for message in ws:
                    count += 1
                    if struct.unpack("!d", message[:8])[0] < started_reading:
                        before += 1
                result["messages"] = count
                result["sent_before_reading"] = before
                result["ok"] = count == 512
            elif mode == "idle":
                try:
                    await asyncio.wait_for(ws.recv(), 60)
                except ConnectionClosed:
                    pass
                result["closed_after"] = time.monotonic() - started
                result["ok"] = True
            elif mode == "hold":
                echoed = 0
                deadline = time.monotonic() + float(argument)
                while time.monotonic() < deadline:
                    await ws.send("tick")
                    if await asyncio.wait_for(ws.recv(), 10) == "tick":
                        echoed += 1
                    await asyncio.sleep(0.1)
                result["echoed"] = echoed
                result["ok"] = True
    except InvalidStatus as error:
        result["status"] = error.response.status_code
        result["body"] = (error.response.body or b"").decode(errors="replace")
    except ConnectionClosed as error:
        result["closed"] = str(error)
        result["closed_after"] = time.monotonic() - started
    except Exception as error:  # noqa: BLE001 - the test reads what went wrong
        result["error"] = "%s: %s" % (type(error).__name__, error)
    print(json.dumps(result), flush=True)


def main():
    if sys.argv[1] == "server":
        asyncio.run(run_server(int(sys.argv[2]), *sys.argv[3:5]))
        return
    url, mode = sys.argv[2], sys.argv[3]
    rest = sys.argv[4:]
    argument = rest.pop(0) if rest and not rest[0].startswith("--") else ""
    headers = []
    while rest:
        flag, value = rest.pop(0), rest.pop(0)
        if flag == "--header":
            name, _, text = value.partition("=")
            headers.append((name, text))
    asyncio.run(run_client(url, mode, argument, headers))


if __name__ == "__main__":
    main()
