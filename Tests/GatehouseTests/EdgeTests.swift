import DemoUpstream
import Foundation
import GatehouseConfig
import Testing

@testable import Gatehouse

/// The edge a team expects (SPEC §7): IP rules, CORS, header transforms and compression, through a real gateway and
/// upstream, with the headers a browser sends and the command-line decoders a user would check with.
@Suite struct EdgeTests {
    /// A config with consumers, a trusted loopback proxy (so tests pick the client address by X-Forwarded-For),
    /// and the given routes.
    static func yaml(_ routes: String, server: String = "") -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port,
                server: """
                      trusted_proxies: ["127.0.0.1"]
                    \(server)
                    """,
                routes: routes
            ).replacingOccurrences(
                of: "upstreams:",
                with: """
                    consumers:
                      - id: acme
                        api_keys: ["sha256:\(hashKey("acme-key"))"]
                    upstreams:
                    """)
        }
    }

    static func hashKey(_ key: String) -> String {
        KeyDigest(key: key).hex
    }

    // MARK: IP rules

    @Test func ipRulesRefuseDeniedAndUnlistedClientsBeforeAuthentication() async throws {
        let routes = """
              - id: internal
                match: { path_prefix: "/internal" }
                upstream: demo
                auth: required
                allow_ips: ["10.0.0.0/8", "2001:db8::/32"]
                deny_ips: ["10.9.0.0/16"]
            """
        try await Harness.run(Self.yaml(routes)) { h in
            func call(_ client: String, key: Bool = true) async throws -> RawResponse {
                var headers = [("X-Forwarded-For", client)]
                if key { headers.append(("X-API-Key", "acme-key")) }
                return try await request(port: h.port, "/internal/x", headers: headers)
            }
            #expect(try await call("10.1.2.3").status == 200)
            #expect(try await call("2001:db8::7").status == 200)
            // deny_ips is checked first, inside an allowed network.
            let denied = try await call("10.9.1.1")
            #expect(denied.status == 403)
            #expect(denied.header("Content-Type") == "application/problem+json")
            #expect(try await call("192.168.1.1").status == 403)
            #expect(try await call("2001:db9::1").status == 403)
            // IP rules come before authentication: 403, not 401, without credentials.
            #expect(try await call("192.168.1.1", key: false).status == 403)
            #expect(try await call("10.1.2.3", key: false).status == 401)
            #expect(h.upstream.requestCount == 2, "only admitted, authenticated requests reached the upstream")
        }
    }

    // MARK: CORS

    static let corsRoutes = """
          - id: api
            match: { path_prefix: "/api", methods: [GET, POST, PUT] }
            upstream: demo
            auth: required
            cors:
              allow_origins: ["https://app.example.com"]
              allow_methods: [GET, POST, PUT]
              allow_headers: [Content-Type, Authorization, X-API-Key]
              expose_headers: [RateLimit, X-Request-ID]
              allow_credentials: true
              max_age: 10m
          - id: open
            match: { path_prefix: "/open" }
            upstream: demo
            cors: { allow_origins: ["*"] }
          - id: plain
            match: { path_prefix: "/plain", methods: [GET] }
            upstream: demo
        """

    @Test func preflightsAreAnsweredByTheGatewayBeforeAuthentication() async throws {
        try await Harness.run(Self.yaml(Self.corsRoutes)) { h in
            // What a browser sends before a credentialed PUT with a JSON body: no credentials on the preflight.
            let preflight = try await request(
                port: h.port, "/api/items/1", method: "OPTIONS",
                headers: [
                    ("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "PUT"),
                    ("Access-Control-Request-Headers", "content-type,x-api-key"),
                ])
            #expect(preflight.status == 204)
            #expect(preflight.header("Access-Control-Allow-Origin") == "https://app.example.com")
            #expect(preflight.header("Access-Control-Allow-Credentials") == "true")
            #expect(preflight.header("Access-Control-Allow-Methods") == "GET, POST, PUT")
            #expect(preflight.header("Access-Control-Allow-Headers") == "Content-Type, Authorization, X-API-Key")
            #expect(preflight.header("Access-Control-Max-Age") == "600")
            #expect(preflight.header("Vary")?.contains("Origin") == true)
            #expect(h.upstream.requestCount == 0, "a preflight never reaches the upstream")

            // Another origin: an answer, but nothing that lets the browser go on.
            let stranger = try await request(
                port: h.port, "/api/items/1", method: "OPTIONS",
                headers: [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "PUT")])
            #expect(stranger.status == 204)
            #expect(!stranger.headers.contains { $0.0.lowercased().hasPrefix("access-control-allow") })

            // A preflight to a route without cors is routed as the OPTIONS it is: here, a method the route refuses.
            let noCORS = try await request(
                port: h.port, "/plain/x", method: "OPTIONS",
                headers: [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "GET")])
            #expect(noCORS.status == 405)
            // A plain OPTIONS (no preflight headers) is an ordinary request, refused without credentials.
            let plain = try await request(port: h.port, "/api/items/1", method: "OPTIONS")
            #expect(plain.status == 405 || plain.status == 401)
            #expect(h.upstream.requestCount == 0)
        }
    }

    @Test func actualAnswersCarryCORSHeadersOnlyForAllowedOrigins() async throws {
        try await Harness.run(Self.yaml(Self.corsRoutes)) { h in
            let allowed = try await request(
                port: h.port, "/api/items", headers: [("Origin", "https://app.example.com"), ("X-API-Key", "acme-key")])
            #expect(allowed.status == 200)
            #expect(allowed.header("Access-Control-Allow-Origin") == "https://app.example.com")
            #expect(allowed.header("Access-Control-Allow-Credentials") == "true")
            #expect(allowed.header("Access-Control-Expose-Headers") == "RateLimit, X-Request-ID")
            #expect(allowed.header("Vary")?.contains("Origin") == true)

            // The gateway's own errors carry them too, so the page can read why it was refused.
            let refused = try await request(
                port: h.port, "/api/items", headers: [("Origin", "https://app.example.com")])
            #expect(refused.status == 401)
            #expect(refused.header("Access-Control-Allow-Origin") == "https://app.example.com")

            let stranger = try await request(
                port: h.port, "/api/items", headers: [("Origin", "https://evil.example"), ("X-API-Key", "acme-key")])
            #expect(stranger.status == 200)
            #expect(!stranger.headers.contains { $0.0.lowercased().hasPrefix("access-control-") })
            #expect(stranger.header("Vary")?.contains("Origin") == true)

            // "*" without credentials: every origin gets "*", and the answer does not vary by origin.
            let open = try await request(port: h.port, "/open/x", headers: [("Origin", "https://any.example")])
            #expect(open.header("Access-Control-Allow-Origin") == "*")
            #expect(open.header("Vary")?.contains("Origin") != true)
        }
    }

    @Test func wildcardOriginsWithCredentialsAreAConfigError() throws {
        let yaml = Self.yaml(
            """
              - id: open
                match: { path_prefix: "/" }
                upstream: demo
                cors: { allow_origins: ["*"], allow_credentials: true }
            """)(1)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("cors-\(UUID().uuidString).yaml").path
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect {
            _ = try ConfigLoader.load(path: path)
        } throws: { error in
            "\(error)".contains("allow_credentials")
        }
    }

    // MARK: header transforms

    @Test func headerTransformsApplyToRequestsAndToEveryAnswer() async throws {
        let routes = """
              - id: shaped
                match: { path_prefix: "/shaped" }
                upstream: demo
                auth: optional
                cache: { ttl: 30s }
                request_headers:
                  set: { X-Tenant: "${TENANT}", User-Agent: gatehouse }
                  add: { X-Extra: "one" }
                  remove: [x-drop-me]
                response_headers:
                  set: { X-Frame-Options: DENY }
                  add: { X-Served-Through: gatehouse }
                  remove: [x-served-by]
            """
        try await Harness.run(Self.yaml(routes), environment: ["TENANT": "blue"]) { h in
            let first = try await request(
                port: h.port, "/shaped/echo",
                headers: [("User-Agent", "curl"), ("X-Extra", "client"), ("X-Drop-Me", "secret")])
            #expect(first.status == 200)
            let seen = first.json["headers"] as? [String: String] ?? [:]
            #expect(seen["x-tenant"] == "blue")
            #expect(seen["user-agent"] == "gatehouse")
            #expect(seen["x-extra"]?.contains("client") == true && seen["x-extra"]?.contains("one") == true)
            #expect(seen["x-drop-me"] == nil)
            #expect(first.header("X-Frame-Options") == "DENY")
            #expect(first.header("X-Served-Through") == "gatehouse")
            #expect(first.header("X-Served-By") == nil)

            // A cache hit gets them once, not once more per hit.
            let hit = try await request(port: h.port, "/shaped/echo")
            #expect(hit.header("Cache-Status")?.contains("hit") == true, "\(hit.headers)")
            #expect(hit.headers.filter { $0.0.lowercased() == "x-served-through" }.count == 1)
            #expect(hit.header("X-Frame-Options") == "DENY")

            // And the gateway's own errors: a bad key is refused with 401 carrying them.
            let refused = try await request(port: h.port, "/shaped/echo", headers: [("X-API-Key", "wrong")])
            #expect(refused.status == 401)
            #expect(refused.header("X-Frame-Options") == "DENY")
            #expect(refused.header("X-Served-Through") == "gatehouse")
        }
    }

    // MARK: compression

    static let compressionRoutes = """
          - id: squeezed
            match: { path_prefix: "/cache" }
            upstream: demo
            cache: { ttl: 60s }
            compression: { min_bytes: 1KiB, types: ["application/json", "text/*"] }
          - id: events
            match: { path_prefix: "/events" }
            upstream: demo
            compression: {}
          - id: binary
            match: { path_prefix: "/bytes" }
            upstream: demo
            compression: {}
        """

    /// curl's raw answer (no decoding) for `path` with `Accept-Encoding`; returns the head and the body file.
    static func fetchRaw(_ port: Int, _ path: String, acceptEncoding: String?, headers: [String] = []) async throws
        -> (head: String, body: Data)
    {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("gz-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: file) }
        var arguments = ["-sS", "--max-time", "10", "-D", "-", "-o", file.path]
        if let acceptEncoding { arguments += ["-H", "Accept-Encoding: \(acceptEncoding)"] }
        for header in headers { arguments += ["-H", header] }
        let (status, head, error) = try await ChildProcess.run(
            "/usr/bin/curl", arguments + ["http://127.0.0.1:\(port)\(path)"])
        #expect(status == 0, "curl: \(error)")
        return (head.lowercased(), (try? Data(contentsOf: file)) ?? Data())
    }

    /// Decodes with the command-line tool (`gzip -dc` or `brotli -dc`).
    static func decode(_ data: Data, with tool: String) async throws -> Data {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("enc-\(UUID().uuidString)")
        try data.write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let (status, out, error) = try await ChildProcess.run("/usr/bin/" + tool, ["-dc", file.path])
        #expect(status == 0, "\(tool): \(error)")
        return Data(out.utf8)
    }

    @Test func answersAreEncodedAsTheClientPrefersAndTheCacheServesEveryEncoding() async throws {
        try await Harness.run(Self.yaml(Self.compressionRoutes)) { h in
            let path = "/cache/doc?size=16384&cc=max-age%3D60&etag=%22v1%22"
            // A miss, gzip: the upstream's 16 KiB come as far fewer bytes, and gzip -d gives them back.
            let gzip = try await Self.fetchRaw(h.port, path, acceptEncoding: "gzip")
            #expect(gzip.head.contains("content-encoding: gzip"), "\(gzip.head)")
            #expect(gzip.head.contains("vary: accept-encoding"))
            #expect(gzip.head.contains("etag: w/\"v1\""))
            #expect(gzip.body.count < 1024, "\(gzip.body.count) bytes")
            let identity = Data(String(repeating: "c", count: 16384).utf8)
            #expect(try await Self.decode(gzip.body, with: "gzip") == identity)

            // A hit for a client that takes no encoding: the stored identity answer, whole.
            let plain = try await Self.fetchRaw(h.port, path, acceptEncoding: nil)
            #expect(plain.head.contains("cache-status: gatehouse; hit"), "\(plain.head)")
            #expect(!plain.head.contains("content-encoding"))
            #expect(plain.head.contains("vary: accept-encoding"))
            #expect(plain.body == identity)

            // A hit for a browser: br wins a tie, and brotli -d gives the same bytes back.
            let br = try await Self.fetchRaw(h.port, path, acceptEncoding: "gzip, deflate, br")
            #expect(br.head.contains("content-encoding: br"), "\(br.head)")
            #expect(br.head.contains("cache-status: gatehouse; hit"))
            #expect(try await Self.decode(br.body, with: "brotli") == identity)

            // q-values: gzip preferred; br refused outright.
            let preferred = try await Self.fetchRaw(h.port, path, acceptEncoding: "br;q=0.2, gzip;q=0.8")
            #expect(preferred.head.contains("content-encoding: gzip"))
            let refused = try await Self.fetchRaw(h.port, path, acceptEncoding: "br;q=0, identity")
            #expect(!refused.head.contains("content-encoding"))
            #expect(refused.body == identity)

            // The client's conditional request with the weak tag it was given is still answered 304.
            let conditional = try await Self.fetchRaw(
                h.port, path, acceptEncoding: "gzip", headers: ["If-None-Match: W/\"v1\""])
            #expect(conditional.head.hasPrefix("http/1.1 304"), "\(conditional.head)")
            #expect(h.upstream.requestCount == 1, "one upstream fetch served every encoding")

            // Below min_bytes, and types not configured, go as they are.
            let small = try await Self.fetchRaw(h.port, "/cache/small?size=100", acceptEncoding: "gzip")
            #expect(!small.head.contains("content-encoding"))
            let binary = try await Self.fetchRaw(h.port, "/bytes/20000", acceptEncoding: "gzip")
            #expect(!binary.head.contains("content-encoding"))
            #expect(binary.body.count == 20000)
        }
    }

    @Test func aStreamedAnswerIsEncodedAsItStreams() async throws {
        try await Harness.run(Self.yaml(Self.compressionRoutes)) { h in
            // Ten server-sent events, 300 ms apart: the first must reach the client, encoded, long before the last
            // is sent (an encoder that buffered the whole answer would hold it for 3 s).
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send(
                    "GET /events/10 HTTP/1.1\r\nHost: test.local\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
                let started = Date()
                let head = try await connection.readHead()
                #expect(head.header("Content-Encoding") == "gzip")
                #expect(head.header("Transfer-Encoding") == "chunked")
                #expect(try await connection.drainBody(length: 1) >= 1)
                #expect(Date().timeIntervalSince(started) < 2.5, "the first event came with the last")
            }
            // A whole stream decodes to its events.
            let whole = try await Self.fetchRaw(h.port, "/events/3", acceptEncoding: "gzip")
            let text = String(decoding: try await Self.decode(whole.body, with: "gzip"), as: UTF8.self)
            #expect(text.components(separatedBy: "data:").count - 1 == 3, "\(text)")
        }
    }

    /// An entry refreshed by a revalidation (a 304 from the origin) stores the origin's headers, not the ones one
    /// answer got from the route (its CORS origin, its response_headers): later hits get theirs, once.
    @Test func revalidatedEntriesStoreNoPerAnswerHeaders() async throws {
        let routes = """
              - id: shaped
                match: { path_prefix: "/cache" }
                upstream: demo
                cache: { ttl: 30s }
                cors: { allow_origins: ["https://a.example", "https://b.example"] }
                response_headers: { add: { X-Edge: "1" } }
            """
        try await Harness.run(Self.yaml(routes)) { h in
            // Fresh for 3 s, so the hit after the refresh is still fresh on a loaded machine.
            let path = "/cache/r?cc=max-age%3D3&etag=%22v1%22"
            _ = try await request(port: h.port, path, headers: [("Origin", "https://a.example")])
            try await Task.sleep(for: .milliseconds(3200))
            // Stale: revalidated, the origin answers 304, the entry is refreshed by this answer.
            let revalidated = try await request(port: h.port, path, headers: [("Origin", "https://a.example")])
            #expect(revalidated.header("Cache-Status")?.contains("fwd-status=304") == true, "\(revalidated.headers)")
            let hit = try await request(port: h.port, path, headers: [("Origin", "https://b.example")])
            #expect(hit.header("Cache-Status")?.contains("hit") == true, "\(hit.headers)")
            #expect(hit.headers.filter { $0.0.lowercased() == "x-edge" }.count == 1, "\(hit.headers)")
            #expect(
                hit.headers.filter { $0.0.lowercased() == "access-control-allow-origin" }.map(\.1) == [
                    "https://b.example"
                ])
            #expect(h.upstream.requestCount == 2)
        }
    }
}
