import DemoUpstream
import Foundation
import Testing

@testable import Gatehouse

/// The gateway in front of a real upstream: forwarding, headers, streaming and upstream failures.
@Suite struct ProxyTests {
    @Test func forwardsAndReturnsTheUpstreamAnswer() async throws {
        try await Harness.run(Harness.basic) { h in
            let response = try await request(
                port: h.port, "/hello/world?b=2&a=1", headers: [("Accept", "application/json")])
            #expect(response.status == 200)
            let echo = response.json
            #expect(echo["path"] as? String == "/hello/world")
            #expect(echo["query"] as? String == "b=2&a=1")
            let headers = echo["headers"] as? [String: String] ?? [:]
            #expect(headers["accept"] == "application/json")
            #expect(headers["via"] == "1.1 gatehouse")
            #expect(headers["x-forwarded-for"] == "127.0.0.1")
            #expect(headers["x-forwarded-proto"] == "http")
            #expect(headers["x-forwarded-host"] == "test.local")
            #expect(headers["x-request-id"] == response.header("X-Request-ID"))
            #expect(response.header("Via") == "1.1 gatehouse")
        }
    }

    @Test func apiKeysAreNeverForwardedAndRequiredAuthRefusesStrangers() async throws {
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port,
                routes: """
                      - { id: private, match: { path_prefix: "/private/" }, upstream: demo, auth: required }
                      - { id: demo, match: { path_prefix: "/" }, upstream: demo }
                    auth:
                      api_key: { header: X-Api-Token, query_param: api_key }
                    """)
        }
        try await Harness.run(yaml) { h in
            let echo = try await request(port: h.port, "/x?api_key=secret&keep=1", headers: [("X-Api-Token", "secret")])
            let headers = echo.json["headers"] as? [String: String] ?? [:]
            #expect(headers["x-api-token"] == nil)
            #expect(echo.json["query"] as? String == "keep=1")
            let closed = try await request(port: h.port, "/private/data")
            #expect(closed.status == 401)
            #expect(h.upstream.requestCount == 1)
        }
    }

    @Test func directResponseRoute() async throws {
        try await Harness.run(Harness.basic) { h in
            let response = try await request(port: h.port, "/status")
            #expect(response.status == 200)
            #expect(response.text == "ok")
            #expect(response.header("Content-Type") == "text/plain")
            #expect(h.upstream.requestCount == 0)
        }
    }

    @Test func hopByHopAndSpoofedHeadersAreNotForwarded() async throws {
        try await Harness.run(Harness.basic) { h in
            let response = try await request(
                port: h.port, "/echo",
                headers: [
                    ("Connection", "X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "timeout=5"),
                    ("X-Consumer-ID", "admin"), ("Proxy-Authorization", "Basic Zm9v"), ("TE", "trailers"),
                    ("X-Forwarded-For", "6.6.6.6"), ("X-Request-ID", "client-id-42"), ("traceparent", "00-abc-def-01"),
                ])
            let headers = response.json["headers"] as? [String: String] ?? [:]
            for name in ["x-secret-hop", "keep-alive", "x-consumer-id", "proxy-authorization", "te", "connection"] {
                #expect(headers[name] == nil, "\(name) must not reach the upstream")
            }
            // 127.0.0.1 is not a trusted proxy in this config: the client's X-Forwarded-For is not believed.
            #expect(headers["x-forwarded-for"] == "127.0.0.1")
            #expect(headers["x-request-id"] == "client-id-42")
            #expect(response.header("X-Request-ID") == "client-id-42")
            #expect(headers["traceparent"] == "00-abc-def-01")
        }
    }

    @Test func trustedProxyForwardedForIsExtended() async throws {
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port, server: "  trusted_proxies: [\"127.0.0.1/32\"]",
                routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(yaml) { h in
            let response = try await request(
                port: h.port, "/echo", headers: [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https")])
            let headers = response.json["headers"] as? [String: String] ?? [:]
            #expect(headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1")
            #expect(headers["x-forwarded-proto"] == "https")
        }
    }

    @Test func keepAliveAndPipelinedRequestsAnswerInOrder() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                var batch = ""
                for index in 0..<5 {
                    let path = index == 2 ? "/status" : "/delay/\(50 - index * 10)?n=\(index)"
                    batch += "GET \(path) HTTP/1.1\r\nHost: test.local\r\n\r\n"
                }
                try await connection.send(batch)
                for index in 0..<5 {
                    let response = try await connection.readResponse()
                    #expect(response.status == 200)
                    if index == 2 {
                        #expect(response.text == "ok")
                    } else {
                        #expect(response.json["delayed_ms"] as? Int == 50 - index * 10)
                    }
                }
            }
        }
    }

    @Test func deepPipelinesWithBodiesAnswerInOrder() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                // ~150 KiB of pipelined requests: more than the gateway queues before it stops reading.
                let padding = String(repeating: "p", count: 400)
                var batch = ""
                for index in 0..<300 {
                    if index % 3 == 0 {
                        batch +=
                            "POST /count?n=\(index) HTTP/1.1\r\nHost: t\r\nX-Pad: \(padding)\r\nContent-Length: \(index)\r\n\r\n"
                        batch += String(repeating: "b", count: index)
                    } else if index % 3 == 1 {
                        batch += "GET /status HTTP/1.1\r\nHost: t\r\nX-Pad: \(padding)\r\n\r\n"
                    } else {
                        batch += "GET /echo?n=\(index) HTTP/1.1\r\nHost: t\r\nX-Pad: \(padding)\r\n\r\n"
                    }
                }
                try await connection.send(batch)
                for index in 0..<300 {
                    let response = try await connection.readResponse()
                    #expect(response.status == 200)
                    switch index % 3 {
                    case 0: #expect(response.json["bytes"] as? Int == index)
                    case 1: #expect(response.text == "ok")
                    default: #expect(response.json["query"] as? String == "n=\(index)")
                    }
                }
            }
        }
    }

    @Test func chunkedAndHeadResponsesPassThrough() async throws {
        try await Harness.run(Harness.basic) { h in
            let chunked = try await request(port: h.port, "/chunked/300000")
            #expect(chunked.status == 200)
            #expect(chunked.body.count == 300_000)
            let head = try await request(port: h.port, "/bytes/1234", method: "HEAD")
            #expect(head.status == 200)
            #expect(head.header("Content-Length") == "1234")
            let post = try await request(
                port: h.port, "/count", method: "POST", body: String(repeating: "a", count: 5000))
            #expect(post.json["bytes"] as? Int == 5000)
        }
    }

    @Test func expectContinueIsAnsweredBeforeTheBodyIsSent() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send(
                    "POST /count HTTP/1.1\r\nHost: test.local\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
                let interim = try await connection.readHead()
                #expect(interim.status == 100)
                try await connection.send("abcd")
                let response = try await connection.readResponse()
                #expect(response.json["bytes"] as? Int == 4)
            }
        }
    }

    @Test func absoluteFormNeverChoosesTheUpstreamHost() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send(
                    "GET http://169.254.169.254/latest?x=1 HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.json["path"] as? String == "/latest")
                #expect(h.upstream.requestCount == 1)
            }
        }
    }

    @Test func refusedUpstreamIs502ProblemJSON() async throws {
        let yaml = { (_: Int) in
            Harness.config(upstreamPort: 1, routes: "  - { id: dead, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(yaml) { h in
            let response = try await request(port: h.port, "/anything")
            #expect(response.status == 502)
            #expect(response.header("Content-Type") == "application/problem+json")
            #expect(response.json["status"] as? Int == 502)
            #expect(response.json["request_id"] as? String == response.header("X-Request-ID"))
        }
    }

    @Test func slowUpstreamIs504() async throws {
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port,
                routes: "  - { id: slow, match: { path_prefix: \"/\" }, upstream: demo, timeout: 200ms }")
        }
        try await Harness.run(yaml) { h in
            let started = ContinuousClock.now
            let response = try await request(port: h.port, "/delay/6000")
            #expect(response.status == 504)
            #expect(response.json["title"] as? String == "Gateway Timeout")
            #expect(ContinuousClock.now - started < .seconds(4), "at the route's 200 ms, not the upstream's 6 s")
        }
    }

    @Test func upstreamResetBeforeAnswerIs502() async throws {
        try await Harness.run(Harness.basic) { h in
            let response = try await request(port: h.port, "/drop")
            #expect(response.status == 502)
        }
    }

    @Test func truncatedUpstreamBodyClosesTheClientConnection() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send("GET /truncate/100000 HTTP/1.1\r\nHost: test.local\r\n\r\n")
                await #expect(throws: RawError.self) { try await connection.readResponse() }
                #expect(connection.closed)
            }
        }
    }

    @Test func chunkedUploadIsForwardedChunked() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send(
                    "POST /count HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n")
                try await connection.send("5\r\nhello\r\n")
                try await Task.sleep(for: .milliseconds(50))
                try await connection.send("6\r\n world\r\n0\r\n\r\n")
                let response = try await connection.readResponse()
                #expect(response.json["bytes"] as? Int == 11)
            }
        }
    }
}
