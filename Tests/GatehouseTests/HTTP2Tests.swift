import DemoUpstream
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import Testing

@testable import Gatehouse

/// HTTP/2 to clients, checked with real clients (curl, h2load): h2c with prior knowledge and h2 by ALPN, every
/// phase per stream, and HTTP/1.1 on the same port as before.
@Suite struct HTTP2Tests {
    /// Routes that exercise the corridor per stream: forwarding, an API key with a rate limit, and a direct answer.
    static func yaml(_ port: Int, server: String = "") -> String {
        Harness.config(
            upstreamPort: port, server: server,
            routes: """
                  - { id: status, match: { path: "/status" }, respond: { status: 200, body: "ok" } }
                  - { id: private, match: { path_prefix: "/private/" }, upstream: demo, auth: required, rate_limit: [two] }
                  - { id: demo, match: { path_prefix: "/" }, upstream: demo }
                consumers:
                  - { id: acme, api_keys: ["sha256:\(KeyDigest(key: "h2-key").hex)"] }
                rate_limits:
                  two: { requests: 2, per: 1h, by: consumer }
                """)
    }

    /// Runs curl; returns the protocol version it used, the status, the headers and the body.
    static func curl(_ arguments: [String]) async throws -> (
        version: String, status: Int, headers: String, body: String
    ) {
        let directory = FileManager.default.temporaryDirectory
        let headerFile = directory.appendingPathComponent("h2-headers-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: headerFile) }
        let (code, out, error) = try await ChildProcess.run(
            "/usr/bin/curl",
            ["-sS", "--max-time", "10", "-D", headerFile, "-w", "\n%{http_version} %{http_code}"] + arguments)
        #expect(code == 0, "curl: \(error)")
        let lines = out.split(separator: "\n", omittingEmptySubsequences: false)
        let last = lines.last.map(String.init) ?? ""
        let parts = last.split(separator: " ")
        let headers = (try? String(contentsOfFile: headerFile, encoding: .utf8)) ?? ""
        return (
            parts.first.map(String.init) ?? "", parts.count > 1 ? Int(parts[1]) ?? 0 : 0, headers.lowercased(),
            lines.dropLast().joined(separator: "\n")
        )
    }

    @Test func h2cWithPriorKnowledgeRunsEveryPhasePerStream() async throws {
        try await Harness.run({ Self.yaml($0) }) { h in
            let base = "http://127.0.0.1:\(h.port)"
            let forwarded = try await Self.curl(["--http2-prior-knowledge", base + "/users/7?q=1"])
            #expect(forwarded.version == "2")
            #expect(forwarded.status == 200)
            #expect(forwarded.headers.contains("x-request-id:"))
            #expect(forwarded.headers.contains("via: 1.1 gatehouse"))
            #expect(!forwarded.headers.contains("connection:"), "HTTP/2 has no connection-specific headers")
            let echo = try JSONSerialization.jsonObject(with: Data(forwarded.body.utf8)) as? [String: Any]
            #expect(echo?["path"] as? String == "/users/7")

            let direct = try await Self.curl(["--http2-prior-knowledge", base + "/status"])
            #expect(direct.version == "2" && direct.status == 200 && direct.body == "ok")

            // Authentication and the rate limit apply per stream, as on HTTP/1.1.
            let anonymous = try await Self.curl(["--http2-prior-knowledge", base + "/private/x"])
            #expect(anonymous.status == 401)
            #expect(anonymous.headers.contains("content-type: application/problem+json"))
            let key = ["-H", "X-API-Key: h2-key"]
            var statuses: [Int] = []
            for _ in 0..<3 {
                statuses.append(try await Self.curl(["--http2-prior-knowledge"] + key + [base + "/private/x"]).status)
            }
            #expect(statuses == [200, 200, 429])

            // A request body streams through a stream as through a connection.
            let body = String(repeating: "0123456789abcdef", count: 64 * 1024)
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("h2-body-\(UUID().uuidString)")
            try body.write(to: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: file) }
            let echoed = try await Self.curl(
                ["--http2-prior-knowledge", "--data-binary", "@" + file.path, base + "/echo-body"])
            #expect(echoed.version == "2" && echoed.status == 200)
            #expect(echoed.body.count == body.utf8.count)

            // HTTP/1.1 on the same port, as before.
            let plain = try await Self.curl(["--http1.1", base + "/status"])
            #expect(plain.version == "1.1" && plain.status == 200 && plain.body == "ok")
        }
    }

