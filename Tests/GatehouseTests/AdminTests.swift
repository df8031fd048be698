import DemoUpstream
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import Testing

@testable import Gatehouse

/// The admin API, reloads and draining.
@Suite struct AdminTests {
    static func withToken(_ port: Int) -> String {
        Harness.config(
            upstreamPort: port, upstream: "    request_headers: { set: { Authorization: \"Bearer partner-key\" } }",
            routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }"
        ).replacingOccurrences(
            of: "admin:\n  listen: \"127.0.0.1:0\"", with: "admin:\n  listen: \"127.0.0.1:0\"\n  token: \"s3cret\"")
    }

    @Test func healthReadyMetricsAndConfig() async throws {
        try await Harness.run(Harness.basic) { h in
            #expect(try await request(port: h.adminPort, "/healthz").text == "{\"status\":\"ok\"}")
            #expect(try await request(port: h.adminPort, "/readyz").status == 200)
            _ = try await request(port: h.port, "/status")
            _ = try await request(port: h.port, "/nowhere/x")
            let metrics = try await request(port: h.adminPort, "/metrics").text
            #expect(metrics.contains("gatehouse_requests_total{route=\"status\",status=\"200\"} 1"))
            #expect(metrics.contains("gatehouse_request_duration_seconds_bucket{route=\"status\""))
            #expect(!metrics.contains("/nowhere"), "metrics must not be labelled by raw path")
            let config = try await request(port: h.adminPort, "/config").json
            #expect((config["routes"] as? [[String: Any]])?.count == 2)
            #expect(try await request(port: h.adminPort, "/nothing").status == 404)
        }
    }

    @Test func tokenGuardsEverythingButHealthAndSecretsAreRedacted() async throws {
        try await Harness.run(Self.withToken) { h in
            #expect(try await request(port: h.adminPort, "/healthz").status == 200)
            let denied = try await request(port: h.adminPort, "/config")
            #expect(denied.status == 401)
            #expect(denied.header("WWW-Authenticate")?.hasPrefix("Bearer") == true)
            #expect(
                try await request(port: h.adminPort, "/config", headers: [("Authorization", "Bearer wrong")]).status
                    == 401)
            let config = try await request(port: h.adminPort, "/config", headers: [("Authorization", "Bearer s3cret")])
            #expect(config.status == 200)
            #expect(!config.text.contains("s3cret"))
            #expect(!config.text.contains("partner-key"))
            #expect(config.text.contains("<redacted>"))
            // The secret header still reaches the upstream.
            let echo = try await request(port: h.port, "/x").json["headers"] as? [String: String]
            #expect(echo?["authorization"] == "Bearer partner-key")
        }
    }

    @Test func reloadSwapsTheConfigAndABadFileKeepsTheOldOne() async throws {
        try await Harness.run(Harness.basic) { h in
            #expect(try await request(port: h.port, "/status").text == "ok")
            let original = try String(contentsOfFile: h.configPath, encoding: .utf8)
            try original.replacingOccurrences(of: "body: \"ok\"", with: "body: \"reloaded\"")
                .write(toFile: h.configPath, atomically: true, encoding: .utf8)
            let reload = try await request(port: h.adminPort, "/reload", method: "POST", body: "")
            #expect(reload.status == 200)
            #expect(try await request(port: h.port, "/status").text == "reloaded")

            try (original + "\n    bogus_key: 1").write(toFile: h.configPath, atomically: true, encoding: .utf8)
            let rejected = try await request(port: h.adminPort, "/reload", method: "POST", body: "")
            #expect(rejected.status == 400)
            #expect(rejected.header("Content-Type") == "application/problem+json")
            #expect((rejected.json["errors"] as? [String])?.first?.contains("bogus_key") == true)
            #expect(try await request(port: h.port, "/status").text == "reloaded")
        }
    }

    @Test func requestsInFlightFinishOnTheConfigTheyStartedWith() async throws {
        try await Harness.run(Harness.basic) { h in
            async let slow = request(port: h.port, "/delay/400")
            // Reload only once the request is under way at the upstream.
            try await waitUntil { h.upstream.requestCount == 1 }
            let original = try String(contentsOfFile: h.configPath, encoding: .utf8)
            try original.replacingOccurrences(of: "path_prefix: \"/\"", with: "path_prefix: \"/other/\"")
                .write(toFile: h.configPath, atomically: true, encoding: .utf8)
            try h.gateway.reload()
            #expect(try await slow.status == 200)
            #expect(try await request(port: h.port, "/delay/1").status == 404)
        }
    }

    @Test func shutdownDrainsInFlightRequests() async throws {
        let upstream = try await DemoUpstream.start()
        let yaml = Harness.basic(upstream.port)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("drain-\(UUID().uuidString).yaml").path
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let gateway = Gateway(
            config: try ConfigLoader.load(path: path), reload: { try ConfigLoader.load(path: path) }, logger: logger)
        try await gateway.start()
        let port = gateway.localAddress?.port ?? 0
        async let slow = request(port: port, "/delay/500")
        try await waitUntil { upstream.requestCount == 1 }
        await gateway.shutdown()
        #expect(try await slow.status == 200)
        await #expect(throws: (any Error).self) { try await request(port: port, "/status") }
        await upstream.stop()
    }
}
