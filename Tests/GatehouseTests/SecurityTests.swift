import DemoUpstream
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

@testable import Gatehouse
@testable import GatehouseConfig
@testable import RedisClient

/// Issue 12: the fail-open and spoofing holes, each tried against a real gateway as an attacker would.
@Suite struct SecurityTests {
    static let key = "key-of-acme"
    static let otherKey = "key-of-beta"
    static let secret = "an HMAC secret for the tests, long enough"

    /// Consumers acme and beta, an HS256 issuer, and the routes each test names.
    static func yaml(
        routes: String, server: String = "", upstream: String = "", mapsToConsumers: Bool = false,
        consumerPolicy: Bool = false
    ) -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port, server: server, upstream: upstream,
                routes: routes + """

                    consumers:
                      - id: acme
                        api_keys: ["sha256:\(KeyDigest(key: key).hex)"]
                    \(consumerPolicy ? "    rate_limit: one" : "")
                      - { id: beta, api_keys: ["sha256:\(KeyDigest(key: otherKey).hex)"] }
                    auth:
                      jwt:
                        - issuer: "https://issuer.test"
                          audiences: [gatehouse]
                          algorithms: [HS256]
                          secret: "\(secret)"
                          maps_to_consumers: \(mapsToConsumers)
                    rate_limits:
                      one: { requests: 1, per: 1h, by: consumer }
                      ten: { requests: 10, per: 1h, by: "header:X-Client" }
                    """)
        }
    }

    static func token(sub: String) -> String {
        Mint.hs256(Mint.claims(sub: sub), secret: Array(secret.utf8))
    }

    static func seen(_ response: RawResponse) -> [String: String] {
        response.json["headers"] as? [String: String] ?? [:]
    }

    // MARK: 1. no phase is skipped

    @Test func respondRoutesPassAuthenticationAndRateLimits() async throws {
        let routes = """
              - id: secret
                match: { path: "/secret" }
                auth: required
                respond: { status: 200, body: "classified" }
              - id: limited
                match: { path: "/limited" }
                rate_limit: [ten]
                respond: { status: 200, body: "ok" }
            """
        try await Harness.run(Self.yaml(routes: routes)) { h in
            let anonymous = try await request(port: h.port, "/secret")
            #expect(anonymous.status == 401)
            #expect(anonymous.text.contains("classified") == false)
            #expect(anonymous.header("WWW-Authenticate")?.hasPrefix("Bearer") == true)
            let known = try await request(port: h.port, "/secret", headers: [("X-API-Key", Self.key)])
            #expect(known.status == 200)
            #expect(known.text == "classified")

            let first = try await request(port: h.port, "/limited", headers: [("X-Client", "c1")])
            #expect(first.status == 200)
            #expect(first.header("RateLimit") == "\"ten\";r=9;t=360")
            for _ in 0..<9 { _ = try await request(port: h.port, "/limited", headers: [("X-Client", "c1")]) }
            let over = try await request(port: h.port, "/limited", headers: [("X-Client", "c1")])
            #expect(over.status == 429)
            #expect(over.header("Retry-After") != nil)
        }
    }

    // MARK: 2. auth_methods

    @Test func credentialsOfAnotherMethodAreNoCredentials() async throws {
        let routes = """
              - { id: jwt, match: { path_prefix: "/jwt" }, upstream: demo, auth: required, auth_methods: [jwt] }
              - { id: key, match: { path_prefix: "/key" }, upstream: demo, auth: required, auth_methods: [api_key] }
            """
        try await Harness.run(Self.yaml(routes: routes)) { h in
            let keyOnJWT = try await request(port: h.port, "/jwt", headers: [("X-API-Key", Self.key)])
            #expect(keyOnJWT.status == 401)
            #expect(keyOnJWT.header("WWW-Authenticate")?.contains("JWT") == true)
            let jwtOnKey = try await request(
                port: h.port, "/key", headers: [("Authorization", "Bearer " + Self.token(sub: "acme"))])
            #expect(jwtOnKey.status == 401)
            #expect(jwtOnKey.header("WWW-Authenticate")?.contains("API key") == true)
            #expect(try await request(port: h.port, "/key", headers: [("X-API-Key", Self.key)]).status == 200)
        }
    }

    // MARK: 3. every config SPEC allows loads

    @Test func validCrossFieldConfigsLoad() throws {
        let yaml = """
            upstreams:
              u:
                targets: [{ url: "http://127.0.0.1:9" }]
                passive_health: { eject_for: 10m }
            routes:
              - id: r
                match: { path: "/r" }
                upstream: u
                cache: { ttl: 30s, max_ttl: 2s }
            """
        let config = try ConfigLoader.parse(yaml: yaml, environment: [:])
        #expect(config.routes[0].cache?.ttl.milliseconds == 30_000)
        #expect(config.upstreams[0].passiveHealth.maxEjectFor.milliseconds == 600_000)
        #expect(config.warnings.count == 1)
        // Two values the file itself gives still must agree.
        let contradiction = yaml.replacingOccurrences(of: "eject_for: 10m", with: "eject_for: 10m, max_eject_for: 1m")
        #expect(throws: ConfigErrors.self) { try ConfigLoader.parse(yaml: contradiction, environment: [:]) }
    }

    @Test func theRouteTTLIsNotCappedByMaxTTL() {
        var route = RouteCache()
        route.ttl = .seconds(30)
        route.maxTTL = .seconds(2)
        let now = HTTPDate.nowMilliseconds()
        let request = CachePolicy.RequestFacts(
            authenticated: false, keyedPerConsumer: false, noStore: false, headers: [:], requestTime: now)
        let heuristic = CachePolicy.evaluate(
            status: 200, headers: [("Content-Type", "text/plain")], request: request, responseTime: now, route: route)
        #expect((try? heuristic.get())?.freshness.lifetime == 30_000)
        let given = CachePolicy.evaluate(
            status: 200, headers: [("Cache-Control", "max-age=600")], request: request, responseTime: now, route: route)
        #expect((try? given.get())?.freshness.lifetime == 2_000)
    }

    @Test func jwksURLsMustBeHTTPS() {
        func load(_ url: String) throws {
            _ = try ConfigLoader.parse(
                yaml: "auth:\n  jwt:\n    - { issuer: i, algorithms: [RS256], jwks_url: \"\(url)\" }\n",
                environment: [:])
        }
        #expect(throws: ConfigErrors.self) { try load("http://keys.example.com/jwks.json") }
        #expect(throws: ConfigErrors.self) { try load("http://127.evil.example/jwks.json") }
        #expect(throws: Never.self) { try load("https://keys.example.com/jwks.json") }
        #expect(throws: Never.self) { try load("http://127.0.0.1:8080/jwks.json") }
    }

    // MARK: 4. the admin API and DNS rebinding

    @Test func theAdminAPIAnswersOnlyItsHostsAndTrustedOrigins() async throws {
        try await Harness.run(Self.yaml(routes: "  - { id: d, match: { path_prefix: \"/\" }, upstream: demo }")) { h in
            func admin(_ method: String, host: String, origin: String? = nil) async throws -> RawResponse {
                try await RawConnection.with(port: h.adminPort) { connection in
                    var text = "\(method) /consumers/acme/keys HTTP/1.1\r\nHost: \(host)\r\nContent-Length: 0\r\n"
                    if let origin { text += "Origin: \(origin)\r\n" }
                    try await connection.send(text + "Connection: close\r\n\r\n")
                    return try await connection.readResponse()
                }
            }
            let rebound = try await admin("POST", host: "rebind.attacker.example:\(h.adminPort)")
            #expect(rebound.status == 403)
            #expect(rebound.header("Content-Type") == "application/problem+json")
            #expect(rebound.json["key"] == nil)
            let foreign = try await admin("POST", host: "127.0.0.1:\(h.adminPort)", origin: "https://evil.example")
            #expect(foreign.status == 403)
            let own = try await admin("POST", host: "127.0.0.1:\(h.adminPort)")
            #expect(own.status == 201)
            #expect(own.json["key"] is String)
            #expect(try await admin("POST", host: "test.local").status == 201, "a name from admin.hosts")
        }
    }

    // MARK: 5. paths

    @Test func dotSegmentsWithParametersAreRefused() async throws {
        let routes = """
              - { id: public, match: { path_prefix: "/a/" }, upstream: demo }
              - { id: private, match: { path_prefix: "/private/" }, upstream: demo, auth: required }
            """
        try await Harness.run(Self.yaml(routes: routes)) { h in
            for path in [
                "/a/..;/private/x", "/a/.;/x", "/a/%2e%2e;/private/x", "/a/..%3b/private/x", "/a/..;x=1/p",
                "/a/x%2F..;%2F..;%2Fprivate/x",
            ] {
                let response = try await request(port: h.port, path)
                #expect(response.status == 400, "\(path)")
            }
            let parameters = try await request(port: h.port, "/a/b;jsessionid=1/x")
            #expect(parameters.status == 200)
            #expect(parameters.json["path"] as? String == "/a/b;jsessionid=1/x")
        }
    }

    // MARK: 6. identity headers

    @Test func identityHeadersBelongToTheGateway() async throws {
        let routes = "  - { id: d, match: { path_prefix: \"/\" }, upstream: demo }"
        let spoofed: [(String, String)] = [
            ("Forwarded", "for=10.9.9.9;host=evil.example"), ("X-Real-IP", "10.9.9.9"),
            ("X-Original-URL", "/admin"), ("X-Rewrite-URL", "/admin"), ("X_Consumer_ID", "acme"),
            ("X-Forwarded-For", "10.9.9.9"), ("X-Forwarded-Host", "evil.example"), ("X-Consumer-Issuer", "me"),
            ("X-Forwarded-Port", "443"), ("X-Forwarded-Prefix", "/admin"),
        ]
        try await Harness.run(Self.yaml(routes: routes)) { h in
            let seen = Self.seen(try await request(port: h.port, "/x", headers: spoofed))
            #expect(seen["x-real-ip"] == "127.0.0.1")
            #expect(seen["forwarded"] == "for=127.0.0.1;proto=http;host=\"test.local\"")
            #expect(seen["x-forwarded-for"] == "127.0.0.1")
            #expect(seen["x-forwarded-host"] == "test.local")
            for name in [
                "x-original-url", "x-rewrite-url", "x_consumer_id", "x-consumer-issuer", "x-forwarded-port",
                "x-forwarded-prefix",
            ] {
                #expect(seen[name] == nil, "\(name) reached the upstream")
            }
        }
        try await Harness.run(Self.yaml(routes: routes, server: "  headers_with_underscores: reject")) { h in
            let refused = try await request(port: h.port, "/x", headers: [("X_Consumer_ID", "acme")])
            #expect(refused.status == 400)
        }
        try await Harness.run(Self.yaml(routes: routes, server: "  headers_with_underscores: allow")) { h in
            let seen = Self.seen(try await request(port: h.port, "/x", headers: [("X_Tenant", "t1")]))
            #expect(seen["x_tenant"] == "t1")
        }
    }

    // MARK: 7. JWT identities

    @Test func aTokenSubjectNeverBecomesAConsumerOfTheSameName() async throws {
        let routes = "  - { id: echo, match: { path_prefix: \"/\" }, upstream: demo, auth: required }"
        let jwt = [("Authorization", "Bearer " + Self.token(sub: "acme"))]
        try await Harness.run(Self.yaml(routes: routes, consumerPolicy: true)) { h in
            let viaToken = Self.seen(try await request(port: h.port, "/x", headers: jwt))
            #expect(viaToken["x-consumer-id"] == "acme")
            #expect(viaToken["x-consumer-issuer"] == "https://issuer.test")
            let viaKey = try await request(port: h.port, "/x", headers: [("X-API-Key", Self.key)])
            #expect(Self.seen(viaKey)["x-consumer-issuer"] == nil)
            // acme's own policy (1 per hour) counted the key's request; the token is not acme and has no policy.
            #expect(try await request(port: h.port, "/x", headers: [("X-API-Key", Self.key)]).status == 429)
            #expect(try await request(port: h.port, "/x", headers: jwt).status == 200)
        }
        try await Harness.run(Self.yaml(routes: routes, mapsToConsumers: true)) { h in
            let mapped = Self.seen(try await request(port: h.port, "/x", headers: jwt))
            #expect(mapped["x-consumer-id"] == "acme")
            #expect(mapped["x-consumer-issuer"] == nil)
            let stranger = [("Authorization", "Bearer " + Self.token(sub: "nobody"))]
            #expect(try await request(port: h.port, "/x", headers: stranger).status == 401)
        }
    }

    @Test func aKeyCallersCacheEntriesAreNotATokenCallers() async throws {
        let routes = """
              - id: mine
                match: { path_prefix: "/cache/" }
                upstream: demo
                auth: required
                cache: { ttl: 30s }
            """
        try await Harness.run(Self.yaml(routes: routes)) { h in
            let path = "/cache/mine?cc=max-age%3D60"
            let byKey = try await request(port: h.port, path, headers: [("X-API-Key", Self.key)])
            #expect(byKey.header("Cache-Status") == "gatehouse; fwd=miss; stored")
            try await Task.sleep(for: .milliseconds(100))
            let byToken = try await request(
                port: h.port, path, headers: [("Authorization", "Bearer " + Self.token(sub: "acme"))])
            #expect(
                byToken.header("Cache-Status") == "gatehouse; fwd=miss; stored", "the key's entry is not the token's")
            #expect(h.upstream.requestCount == 2)
        }
    }

    // MARK: 8. unverified Authorization

    @Test func anAuthorizationTheGatewayDidNotVerifyStaysHere() async throws {
        let routes = """
              - { id: key, match: { path_prefix: "/key" }, upstream: demo, auth: required, auth_methods: [api_key] }
              - { id: pass, match: { path_prefix: "/pass" }, upstream: demo, forward_authorization: true }
              - { id: jwt, match: { path_prefix: "/jwt" }, upstream: demo, auth: required }
            """
        let forged = ("Authorization", "Bearer a.b.c")
        try await Harness.run(Self.yaml(routes: routes)) { h in
            let withKey = try await request(port: h.port, "/key", headers: [("X-API-Key", Self.key), forged])
            #expect(withKey.status == 200)
            #expect(Self.seen(withKey)["authorization"] == nil)
            let passed = try await request(port: h.port, "/pass", headers: [forged])
            #expect(Self.seen(passed)["authorization"] == "Bearer a.b.c")
            let verified = "Bearer " + Self.token(sub: "alice")
            let jwt = try await request(port: h.port, "/jwt", headers: [("Authorization", verified)])
            #expect(Self.seen(jwt)["authorization"] == verified, "a verified token goes on")
            let two = try await request(
                port: h.port, "/pass", headers: [("Authorization", verified), ("Authorization", "Basic eDp5")])
            #expect(two.status == 401)
        }
    }

    // MARK: 9. Retry-After pauses

    @Test func retryAfterPausesOnlyWhoTheConfigSays() async throws {
        let routes = "  - { id: d, match: { path_prefix: \"/\" }, upstream: demo, auth: required }"
        // off (default): the 429 passes, and the next caller still reaches the upstream.
        try await Harness.run(Self.yaml(routes: routes)) { (h: Harness) async throws in
            h.upstream.failure = (429, "30")
            #expect(try await request(port: h.port, "/a", headers: [("X-API-Key", Self.key)]).status == 429)
            h.upstream.failure = nil
            #expect(try await request(port: h.port, "/a", headers: [("X-API-Key", Self.otherKey)]).status == 200)
            #expect(try await request(port: h.port, "/a", headers: [("X-API-Key", Self.key)]).status == 200)
        }
        // consumer: only the caller who was told waits.
        try await Harness.run(Self.yaml(routes: routes, upstream: "    pause_on_retry_after: consumer")) {
            (h: Harness) async throws in
            h.upstream.failure = (429, "30")
            #expect(try await request(port: h.port, "/a", headers: [("X-API-Key", Self.key)]).status == 429)
            h.upstream.failure = nil
            let paused = try await request(port: h.port, "/a", headers: [("X-API-Key", Self.key)])
            #expect(paused.status == 429)
            #expect(paused.header("Content-Type") == "application/problem+json")
            #expect((25...30).contains(Int(paused.header("Retry-After") ?? "") ?? 0))
            #expect(try await request(port: h.port, "/a", headers: [("X-API-Key", Self.otherKey)]).status == 200)
            #expect(h.upstream.requestCount == 2)
        }
    }

    // MARK: 10. unbounded buffers

    @Test func connectAndUpgradesNeitherTunnelNorStall() async throws {
        try await Harness.run(Harness.basic) { h in
            try await RawConnection.with(port: h.port) { connection in
                try await connection.send("CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n")
                let refused = try await connection.readResponse()
                #expect(refused.status == 405)
                #expect(refused.header("Allow")?.contains("GET") == true)
                try await connection.send("GET /status HTTP/1.1\r\nHost: test.local\r\n\r\n")
                #expect(try await connection.readResponse().status == 200, "the connection goes on after CONNECT")
            }
            try await RawConnection.with(port: h.port) { connection in
                // curl's h2c upgrade, then an ordinary request on the same connection, pipelined.
                try await connection.send(
                    "GET /x HTTP/1.1\r\nHost: test.local\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                        + "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
                        + "GET /status HTTP/1.1\r\nHost: test.local\r\n\r\n")
                let upgraded = try await connection.readResponse()
                #expect(upgraded.status == 200)
                #expect(Self.seen(upgraded)["upgrade"] == nil, "an Upgrade the route does not take is not forwarded")
                let next = try await connection.readResponse()
                #expect(next.status == 200)
                #expect(next.text == "ok")
            }
            try await RawConnection.with(port: h.port) { connection in
                // The upgrade request waits in the queue behind a slow one; the decoder is restarted at once.
                try await connection.send(
                    "GET /delay/300 HTTP/1.1\r\nHost: test.local\r\n\r\n"
                        + "GET /x HTTP/1.1\r\nHost: test.local\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                        + "HEAD /chunked/100 HTTP/1.1\r\nHost: test.local\r\n\r\n"
                        + "GET /status HTTP/1.1\r\nHost: test.local\r\n\r\n")
                #expect(try await connection.readResponse().status == 200)
                #expect(try await connection.readResponse().status == 200)
                // A HEAD answer from a chunked upstream has no body, not even a last chunk, to desynchronise the
                // answer after it.
                let head = try await connection.readResponse(headRequest: true)
                #expect(head.status == 200)
                #expect(head.header("Transfer-Encoding") == nil)
                let last = try await connection.readResponse()
                #expect(last.status == 200)
                #expect(last.text == "ok")
            }
        }
    }

    /// A client that pipelines requests and never reads their answers: once its answers back up (the kernel's
    /// buffers and the connection's write buffer full), the gateway stops reading it, so what the gateway holds
    /// stays bounded however long the client goes on sending. (Without the check it read and answered on,
    /// holding every answer it could not write: 3.5 MiB after 6 s here on a debug build, and growing.)
    @Test func aClientThatNeverReadsCannotFillTheGatewaysMemory() async throws {
        let onlyStatus = { (port: Int) in
            Harness.config(
                upstreamPort: port,
                routes: "  - { id: status, match: { path: \"/status\" }, respond: { status: 200, body: \"ok\" } }")
        }
        try await Harness.run(onlyStatus) { h in
            let port = h.port
            async let sent = offThePool { try Self.pipelineWithoutReading(port: port, seconds: 6) }
            try await Task.sleep(for: .seconds(5))
            let held = await h.gateway.bufferedAnswerBytes()
            let bytes = try await sent
            print("pipelined \(bytes >> 10) KiB without reading; the gateway holds \(held >> 10) KiB of answers")
            #expect(bytes > 1 << 20)
            #expect(held < 1 << 20, "the gateway holds \(held >> 10) KiB of answers nobody reads")
        }
    }

    /// Writes pipelined requests for an unknown path (404s, each answer made anew) to 127.0.0.1:`port` for
    /// `seconds` and reads nothing; returns the bytes written.
    static func pipelineWithoutReading(port: Int, seconds: Double) throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var small: Int32 = 4096
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        guard withLoopbackAddress(port: port, { connect(fd, $0, $1) }) == 0 else { throw RawError.closed("connect") }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let chunk = Array(String(repeating: "GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n", count: 2000).utf8)
        let deadline = Date().addingTimeInterval(seconds)
        var sent = 0
        var offset = 0
        while Date() < deadline {
            let written = chunk.withUnsafeBytes { bytes in
                send(fd, bytes.baseAddress.map { $0 + offset }, bytes.count - offset, Int32(MSG_NOSIGNAL))
            }
            if written > 0 {
                sent += written
                offset = (offset + written) % chunk.count
            } else {
                usleep(10_000)
            }
        }
        return sent
    }

    // MARK: 11. the smaller ones

    @Test func foldedUpstreamHeaderLinesAreCheckedToo() async throws {
        let origin = try await RawUpstream(
            answer: "HTTP/1.1 200 OK\r\nX-A: ok\r\n \u{1}evil\r\nContent-Length: 2\r\n\r\nok")
        defer { Task { await origin.stop() } }
        try await Harness.run({ _ in
            Harness.config(
                upstreamPort: origin.port, routes: "  - { id: raw, match: { path_prefix: \"/\" }, upstream: demo }")
        }) { h in
            let response = try await request(port: h.port, "/x")
            #expect(response.status == 502)
            #expect(response.header("X-A") == nil)
        }
    }

    @Test func theLocalLimiterEvictsTheOldestBucketsNotAll() {
        let limiter = LocalRateLimiter(limit: 20)
        let hourly = RateLimitRule(
            RateLimitPolicy(name: "hourly", requests: 1, per: .seconds(3600), burst: 1),
            factory: GatewayMetrics().factory)
        let brief = RateLimitRule(
            RateLimitPolicy(name: "brief", requests: 100, per: .seconds(1), burst: 100),
            factory: GatewayMetrics().factory)
        #expect(limiter.check([RateLimitCheck(rule: hourly, key: "over")]).members[0].allowed)
        #expect(!limiter.check([RateLimitCheck(rule: hourly, key: "over")]).members[0].allowed)
        for index in 0..<100 { _ = limiter.check([RateLimitCheck(rule: brief, key: "k\(index)")]) }
        #expect(!limiter.check([RateLimitCheck(rule: hourly, key: "over")]).members[0].allowed, "still over its limit")
    }

    @Test func theMemoryCacheKeepsToItsBytes() async throws {
        let store = MemoryStore(cacheBytes: 20_000)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let version = CacheVersion(generation: 0, path: 0)
        for index in 0..<200 {
            try await store.cacheWrite(
                route: "r", version: version, path: "/p\(index)", set: [("e", Array(repeating: 1, count: 1000))],
                remove: [], expireMilliseconds: 60_000, on: loop
            ).get()
        }
        var kept = 0
        for index in 0..<200 {
            let record = try await store.cacheRead(route: "r", path: "/p\(index)", fields: ["e"], on: loop).get()
            if record.values[0] != nil { kept += 1 }
        }
        #expect(kept > 0 && kept <= 20, "\(kept) records of 1 KB kept under a 20 KB cap")
        let newest = try await store.cacheRead(route: "r", path: "/p199", fields: ["e"], on: loop).get()
        #expect(newest.values[0] != nil, "the newest stays")
    }

    @Test func aStoredEntryNeverCarriesItsFillersRateLimit() async throws {
        let routes = """
              - id: c
                match: { path_prefix: "/cache/" }
                upstream: demo
                rate_limit: [ten]
                cache: { ttl: 30s }
            """
        try await Harness.run(Self.yaml(routes: routes)) { h in
            let path = "/cache/rl?cc=max-age%3D60"
            for _ in 0..<3 { _ = try await request(port: h.port, path, headers: [("X-Client", "filler")]) }
            try await Task.sleep(for: .milliseconds(100))
            let hit = try await request(port: h.port, path, headers: [("X-Client", "other")])
            #expect(hit.header("Cache-Status")?.contains("hit") == true)
            let limits = hit.headers.filter { $0.0.lowercased() == "ratelimit" }.map(\.1)
            #expect(limits == ["\"ten\";r=9;t=360"], "only this caller's own: \(limits)")
        }
    }

    @Test func anUpstreamThatRefusesEveryTokenCannotFloodTheTokenEndpoint() async throws {
        let origin = try await DemoUpstream.start()
        try await UpstreamTests.run(weights: [1], settings: UpstreamTests.oauth2(origin), servers: [origin]) {
            (h: Harness, _: [DemoUpstream]) async throws in
            #expect(try await request(port: h.port, "/protected").status == 200)
            #expect(origin.tokenRequests == 1)
            origin.failure = (401, nil)
            for _ in 0..<6 { #expect(try await request(port: h.port, "/protected").status == 401) }
            #expect(origin.tokenRequests == 2, "one refresh for the first 401, none for the rest")
            origin.failure = nil
        }
    }

    @Test func theAccessLogNeverHoldsTheQueryAPIKey() async throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("gh-log-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: log) }
        let yaml = { (port: Int) in
            Harness.config(upstreamPort: port, routes: "  - { id: d, match: { path_prefix: \"/\" }, upstream: demo }")
                .replacingOccurrences(of: "access_log: \"off\"", with: "access_log: \"\(log)\"")
                + "\nauth:\n  api_key: { query_param: api_key }\n"
        }
        try await Harness.run(yaml) { h in
            _ = try await request(port: h.port, "/x?api_key=TOPSECRET", headers: [("Host", "second.example")])
            _ = try await request(port: h.port, "/y?api_key=TOPSECRET")
            try await waitUntil { ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("/y") }
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            #expect(text.contains("\"path\":\"/x\""))
            #expect(!text.contains("TOPSECRET"))
        }
    }

    /// The access log's line is built as bytes: strings escaped as JSON, numbers and the timestamp digit by digit.
    @Test func accessLogLinesAreJSON() throws {
        var line = AccessLogLine()
        line.append("{\"time\":")
        line.appendTimeNow()
        line.append(",\"text\":")
        line.appendString("a\"b\\c\n\u{1}\té")
        line.append(",\"none\":")
        line.appendString(orNull: String?.none)
        line.append(",\"count\":")
        line.appendInteger(-42)
        line.append(",\"ms\":")
        line.appendMilliseconds(microseconds: 1_234_567)
        line.append(",\"small\":")
        line.appendMilliseconds(microseconds: 5)
        line.append("}")
        let object = try JSONSerialization.jsonObject(with: Data(line.bytes)) as? [String: Any]
        #expect(object?["text"] as? String == "a\"b\\c\n\u{1}\té")
        #expect(object?["none"] is NSNull)
        #expect(object?["count"] as? Int == -42)
        #expect(object?["ms"] as? Double == 1234.567)
        #expect(object?["small"] as? Double == 0.005)
        let time = object?["time"] as? String ?? ""
        #expect(time.wholeMatch(of: /\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z/) != nil, "\(time)")
    }

    @Test func hostileNumbersFromRedisDoNotTrap() {
        #expect(RateLimitOutcome.seconds(Int64.max) > 0)
        let rule = RateLimitRule(
            RateLimitPolicy(name: "p", requests: 1, per: .seconds(1), burst: 1), factory: GatewayMetrics().factory)
        let check = RateLimitCheck(rule: rule, key: "k")
        let reply = RedisValue.array([.integer(1), .integer(Int64.max), .integer(Int64.max), .integer(Int64.min)])
        let outcome = try? RedisStore.rateLimitOutcome([check], reply: reply)
        #expect(outcome.map { RateLimitOutcome.seconds($0.members[0].resetMilliseconds) } ?? 0 > 0)
        _ = outcome?.headers
        #expect(OAuth2Tokens.decodeStored(Array("-9223372036854775808 9223372036854775807 t".utf8)) == nil)
        var entry = CacheEntry(
            status: 200, headers: [], body: ByteBuffer(), responseTime: 0, initialAge: 0,
            freshness: .init(
                lifetime: Int64.max, staleWhileRevalidate: Int64.max, staleIfError: 0, noCache: false,
                mustRevalidate: false), vary: [])
        #expect(CacheEntry.decode(entry.encoded()) == nil)
        entry.freshness.lifetime = 1000
        entry.freshness.staleWhileRevalidate = 0
        #expect(CacheEntry.decode(entry.encoded()) != nil)
    }

    @Test func redisGoingAwayAndComingBackIsLogged() async throws {
        let redis = try await RedisServerProcess()
        let lines = LogLines()
        let logger = Logger(label: "test") { _ in lines }
        let client = RedisClient(
            configuration: RedisConfiguration(address: .tcp(host: "127.0.0.1", port: redis.port)), logger: logger)
        try await waitUntil { client.isConnected }
        await redis.kill()
        try await waitUntil { lines.contains("redis went away") }
        #expect(lines.entries.filter { $0.contains("redis went away") }.count == 1, "once, not per connection")
        try await redis.start()
        try await waitUntil(timeout: .seconds(5)) { lines.contains("redis is back") }
        #expect(lines.entries.first { $0.contains("redis went away") }?.hasPrefix("warning") == true)
        #expect(lines.entries.first { $0.contains("redis is back") }?.hasPrefix("info") == true)
        await client.close()
    }
}

/// A log handler that keeps `level message` lines, for tests that read what the gateway logged.
final class LogLines: LogHandler, Sendable {
    private let lines = Mutex<[String]>([])
    var metadata: Logger.Metadata {
        get { [:] }
        set {}  // swift-format-ignore
    }
    var logLevel: Logger.Level {
        get { .trace }
        set {}  // swift-format-ignore
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { nil }
        set {}  // swift-format-ignore
    }

    var entries: [String] { lines.withLock { $0 } }
    func contains(_ text: String) -> Bool { entries.contains { $0.contains(text) } }

    func log(event: LogEvent) {
        lines.withLock { $0.append("\(event.level) \(event.message)") }
    }
}
