import DemoUpstream
import Foundation
import Testing

@testable import Gatehouse

/// OpenTelemetry tracing (SPEC §7), checked with a real OTLP/HTTP receiver (`Tests/peers/otlp_peer.py`) that
/// decodes what the gateway exports.
@Suite struct TracingTests {
    static func yaml(receiver: Int, ratio: String) -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port,
                routes: """
                      - id: traced
                        match: { path_prefix: "/traced" }
                        upstream: demo
                        auth: required
                        rate_limit: [per-consumer]
                        cache: { ttl: 30s }
                      - id: plain
                        match: { path_prefix: "/plain" }
                        upstream: demo
                    """
            ).replacingOccurrences(
                of: "upstreams:",
                with: """
                    tracing:
                      otlp_endpoint: "http://127.0.0.1:\(receiver)"
                      service_name: gh-test
                      sample_ratio: \(ratio)
                    consumers:
                      - { id: acme, api_keys: ["sha256:\(KeyDigest(key: "acme-key").hex)"] }
                    rate_limits:
                      per-consumer: { requests: 100, per: 1s }
                    upstreams:
                    """)
        }
    }

    /// The spans the receiver holds, polled until `done` says they are all there (export is batched).
    static func spans(_ receiver: Int, until done: ([[String: Any]]) -> Bool) async throws -> [[String: Any]] {
        var spans: [[String: Any]] = []
        for _ in 0..<60 {
            let answer = try await request(port: receiver, "/spans")
            spans = (try? JSONSerialization.jsonObject(with: Data(answer.body))) as? [[String: Any]] ?? []
            if done(spans) { return spans }
            try await Task.sleep(for: .milliseconds(100))
        }
        return spans
    }

    /// The `traceparent` the upstream received, from the echo.
    static func upstreamTraceparent(_ response: RawResponse) -> String? {
        (response.json["headers"] as? [String: String])?["traceparent"]
    }

    @Test func aRequestIsOneServerSpanWithAChildPerPhaseAndTheUpstreamSeesTheGatewaysSpan() async throws {
        try await PythonPeer.with("otlp_peer.py") { receiver in
            try await Harness.run(Self.yaml(receiver: receiver.port, ratio: "1.0")) { h in
                let response = try await request(
                    port: h.port, "/traced/items?x=1", headers: [("X-API-Key", "acme-key"), ("User-Agent", "test")])
                #expect(response.status == 200)
                let spans = try await Self.spans(receiver.port) { spans in
                    spans.contains { $0["kind"] as? String == "server" }
                }
                guard let server = spans.first(where: { $0["kind"] as? String == "server" }) else {
                    Issue.record("no server span among \(spans)")
                    return
                }
                let traceID = server["trace_id"] as? String ?? ""
                let serverID = server["span_id"] as? String ?? ""
                #expect(server["name"] as? String == "GET traced")
                #expect(server["service"] as? String == "gh-test")
                #expect(server["parent_span_id"] as? String == "")
                let attributes = server["attributes"] as? [String: Any] ?? [:]
                #expect(attributes["http.request.method"] as? String == "GET")
                #expect(attributes["http.response.status_code"] as? Int == 200)
                #expect(attributes["http.route"] as? String == "traced")
                #expect(attributes["url.path"] as? String == "/traced/items")
                #expect(attributes["gatehouse.consumer"] as? String == "acme")
                let cacheStatus = attributes["http.response.header.cache-status"] as? [String]
                #expect(cacheStatus?.first?.contains("fwd=miss") == true, "\(attributes)")

                // One child per phase, all in the server span's trace and under it.
                let children = spans.filter { $0["parent_span_id"] as? String == serverID }
                let names = Set(children.compactMap { $0["name"] as? String })
                #expect(names == ["authenticate", "rate limit", "cache lookup", "GET"], "\(names)")
                #expect(children.allSatisfy { $0["trace_id"] as? String == traceID })
                // The upstream's parent is the gateway's client span.
                let client = children.first { $0["kind"] as? String == "client" }
                let parent = Self.upstreamTraceparent(response) ?? ""
                #expect(parent == "00-\(traceID)-\(client?["span_id"] as? String ?? "?")-01", "\(parent)")
                let clientAttributes = client?["attributes"] as? [String: Any] ?? [:]
                #expect(clientAttributes["http.response.status_code"] as? Int == 200)
                // The receiver decoded every export it was sent (protobuf, by opentelemetry-proto's field numbers).
                let stats = try await request(port: receiver.port, "/stats").json
                #expect(stats["rejected"] as? Int == 0 && (stats["requests"] as? Int ?? 0) >= 1, "\(stats)")
            }
        }
    }

    @Test func samplingFollowsTheParentAndTheRatio() async throws {
        try await PythonPeer.with("otlp_peer.py") { receiver in
            try await Harness.run(Self.yaml(receiver: receiver.port, ratio: "0.0")) { h in
                let sampledTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
                let unsampledTrace = "0af7651916cd43dd8448eb211c80319c"
                // A sampled parent is followed, whatever the ratio.
                let sampled = try await request(
                    port: h.port, "/plain/a", headers: [("traceparent", "00-\(sampledTrace)-00f067aa0ba902b7-01")])
                #expect(Self.upstreamTraceparent(sampled)?.hasPrefix("00-\(sampledTrace)-") == true)
                #expect(Self.upstreamTraceparent(sampled)?.contains("00f067aa0ba902b7") == false)
                // An unsampled parent is never exported, and passes on as the client sent it.
                let unsampledParent = "00-\(unsampledTrace)-b7ad6b7169203331-00"
                let unsampled = try await request(
                    port: h.port, "/plain/b", headers: [("traceparent", unsampledParent)])
                #expect(Self.upstreamTraceparent(unsampled) == unsampledParent)
                // Without a parent, sample_ratio 0 exports nothing.
                let none = try await request(port: h.port, "/plain/c")
                #expect(Self.upstreamTraceparent(none) == nil)

                _ = try await Self.spans(receiver.port) { spans in
                    spans.contains { $0["kind"] as? String == "server" }
                }
                // Give a wrongly exported span time to arrive too.
                try await Task.sleep(for: .milliseconds(1200))
                let all = try await Self.spans(receiver.port) { _ in true }
                let servers = all.filter { $0["kind"] as? String == "server" }
                #expect(servers.count == 1, "\(servers)")
                #expect(servers.first?["trace_id"] as? String == sampledTrace)
                #expect(servers.first?["parent_span_id"] as? String == "00f067aa0ba902b7")
                #expect(all.allSatisfy { $0["trace_id"] as? String == sampledTrace })
            }
        }
    }
}

extension TracingTests {
    /// A collector that is not there: requests are answered as before, and the spans it could not take are
    /// counted as dropped, not kept.
    @Test func spansACollectorCannotTakeAreDroppedAndCounted() async throws {
        let closed = PortHold.anyFreePort()
        try await Harness.run(Self.yaml(receiver: closed, ratio: "1.0")) { h in
            for index in 0..<20 {
                #expect(try await request(port: h.port, "/plain/\(index)").status == 200)
            }
            var dropped = 0
            for _ in 0..<50 where dropped < 40 {
                try await Task.sleep(for: .milliseconds(100))
                let metrics = try await request(port: h.adminPort, "/metrics").text
                let line = metrics.split(separator: "\n").first {
                    $0.hasPrefix("gatehouse_tracing_spans_dropped_total")
                }
                dropped = line.flatMap { $0.split(separator: " ").last }.flatMap { Int(Double($0) ?? 0) } ?? 0
            }
            // Two spans per request (server and upstream attempt), none of them exported.
            #expect(dropped == 40, "dropped \(dropped)")
        }
    }
}
