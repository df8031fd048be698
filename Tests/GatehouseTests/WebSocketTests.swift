import Foundation
import GatehouseConfig
import Logging
import NIOCore
import Testing

@testable import Gatehouse

/// WebSocket through the gateway with a real client and server (Python's websockets, `Tests/peers/ws_peer.py`):
/// the handshake passes auth and limits, messages of 1 B to 1 MiB echo both ways, refusals are relayed, idle
/// tunnels close, and a drain lets open tunnels finish.
@Suite(.serialized) struct WebSocketTests {
    static func yaml(_ wsURL: String, server: String = "") -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port, server: server,
                upstream: """
                      ws:
                        targets: [{ url: "\(wsURL)" }]
                        tls: { verify: false }
                        connect_timeout: 5s  # a TLS handshake on a loaded test machine
                    """,
                routes: """
                      - { id: private, match: { path_prefix: "/private/" }, upstream: ws, websocket: true, auth: required, rate_limit: [two] }
                      - { id: plain, match: { path_prefix: "/plain/" }, upstream: ws }
                      - { id: ws, match: { path_prefix: "/" }, upstream: ws, websocket: true }
                    consumers:
                      - { id: acme, api_keys: ["sha256:\(KeyDigest(key: "ws-key").hex)"] }
                    rate_limits:
                      two: { requests: 2, per: 1h, by: consumer }
                    """)
        }
    }

    static func client(_ url: String, _ arguments: [String]) async throws -> [String: Any] {
        try await PythonPeer.client("ws_peer.py", [url] + arguments)
    }

    /// 1 B to 1 MiB, text and binary, each echoed back intact.
    static let allSizes = [1, 1, 125, 125, 126, 126, 65535, 65535, 65536, 65536, 1 << 20, 1 << 20]

    @Test func messagesEchoThroughTheTunnelAfterAuthAndLimits() async throws {
        try await PythonPeer.with("ws_peer.py") { server in
            try await Harness.run(Self.yaml("http://127.0.0.1:\(server.port)")) { h in
                let base = "ws://127.0.0.1:\(h.port)"
                let open = try await Self.client(base + "/chat", ["echo"])
                #expect(open["ok"] as? Bool == true, "\(open)")
                #expect(open["sizes"] as? [Int] == Self.allSizes)
                // The upstream saw the request as any forwarded one: the path, and X-Real-IP set by the gateway.
                #expect(open["hello"] as? String == "hello /chat 127.0.0.1 -")

                // Authentication and the rate limit apply to the handshake.
                let anonymous = try await Self.client(base + "/private/x", ["echo"])
                #expect(anonymous["status"] as? Int == 401)
                #expect((anonymous["body"] as? String)?.contains("\"status\":401") == true, "problem+json")
                for _ in 0..<2 {
                    let allowed = try await Self.client(base + "/private/x", ["echo", "--header", "x-api-key=ws-key"])
                    #expect(allowed["ok"] as? Bool == true, "\(allowed)")
                    #expect(allowed["hello"] as? String == "hello /private/x 127.0.0.1 acme")
                }
                let limited = try await Self.client(base + "/private/x", ["echo", "--header", "x-api-key=ws-key"])
                #expect(limited["status"] as? Int == 429)
            }
        }
    }

    @Test func refusalsAreRelayedAndOtherRoutesDoNotUpgrade() async throws {
        try await PythonPeer.with("ws_peer.py") { server in
            try await Harness.run(Self.yaml("http://127.0.0.1:\(server.port)")) { h in
                let base = "ws://127.0.0.1:\(h.port)"
                let refused = try await Self.client(base + "/refuse", ["echo"])
                #expect(refused["status"] as? Int == 403)
                #expect(refused["body"] as? String == "refused here\n")
                // On a route without `websocket: true` the upgrade is not forwarded: the server sees a plain GET
                // and answers 426 Upgrade Required.
                let plain = try await Self.client(base + "/plain/x", ["echo"])
                #expect(plain["status"] as? Int == 426)
            }
            // No upstream listening: 502 before any 101.
            try await Harness.run(Self.yaml("http://127.0.0.1:\(PortHold.anyFreePort())")) { h in
                let gone = try await Self.client("ws://127.0.0.1:\(h.port)/chat", ["echo"])
                #expect(gone["status"] as? Int == 502 || gone["status"] as? Int == 503, "\(gone)")
            }
        }
    }

    @Test func overTLSToTheUpstreamToo() async throws {
        let (cert, key) = try await TLSTests.makeCertificate()
        try await PythonPeer.with("ws_peer.py", extra: [cert, key]) { server in
            try await Harness.run(Self.yaml("https://localhost:\(server.port)")) { h in
                let open = try await Self.client("ws://127.0.0.1:\(h.port)/secure", ["echo"])
                #expect(open["ok"] as? Bool == true, "\(open)")
                #expect(open["sizes"] as? [Int] == Self.allSizes)
            }
        }
    }

    @Test func aClientThatDoesNotReadHoldsTheUpstreamBack() async throws {
        try await PythonPeer.with("ws_peer.py") { server in
            try await Harness.run(Self.yaml("http://127.0.0.1:\(server.port)")) { h in
                // The upstream sends 64 MiB in 512 messages; the client reads nothing for 3 s. With backpressure the
                // upstream is held back once the buffers on the way are full (measured: 69 messages, 8.6 MiB, with no
                // gateway in between); a gateway that reads on regardless took 410 (51 MiB) into its memory.
                let slow = try await Self.client("ws://127.0.0.1:\(h.port)/flood", ["slow"])
                #expect(slow["ok"] as? Bool == true, "\(slow)")
                let before = slow["sent_before_reading"] as? Int ?? 512
                #expect(before < 200, "\(before) of 512 messages were sent before the client read")
            }
        }
    }

    @Test func anIdleTunnelIsClosedAndABusyOneIsNot() async throws {
        try await PythonPeer.with("ws_peer.py") { server in
            let yaml = Self.yaml(
                "http://127.0.0.1:\(server.port)", server: "  limits: { websocket_idle_timeout: 1s }")
            try await Harness.run(yaml) { h in
                async let busy = Self.client("ws://127.0.0.1:\(h.port)/busy", ["hold", "2.5"])
                let idle = try await Self.client("ws://127.0.0.1:\(h.port)/idle", ["idle"])
                let after = idle["closed_after"] as? Double ?? 99
                #expect(after >= 0.9 && after < 4, "closed after \(after) s")
                let held = try await busy
                #expect(held["ok"] as? Bool == true, "a tunnel with traffic outlives the idle timeout: \(held)")
                #expect((held["echoed"] as? Int ?? 0) >= 15)
            }
        }
    }

    @Test func aDrainLetsOpenTunnelsFinish() async throws {
        try await PythonPeer.with("ws_peer.py") { server in
            let gateway = try await Harness.startGateway(
                Self.yaml("http://127.0.0.1:\(server.port)", server: "  drain_timeout: 10s")(1))
            let port = gateway.localAddress?.port ?? 0
            async let held = Self.client("ws://127.0.0.1:\(port)/drain", ["hold", "2"])
            try await Task.sleep(for: .milliseconds(700))
            let started = ContinuousClock.now
            await gateway.shutdown()
            let result = try await held
            #expect(result["ok"] as? Bool == true, "the tunnel kept working through the drain: \(result)")
            #expect((result["echoed"] as? Int ?? 0) >= 12)
            #expect(ContinuousClock.now - started >= .milliseconds(800), "the drain waited for the tunnel")
        }
    }
}