    @Test func h2ByALPNOnTLSAndHTTP11ForClientsThatDoNotAsk() async throws {
        let (cert, key) = try await TLSTests.makeCertificate()
        let tls = "  tls: { cert: \"\(cert)\", key: \"\(key)\" }"
        try await Harness.run({ Self.yaml($0, server: tls) }) { h in
            let url = "https://localhost:\(h.port)/status"
            let h2 = try await Self.curl(["--http2", "--cacert", cert, url])
            #expect(h2.version == "2" && h2.status == 200 && h2.body == "ok")
            let h1 = try await Self.curl(["--http1.1", "--cacert", cert, url])
            #expect(h1.version == "1.1" && h1.status == 200 && h1.body == "ok")
        }
    }

    @Test func http2OffServesHTTP11Only() async throws {
        try await Harness.run({ Self.yaml($0, server: "  http2: false") }) { h in
            let (code, _, _) = try await ChildProcess.run(
                "/usr/bin/curl",
                ["-sS", "--max-time", "5", "--http2-prior-knowledge", "http://127.0.0.1:\(h.port)/status"])
            #expect(code != 0, "an h2c preface is not HTTP/1.1")
            let plain = try await Self.curl(["--http1.1", "http://127.0.0.1:\(h.port)/status"])
            #expect(plain.status == 200)
        }
    }

    @Test func manyConcurrentStreamsOnFewConnections() async throws {
        try await Harness.run({ Self.yaml($0, server: "  limits: { max_concurrent_streams: 8 }") }) { h in
            let (code, out, error) = try await ChildProcess.run(
                "/usr/bin/h2load", ["-n", "400", "-c", "2", "-m", "20", "http://127.0.0.1:\(h.port)/users/1"])
            #expect(code == 0, "h2load: \(error)")
            #expect(out.contains("400 succeeded, 0 failed, 0 errored"), "\(out)")
            #expect(out.contains("status codes: 400 2xx"), "\(out)")
        }
    }

    /// `Tests/attacks/h2_attacks.py`: raw-frame HTTP/2 attacks (Python, hyperframe and hpack).
    static let attackScript = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("attacks/h2_attacks.py").path

    @Test func rapidResetAndContinuationFloodsCloseOnlyTheAttackersConnection() async throws {
        try await Harness.run({ Self.yaml($0) }) { h in
            for kind in ["rapid-reset", "continuation"] {
                // A client that keeps a connection of its own open meanwhile.
                async let bystander = Self.curl(["--http2-prior-knowledge", "http://127.0.0.1:\(h.port)/delay/300"])
                let (code, out, error) = try await ChildProcess.run(
                    "/usr/bin/env", ["python3", Self.attackScript, kind, String(h.port)])
                #expect(code == 0, "\(kind): \(error)")
                let result = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
                let sent = result?["sent"] as? Int ?? 0
                let total = result?["of"] as? Int ?? 0
                print("h2 \(kind): the gateway closed the connection after \(sent) of \(total) frames: \(out)")
                #expect(result?["closed"] as? Bool == true, "\(kind): \(out)")
                #expect(sent < total, "\(kind): the whole attack was taken in")
                #expect(try await bystander.status == 200, "\(kind): another connection was hurt")
                let after = try await Self.curl(["--http2-prior-knowledge", "http://127.0.0.1:\(h.port)/status"])
                #expect(after.status == 200, "\(kind): the gateway stopped serving")
            }
            // Streams reset at once are not all forwarded: the connection ends long before 20,000 reach the upstream.
            #expect(h.upstream.requestCount < 2000, "\(h.upstream.requestCount) requests reached the upstream")
        }
    }

