import DemoUpstream
import Foundation
import Testing

@testable import Gatehouse

/// SPEC §6 rows this gateway answers itself, sent over raw sockets where a client library would refuse.
@Suite struct ProtocolErrorTests {
    static func limited(_ port: Int) -> String {
        Harness.config(
            upstreamPort: port,
            server:
                "  limits: { max_header_bytes: 2KiB, max_body_bytes: 1KiB, header_timeout: 1s, idle_timeout: 1500ms }",
            routes: """
                  - { id: users, match: { path: "/users/{id}", methods: [GET, PUT] }, upstream: demo }
                  - { id: demo, match: { path_prefix: "/api/" }, upstream: demo }
                """)
    }

    /// Sends raw bytes and expects a problem+json answer with `status`; returns whether the server then closed.
    static func expectProblem(_ raw: String, status: Int, port: Int) async throws -> (RawResponse, Bool) {
        try await RawConnection.with(port: port) { connection in
            try await connection.send(raw)
            let response = try await connection.readResponse()
            #expect(response.status == status, "\(raw.prefix(60))")
            #expect(response.header("Content-Type") == "application/problem+json")
            #expect(response.json["status"] as? Int == status)
            #expect(response.json["type"] as? String == "about:blank")
            #expect((response.json["request_id"] as? String)?.isEmpty == false)
            return (response, try await connection.waitForClose(timeout: .seconds(2)))
        }
    }

    @Test func noRouteIs404() async throws {
        try await Harness.run(Self.limited) { h in
            let (_, closed) = try await Self.expectProblem(
                "GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", status: 404, port: h.port)
            #expect(closed)
        }
    }

    @Test func wrongMethodIs405WithAllow() async throws {
        try await Harness.run(Self.limited) { h in
            let (response, _) = try await Self.expectProblem(
                "DELETE /users/7 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", status: 405, port: h.port)
            #expect(response.header("Allow") == "GET, HEAD, PUT")
        }
    }

