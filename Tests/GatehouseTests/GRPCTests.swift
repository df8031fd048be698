import Foundation
import GatehouseConfig
import Testing

@testable import Gatehouse

/// gRPC through the gateway with a real client and server (Python's grpcio, `Tests/peers/grpc_peer.py`): the four
/// call kinds over h2c and over TLS with ALPN, trailers relayed, gateway-made errors as gRPC statuses,
/// `grpc-timeout`, and nothing cached.
@Suite(.serialized) struct GRPCTests {
    struct Result {
        var code: String
        var details: String
        var messages: [Any]
        var trailers: [String: String]
    }

    /// One call by the grpcio client through the gateway at `port`.
    static func call(_ port: Int, _ arguments: [String]) async throws -> Result {
        let object = try await PythonPeer.client("grpc_peer.py", ["127.0.0.1:\(port)"] + arguments)
        return Result(
            code: object["code"] as? String ?? "(no answer: \(object))",
            details: object["details"] as? String ?? "",
            messages: object["messages"] as? [Any] ?? [],
            trailers: object["trailers"] as? [String: String] ?? [:])
    }

    static func yaml(_ grpcURL: String, protocol: String, extra: String = "") -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port,
                upstream: """
                      grpc:
                        protocol: \(`protocol`)
                        targets: [{ url: "\(grpcURL)" }]
                        tls: { verify: false }
                        connect_timeout: 5s  # a TLS handshake on a loaded test machine
                    \(extra)
                    """,
                routes: """
                      - { id: limited, match: { path_prefix: "/limited/" }, upstream: grpc, auth: required, rate_limit: [one] }
                      - { id: slow, match: { path_prefix: "/echo.Echo/" }, upstream: grpc, timeout: 10s, cache: { ttl: 1m } }
                    consumers:
                      - { id: acme, api_keys: ["sha256:\(KeyDigest(key: "grpc-key").hex)"] }
                    rate_limits:
                      one: { requests: 1, per: 1h, by: consumer }
                    """)
        }
    }

    /// The four call kinds, and what passes with them.
    static func checkCallKinds(_ port: Int) async throws {
        let unary = try await call(port, ["unary", "hello"])
        #expect(unary.code == "OK")
        #expect(unary.messages as? [String] == ["hello"])
        #expect(unary.trailers["x-peer-trailer"] == "yes", "the upstream's trailers reach the client")

        let server = try await call(port, ["server", "5"])
        #expect(server.code == "OK")
        #expect(server.messages as? [String] == ["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"])

        // Client streaming: 40 messages of 64 KiB pass with flow control on both hops.
        let client = try await call(port, ["client", "--count", "40", "--size", "65536"])
        #expect(client.code == "OK")
        #expect(client.messages as? [String] == ["40:\(40 * 65536)"])

        // Bidirectional: each message is sent only after the answer to the one before arrived, so a gateway that
        // buffered either direction would stall.
        let bidi = try await call(port, ["bidi", "--count", "20", "--size", "1000"])
        #expect(bidi.code == "OK")
        #expect(bidi.messages as? [Int] == Array(repeating: 1000, count: 20))
        #expect(bidi.trailers["x-peer-trailer"] == "yes")

        // The upstream's own error status passes (it is a trailers-only answer).
        let failed = try await call(port, ["unary", "fail"])
        #expect(failed.code == "NOT_FOUND")
        #expect(failed.details == "no such thing")
    }

    @Test func theFourCallKindsPassOverH2c() async throws {
        try await PythonPeer.with("grpc_peer.py") { server in
            try await Self.checkEverything(Self.yaml("http://127.0.0.1:\(server.port)", protocol: "http2"))
        }
    }

    @Test func theFourCallKindsPassOverTLSWithALPN() async throws {
        let (cert, key) = try await TLSTests.makeCertificate()
        try await PythonPeer.with("grpc_peer.py", extra: [cert, key]) { server in
            try await Self.checkEverything(Self.yaml("https://localhost:\(server.port)", protocol: "auto"))
        }
    }

    /// The call kinds, then 300 calls at once, none lost (over h2c each goes on a connection of its own).
    static func checkEverything(_ yaml: (Int) -> String) async throws {
        try await Harness.run(yaml) { h in
            try await checkCallKinds(h.port)
            let load = try await call(h.port, ["load", "300"])
            #expect(load.messages.first as? [String: Int] == ["OK": 300])
        }
    }

    @Test func gatewayErrorsAreGRPCStatuses() async throws {
        let server = try await PythonPeer("grpc_peer.py")
        do {
            try await Harness.run(Self.yaml("http://127.0.0.1:\(server.port)", protocol: "http2")) { h in
                // 404 -> UNIMPLEMENTED: no route. Trailers-only: HTTP 200, the status in the one header block.
                let missing = try await Self.callPath(h.port, "/nowhere.Service/Call")
                #expect(missing.contains("grpc-status: 12"), "\(missing)")
                #expect(missing.contains("grpc-message: no route matches this request."))
                #expect(missing.contains("http/2 200"))
                #expect(!missing.contains("problem+json"))

                // 401 -> UNAUTHENTICATED, 429 -> RESOURCE_EXHAUSTED, with the rate-limit headers.
                let anonymous = try await Self.callPath(h.port, "/limited/Call")
                #expect(anonymous.contains("grpc-status: 16"), "\(anonymous)")
                let first = try await Self.callPath(h.port, "/limited/Call", key: "grpc-key")
                #expect(!first.contains("grpc-status: 16") && !first.contains("grpc-status: 8"))
                let second = try await Self.callPath(h.port, "/limited/Call", key: "grpc-key")
                #expect(second.contains("grpc-status: 8"), "\(second)")
                #expect(second.contains("grpc-message: over the rate limit"))
                #expect(second.contains("ratelimit:"))
            }
            // 502/503 -> UNAVAILABLE: the upstream is gone.
            await server.stop()
            try await Harness.run(Self.yaml("http://127.0.0.1:\(server.port)", protocol: "http2")) { h in
                let gone = try await Self.call(h.port, ["unary", "x"])
                #expect(gone.code == "UNAVAILABLE")
            }
        } catch {
            await server.stop()
            throw error
        }
    }

    /// A gRPC request by curl to `path` with one message; returns the headers and trailers it saw, lower-cased.
    static func callPath(
        _ port: Int, _ path: String, key: String? = nil, message: String = "", headers: [String] = []
    ) async throws -> String {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("grpc-msg-\(UUID().uuidString)")
        let length = UInt32(message.utf8.count)
        try Data(
            [0, UInt8(length >> 24), UInt8((length >> 16) & 0xFF), UInt8((length >> 8) & 0xFF), UInt8(length & 0xFF)]
                + Array(message.utf8)
        ).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        var arguments = [
            "-sS", "--max-time", "10", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
            "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@" + file.path,
        ]
        if let key { arguments += ["-H", "x-api-key: \(key)"] }
        for header in headers { arguments += ["-H", header] }
        let (status, out, error) = try await ChildProcess.run(
            "/usr/bin/curl", arguments + ["http://127.0.0.1:\(port)\(path)"])
        #expect(status == 0, "curl: \(error)")
        return out.lowercased()
    }

    @Test func aShorterGRPCTimeoutWinsAndCallsAreNeverCached() async throws {
        let server = try await PythonPeer("grpc_peer.py")
        do {
            try await Harness.run(Self.yaml("http://127.0.0.1:\(server.port)", protocol: "http2")) { h in
                // The route allows 10 s; the call's grpc-timeout of 300 ms ends it at the gateway: DEADLINE_EXCEEDED
                // from the gateway itself (curl waits up to 10 s), in well under the 3 s the upstream would take.
                let started = Date()
                let late = try await Self.callPath(
                    h.port, "/echo.Echo/Unary", message: "sleep:3000", headers: ["grpc-timeout: 300m"])
                let elapsed = Date().timeIntervalSince(started)
                #expect(late.contains("grpc-status: 4"), "\(late)")
                #expect(elapsed < 2.5, "answered after \(elapsed) s")
                // Without one, the same call completes.
                let patient = try await Self.call(h.port, ["unary", "sleep:500"])
                #expect(patient.code == "OK")

                // The route caches, but a call is never a hit, however often it is made.
                for _ in 0..<2 {
                    let answer = try await Self.callPath(h.port, "/echo.Echo/Unary", message: "same")
                    #expect(answer.contains("grpc-status: 0"))
                    #expect(!answer.contains("hit"), "\(answer)")
                }
            }
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