    @Test func drainLetsStreamsInFlightFinish() async throws {
        let upstream = try await DemoUpstream.start()
        let gateway = try await Harness.startGateway(Self.yaml(upstream.port))
        let port = gateway.localAddress?.port ?? 0
        async let slow = Self.curl(["--http2-prior-knowledge", "http://127.0.0.1:\(port)/delay/500"])
        try await waitUntil { upstream.requestCount == 1 }
        let started = ContinuousClock.now
        await gateway.shutdown()
        let answer = try await slow
        #expect(answer.version == "2" && answer.status == 200, "the stream in flight finished")
        #expect(ContinuousClock.now - started < .seconds(5), "a GOAWAY, not the whole drain_timeout")
        await upstream.stop()
    }

    /// Runs a mode of the raw-frame script and returns its JSON summary.
    static func raw(_ mode: String, port: Int) async throws -> [String: Any] {
        let (code, out, error) = try await ChildProcess.run(
            "/usr/bin/env", ["python3", attackScript, mode, String(port)])
        #expect(code == 0, "\(mode): \(error)")
        print("h2 \(mode): \(out)")
        return (try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]) ?? [:]
    }

    @Test func aStreamErrorResetsThatStreamOnly() async throws {
        try await Harness.run({ Self.yaml($0) }) { h in
            let result = try await Self.raw("stream-error", port: h.port)
            #expect(result["good"] as? String == "headers", "the other stream was answered")
            #expect((result["bad"] as? String)?.hasPrefix("reset") == true, "the bad stream was reset")
            #expect(result["goaway"] is NSNull && result["closed"] as? Bool == false, "the connection lives on")
        }
    }

    @Test func anIdleConnectionIsClosedAfterTheIdleTimeout() async throws {
        try await Harness.run({ Self.yaml($0, server: "  limits: { idle_timeout: 1s }") }) { h in
            let result = try await Self.raw("idle", port: h.port)
            #expect(result["closed"] as? Bool == true)
            #expect((result["seconds"] as? Double ?? 99) < 5)
        }
    }

    @Test func splitCookiesReachTheUpstreamAsOneHeader() async throws {
        try await Harness.run({ Self.yaml($0) }) { h in
            let answer = try await Self.curl(
                ["--http2-prior-knowledge", "-H", "Cookie: a=1", "-H", "Cookie: b=2", "http://127.0.0.1:\(h.port)/c"])
            let echo = try JSONSerialization.jsonObject(with: Data(answer.body.utf8)) as? [String: Any]
            #expect((echo?["headers"] as? [String: String])?["cookie"] == "a=1; b=2")
        }
    }

    /// Server-sent events pass unbuffered, over HTTP/1.1 and HTTP/2: the first event reaches the client long before
    /// the upstream ends the stream (4 events, 300 ms apart).
    @Test func serverSentEventsArriveAsTheyAreSent() async throws {
        try await Harness.run({ Self.yaml($0) }) { h in
            for version in ["--http1.1", "--http2-prior-knowledge"] {
                let file = FileManager.default.temporaryDirectory.appendingPathComponent("sse-\(UUID().uuidString)")
                    .path
                defer { try? FileManager.default.removeItem(atPath: file) }
                let started = ContinuousClock.now
                async let stream = ChildProcess.run(
                    "/usr/bin/curl",
                    ["-sS", "-N", "--max-time", "10", version, "-o", file, "http://127.0.0.1:\(h.port)/events/4"])
                var firstEvent: Duration?
                while firstEvent == nil, ContinuousClock.now - started < .seconds(5) {
                    if (try? String(contentsOfFile: file, encoding: .utf8))?.contains("data: event 1") == true {
                        firstEvent = ContinuousClock.now - started
                    }
                    try await Task.sleep(for: .milliseconds(5))
                }
                let (code, _, error) = try await stream
                let ended = ContinuousClock.now - started
                #expect(code == 0, "curl: \(error)")
                let body = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
                #expect(body.contains("data: event 4"), "\(body)")
                print(
                    "SSE \(version): first event after \(firstEvent.map { "\($0)" } ?? "never"), the end after \(ended)"
                )
                #expect(ended >= .milliseconds(850), "the upstream spreads 4 events over 900 ms")
                #expect((firstEvent ?? ended) < ended - .milliseconds(500), "the first event waited for the stream")
            }
        }
    }
}