    @Test func bothContentLengthAndTransferEncodingIs400AndClose() async throws {
        try await Harness.run(Self.limited) { h in
            let (_, closed) = try await Self.expectProblem(
                "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                status: 400, port: h.port)
            #expect(closed)
            #expect(h.upstream.requestCount == 0)
        }
    }

    @Test func conflictingContentLengthsAre400() async throws {
        try await Harness.run(Self.limited) { h in
            let (_, closed) = try await Self.expectProblem(
                "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", status: 400,
                port: h.port)
            #expect(closed)
        }
    }

    @Test func badChunkSizeIs400() async throws {
        try await Harness.run(Self.limited) { h in
            let (_, closed) = try await Self.expectProblem(
                "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                status: 400,
                port: h.port)
            #expect(closed)
        }
    }

    @Test func missingOrRepeatedHostIs400() async throws {
        try await Harness.run(Self.limited) { h in
            _ = try await Self.expectProblem("GET /api/x HTTP/1.1\r\n\r\n", status: 400, port: h.port)
            _ = try await Self.expectProblem(
                "GET /api/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", status: 400, port: h.port)
            #expect(h.upstream.requestCount == 0)
        }
    }

    @Test func garbageAfterAPipelinedRequestAnswersItThenCloses() async throws {
        try await Harness.run(Self.limited) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send("GET /api/delay HTTP/1.1\r\nHost: a\r\n\r\nTHIS IS NOT HTTP\r\n\r\n")
                let first = try await connection.readResponse()
                #expect(first.status == 200)
                #expect(try await connection.waitForClose(timeout: .seconds(2)))
            }
        }
    }

    @Test func garbageRequestLineIs400() async throws {
        try await Harness.run(Self.limited) { h in
            _ = try await Self.expectProblem("HELLO THERE\r\n\r\n", status: 400, port: h.port)
        }
    }

    @Test func largeHeadIs431() async throws {
        try await Harness.run(Self.limited) { h in
            let big = String(repeating: "v", count: 3000)
            let (_, closed) = try await Self.expectProblem(
                "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: \(big)\r\n\r\n", status: 431, port: h.port)
            #expect(closed)
            // Past the HTTP parser's own ceiling too.
            let huge = String(repeating: "v", count: 100_000)
            _ = try await Self.expectProblem(
                "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: \(huge)\r\n\r\n", status: 431, port: h.port)
        }
    }

    @Test func largeBodyIs413() async throws {
        try await Harness.run(Self.limited) { h in
            let body = String(repeating: "b", count: 2000)
            let (_, closed) = try await Self.expectProblem(
                "POST /api/count HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n\(body)", status: 413, port: h.port)
            #expect(closed)
            let chunk = String(repeating: "c", count: 600)
            _ = try await Self.expectProblem(
                "POST /api/count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n\(chunk)\r\n258\r\n\(chunk)\r\n0\r\n\r\n",
                status: 413, port: h.port)
        }
    }

    @Test func slowHeadIs408AndClose() async throws {
        try await Harness.run(Self.limited) { h in
            let (_, closed) = try await Self.expectProblem(
                "GET /api/x HTTP/1.1\r\nHost: a\r\n", status: 408, port: h.port)
            #expect(closed)
        }
    }

    @Test func idleKeepAliveConnectionIsClosed() async throws {
        try await Harness.run(Self.limited) { h in
            try await RawConnection.with(port: h.port) { connection in
                let started = ContinuousClock.now  // the idle time starts after the answer, so later than this
                try await connection.send("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
                #expect(try await connection.readResponse().status == 200)
                #expect(try await connection.waitForClose(timeout: .seconds(5)))
                #expect(ContinuousClock.now - started > .milliseconds(1490))
            }
        }
    }

    @Test func anEarlyAnswerDoesNotWaitForeverForTheRestOfTheBody() async throws {
        try await Harness.run(Self.limited) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send("POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 900\r\n\r\n0123456789")
                #expect(try await connection.readResponse().status == 404)
                let started = ContinuousClock.now
                #expect(try await connection.waitForClose(timeout: .seconds(8)))
                #expect(ContinuousClock.now - started < .seconds(5), "at the idle timeout (1.5 s), not never")
            }
        }
    }

    @Test func aBodyInItsOwnReadDoesNotTurnTheIdleConnectionInto408() async throws {
        try await Harness.run(Self.limited) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send("POST /api/count HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
                try await Task.sleep(for: .milliseconds(50))
                try await connection.send("hello")
                #expect(try await connection.readResponse().json["body_bytes"] as? Int == 5)
                // Idle now: closed quietly at idle_timeout, with no unasked-for 408.
                #expect(try await connection.waitForClose(timeout: .seconds(5)))
                #expect(connection.unreadBytes == 0)
            }
        }
    }

    @Test func traversalCannotEscapeTheRoute() async throws {
        // Default limits: this test is about paths, not the header timeout `limited` has.
        let routes = """
              - { id: demo, match: { path_prefix: "/api/" }, upstream: demo }
            """
        try await Harness.run({ Harness.config(upstreamPort: $0, routes: routes) }) { h in
            for path in ["/api/../admin", "/api/%2e%2e/admin", "/api/%2E%2E/%2e%2e/admin", "/api/..%2Fadmin/../../x"] {
                let response = try await request(port: h.port, path)
                if response.status == 200 {
                    let forwarded = response.json["path"] as? String ?? ""
                    #expect(forwarded.hasPrefix("/api/"), "\(path) reached \(forwarded)")
                } else {
                    #expect(response.status == 404, "\(path)")
                }
            }
            let encodedSlash = try await request(port: h.port, "/api/a%2fb")
            #expect(encodedSlash.json["path"] as? String == "/api/a%2Fb")
            let encodedTraversal = try await request(port: h.port, "/api/..%2F..%2Fadmin")
            #expect(encodedTraversal.status == 400)
            #expect(h.upstream.requestCount == 1)
        }
    }
}
