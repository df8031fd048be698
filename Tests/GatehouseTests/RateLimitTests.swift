import DemoUpstream
import Foundation
import GatehouseConfig
import Testing

@testable import Gatehouse
@testable import RedisClient

/// Rate limits end to end: real gateways, real upstream, real Redis (killed and restarted where it matters).
@Suite struct RateLimitTests {
    static let acmeKey = "rl-acme-key"
    static let betaKey = "rl-beta-key"

    /// `/limited` carries `policies`; consumers acme (own policy `own`, when defined) and beta; 127.0.0.1 trusted.
    static func yaml(redis: String, prefix: String, policies: String, route: String, acmePolicy: Bool = false)
        -> (Int) -> String
    {
        { port in
            Harness.config(
                upstreamPort: port,
                server: "  trusted_proxies: [\"127.0.0.1/32\"]",
                redis: redis, redisKeyPrefix: prefix,
                routes: """
                      - id: limited
                        match: { path_prefix: "/limited" }
                        upstream: demo
                        auth: optional
                        rate_limit: [\(route)]
                      - { id: open, match: { path_prefix: "/" }, upstream: demo }
                    consumers:
                      - { id: acme, api_keys: ["sha256:\(KeyDigest(key: acmeKey).hex)"]\(acmePolicy ? ", rate_limit: own" : "") }
                      - { id: beta, api_keys: ["sha256:\(KeyDigest(key: betaKey).hex)"] }
                    rate_limits:
                    \(policies)
                    """)
        }
    }

    /// Runs `body` against one gateway whose `/limited` route carries `route`, counting in the test Redis under
    /// a prefix of its own.
    static func run(
        policies: String, route: String, acmePolicy: Bool = false, _ body: (Harness) async throws -> Void
    ) async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let yaml = Self.yaml(
            redis: url, prefix: "gh-rl-\(UUID().uuidString.prefix(8)):", policies: policies, route: route,
            acmePolicy: acmePolicy)
        try await Harness.run(yaml) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            try await body(h)
        }
        _ = server
    }

    /// A request from `ip` (via a trusted proxy) for tenant `tenant`, with an API key when given.
    static func send(_ h: Harness, _ key: String?, ip: String, tenant: String) async throws -> Int {
        var headers = [("X-Forwarded-For", ip), ("X-Tenant", tenant)]
        if let key { headers.append(("X-API-Key", key)) }
        return try await get(h, headers).status
    }

    static func get(_ h: Harness, _ headers: [(String, String)] = [], path: String = "/limited") async throws
        -> RawResponse
    {
        try await request(port: h.port, path, headers: headers)
    }

    /// Two gateways whose `/limited` route carries `policy` (named `shared`), counting in the test Redis under a
    /// prefix of their own: `callers` callers, alternating between them, each send `requests` requests at once.
    /// `body` gets the statuses, how long the load took, the Redis commands both sent, and the two gateways.
    static func loadTwoGateways(
        policy: String, callers: Int, requests: Int,
        _ body: ([Int], Duration, _ redisCommands: Int, Harness, Harness) async throws -> Void
    ) async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let yaml = Self.yaml(
            redis: url, prefix: "gh-rl-\(UUID().uuidString.prefix(8)):", policies: "  shared: \(policy)",
            route: "shared")
        try await Harness.run(yaml) { a in
            try await Harness.run(yaml) { b in
                try await waitUntil { a.gateway.readinessProblem == nil && b.gateway.readinessProblem == nil }
                let before = try await Self.redisCommands(a) + Self.redisCommands(b)
                let started = ContinuousClock.now
                let statuses = try await withThrowingTaskGroup(of: [Int].self) { group in
                    for index in 0..<callers {
                        group.addTask {
                            var statuses: [Int] = []
                            for _ in 0..<requests {
                                statuses.append(try await Self.get(index % 2 == 0 ? a : b).status)
                            }
                            return statuses
                        }
                    }
                    return try await group.reduce(into: []) { $0 += $1 }
                }
                let elapsed = ContinuousClock.now - started
                let commands = try await Self.redisCommands(a) + Self.redisCommands(b) - before
                try await body(statuses, elapsed, commands, a, b)
            }
        }
        _ = server
    }

    /// Redis commands a gateway has sent (its `gatehouse_redis_commands_total`).
    static func redisCommands(_ h: Harness) async throws -> Int {
        try await request(port: h.adminPort, "/metrics").text.split(separator: "\n")
            .filter { $0.hasPrefix("gatehouse_redis_commands_total") }
            .reduce(0) { $0 + Int(Double($1.split(separator: " ").last ?? "") ?? 0) }
    }

    @Test func twoGatewaysTogetherAllowExactlyTheQuota() async throws {
        try await Self.loadTwoGateways(policy: "{ requests: 10, per: 1h, by: route }", callers: 30, requests: 1) {
            statuses, _, _, a, b in
            #expect(statuses.filter { $0 == 200 }.count == 10)
            #expect(statuses.filter { $0 == 429 }.count == 20)
            #expect(a.upstream.requestCount + b.upstream.requestCount == 10)
        }
    }

    /// A roomy policy (burst >= 64) is spent from leased slices: two gateways under load from 16 callers admit
    /// no more than the quota together, most requests need no Redis round trip, and what quiet slices strand is
    /// bounded (a quarter of the burst).
    @Test func leasedSlicesNeverLetTwoGatewaysPastTheQuota() async throws {
        try await Self.loadTwoGateways(policy: "{ requests: 200, per: 1h, by: route }", callers: 16, requests: 40) {
            statuses, _, commands, a, b in
            let allowed = statuses.filter { $0 == 200 }.count
            #expect(allowed <= 200, "the fleet admitted \(allowed) of a quota of 200")
            #expect(allowed >= 150, "slices stranded more than a quarter of the burst: \(allowed) admitted")
            #expect(statuses.filter { $0 == 429 }.count == statuses.count - allowed)
            #expect(a.upstream.requestCount + b.upstream.requestCount == allowed)
            #expect(commands < statuses.count / 2, "\(commands) Redis commands for \(statuses.count) requests")
        }
    }

    /// On a dense timeline (100 per second, a slot every 10 ms) slots lapse when their time passes: under load from
    /// two gateways, the fleet admits no more than GCRA allows over the run (the burst plus one per interval).
    @Test func leasedSlotsLapseWhenTheirTimePasses() async throws {
        try await Self.loadTwoGateways(policy: "{ requests: 100, per: 1s, by: route }", callers: 16, requests: 25) {
            statuses, elapsed, _, _, _ in
            let allowed = statuses.filter { $0 == 200 }.count
            let bound = 100 + Int(elapsed / .milliseconds(10)) + 1
            #expect(allowed <= bound, "\(allowed) admitted in \(elapsed), GCRA allows \(bound)")
            #expect(allowed >= 100, "\(allowed) admitted of at least the burst")
        }
    }

    /// The slots a slice did not spend go back when it goes quiet: after one gateway's burst of 50, a second
    /// gateway gets exactly the other 50 of the quota.
    @Test func aQuietGatewayGivesItsSlotsBack() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let yaml = Self.yaml(
            redis: url, prefix: "gh-rl-\(UUID().uuidString.prefix(8)):",
            policies: "  leased: { requests: 100, per: 1h, by: route }", route: "leased")
        try await Harness.run(yaml) { a in
            try await waitUntil { a.gateway.readinessProblem == nil }
            let first = try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<50 { group.addTask { try await Self.get(a).status } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(first.allSatisfy { $0 == 200 })
            try await Harness.run(yaml) { b in
                try await waitUntil { b.gateway.readinessProblem == nil }
                // A's slice has been quiet for more than its idle time by now; B takes what is left.
                try await Task.sleep(for: .milliseconds(400))
                var allowed = 0
                while try await Self.get(b).status == 200 { allowed += 1 }
                #expect(allowed == 50, "the second gateway got \(allowed) of the 50 left")
            }
        }
        _ = server
    }

    @Test func headersAnd429() async throws {
        try await Self.run(
            policies: "  small: { requests: 3, per: 1m, by: ip }", route: "small"
        ) { h in
            let first = try await Self.get(h)
            #expect(first.header("RateLimit-Policy") == "\"small\";q=3;w=60")
            #expect(first.header("RateLimit")?.hasPrefix("\"small\";r=2;t=") == true)
            #expect(try await Self.get(h).header("RateLimit")?.hasPrefix("\"small\";r=1;") == true)
            #expect(try await Self.get(h).header("RateLimit")?.hasPrefix("\"small\";r=0;") == true)
            let limited = try await Self.get(h)
            #expect(limited.status == 429)
            #expect(limited.header("Content-Type") == "application/problem+json")
            #expect(Int(limited.header("Retry-After") ?? "") ?? 0 >= 1)
            #expect(limited.header("RateLimit")?.hasPrefix("\"small\";r=0;") == true)
            #expect(h.upstream.requestCount == 3)
            // Routes without a policy carry no headers.
            #expect(try await Self.get(h, path: "/open").header("RateLimit") == nil)
            let metrics = try await request(port: h.adminPort, "/metrics").text
            #expect(metrics.contains("gatehouse_rate_limit_total{policy=\"small\",result=\"limited\"} 1"))
            #expect(metrics.contains("gatehouse_rate_limit_total{policy=\"small\",result=\"allowed\"} 3"))
        }
    }

    @Test func everyKeyKindHasItsOwnBuckets() async throws {
        try await Self.run(
            policies: """
                  per-consumer: { requests: 1, per: 1m, by: consumer }
                  per-ip: { requests: 2, per: 1m, by: ip }
                  per-tenant: { requests: 3, per: 1m, by: "header:X-Tenant" }
                """, route: "per-consumer, per-ip, per-tenant"
        ) { (h: Harness) async throws in
            // by consumer: acme and beta each get one; anonymous callers count by IP.
            #expect(try await Self.send(h, Self.acmeKey, ip: "10.0.0.1", tenant: "t1") == 200)
            #expect(try await Self.send(h, Self.acmeKey, ip: "10.0.0.2", tenant: "t2") == 429)
            #expect(try await Self.send(h, Self.betaKey, ip: "10.0.0.3", tenant: "t3") == 200)
            #expect(try await Self.send(h, nil, ip: "10.0.0.4", tenant: "t4") == 200)
            #expect(
                try await Self.send(h, nil, ip: "10.0.0.4", tenant: "t5") == 429,
                "anonymous: the consumer key is the IP")
            // by ip (2 per IP), and by header (3 per tenant), counted apart from the consumer buckets.
            #expect(try await Self.send(h, nil, ip: "10.0.0.5", tenant: "t6") == 200)
            #expect(try await Self.send(h, nil, ip: "10.0.0.6", tenant: "t6") == 200)
            #expect(try await Self.send(h, nil, ip: "10.0.0.7", tenant: "t6") == 200)
            #expect(try await Self.send(h, nil, ip: "10.0.0.8", tenant: "t6") == 429, "the fourth request of tenant t6")
        }
    }

    @Test func aRefusedRequestConsumesNothingFromTheOtherPolicies() async throws {
        try await Self.run(
            policies: """
                  own: { requests: 1, per: 1m, by: consumer }
                  wide: { requests: 100, per: 1h, by: route, algorithm: fixed_window }
                """, route: "wide", acmePolicy: true
        ) { h in
            let first = try await Self.get(h, [("X-API-Key", Self.acmeKey)])
            #expect(first.status == 200)
            #expect(first.header("RateLimit-Policy") == "\"own\";q=1;w=60, \"wide\";q=100;w=3600")
            #expect(first.header("RateLimit")?.contains("\"wide\";r=99;") == true)
            for _ in 0..<3 { #expect(try await Self.get(h, [("X-API-Key", Self.acmeKey)]).status == 429) }
            // beta has no own policy: its request sees wide's bucket untouched by acme's refused ones.
            let beta = try await Self.get(h, [("X-API-Key", Self.betaKey)])
            #expect(beta.status == 200)
            #expect(beta.header("RateLimit")?.contains("\"wide\";r=98;") == true)
        }
    }

    @Test func gcraLetsABurstThroughAndThenOnlyTheRate() async throws {
        try await Self.run(
            policies: "  paced: { requests: 2, per: 4s, burst: 3, by: route }", route: "paced"
        ) { h in
            // One request every 2 s, three at once: six quick requests get the burst of three, no more.
            let clock = ContinuousClock()
            let start = clock.now
            var statuses: [Int] = []
            for _ in 0..<6 { statuses.append(try await Self.get(h).status) }
            if clock.now - start < .milliseconds(1900) {
                #expect(statuses == [200, 200, 200, 429, 429, 429])
            }
            // A refused request's Retry-After says when the next one passes. (On a loaded machine the requests
            // above may have taken long enough to earn another: ask until one is refused.)
            var refused = try await Self.get(h)
            for _ in 0..<5 where refused.status != 429 { refused = try await Self.get(h) }
            let retry = Int(refused.header("Retry-After") ?? "") ?? 0
            #expect(refused.status == 429 && (1...2).contains(retry))
            try await Task.sleep(for: .seconds(retry))
            #expect(try await Self.get(h).status == 200, "after Retry-After, one more")
        }
    }

    @Test func windowAlgorithmsCountTheirWindow() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        for (algorithm, quota) in [("fixed_window", 2), ("sliding_window", 3)] {
            let yaml = Self.yaml(
                redis: url, prefix: "gh-rl-\(UUID().uuidString.prefix(8)):",
                policies: "  windowed: { requests: \(quota), per: 1h, by: route, algorithm: \(algorithm) }",
                route: "windowed")
            try await Harness.run(yaml) { h in
                try await waitUntil { h.gateway.readinessProblem == nil }
                var statuses: [Int] = []
                for _ in 0...quota { statuses.append(try await Self.get(h).status) }
                #expect(statuses == Array(repeating: 200, count: quota) + [429], "\(algorithm)")
            }
        }
        _ = server
    }

    @Test func ratesThatAreNotWholeMillisecondsAreExact() async throws {
        // 6 per second is one every 166.67 ms: six at once must pass, with r=5 on the first, in Redis and in memory.
        let (url, server) = try await StoreTests.sharedRedisURL()
        for redis in [url, "memory://"] {
            let yaml = Self.yaml(
                redis: redis, prefix: "gh-rl-\(UUID().uuidString.prefix(8)):",
                policies: "  sixth: { requests: 6, per: 1s, burst: 6, by: route }", route: "sixth")
            try await Harness.run(yaml) { h in
                try await waitUntil { h.gateway.readinessProblem == nil }
                let first = try await Self.get(h)
                #expect(first.header("RateLimit")?.hasPrefix("\"sixth\";r=5;") == true, "\(redis)")
                var statuses = [first.status]
                for _ in 0..<5 { statuses.append(try await Self.get(h).status) }
                #expect(statuses == Array(repeating: 200, count: 6), "\(redis)")
            }
        }
        _ = server
    }

    @Test func redisAwayFollowsEachPolicysMode() async throws {
        let redis = try await RedisServerProcess()
        let yaml = Self.yaml(
            redis: "redis://127.0.0.1:\(redis.port)/0", prefix: "gh:",
            policies: """
                  local-mode: { requests: 2, per: 1m, by: "header:X-L", on_redis_error: local }
                  allow-mode: { requests: 1, per: 1m, by: "header:X-A", on_redis_error: allow }
                  deny-mode: { requests: 100, per: 1m, by: "header:X-D", on_redis_error: deny }
                """, route: "local-mode")
        try await Harness.run(yaml) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            #expect(try await Self.get(h, [("X-L", "one")]).status == 200)  // counted in Redis
            await redis.kill()
            try await waitUntil { h.gateway.readinessProblem != nil }
            // local: the same policy in memory, from zero (so up to N times the quota across N instances).
            var local: [Int] = []
            var seen: [String] = []
            for _ in 0..<3 {
                let answer = try await Self.get(h, [("X-L", "one")])
                local.append(answer.status)
                seen.append(answer.header("RateLimit") ?? "-")
            }
            // On failure, say what the gateway saw: the headers, and its rate-limit and Redis counters.
            let metrics = try await request(port: h.adminPort, "/metrics").text.split(separator: "\n")
            let counters = metrics.filter { $0.hasPrefix("gatehouse_rate_limit") || $0.hasPrefix("gatehouse_redis_") }
            #expect(local == [200, 200, 429], "\(seen) \(counters)")
            try await redis.start()
            try await waitUntil(timeout: .seconds(3)) { h.gateway.readinessProblem == nil }
            // Back on Redis by itself (a fresh one: it kept nothing). The full local bucket would have said 429.
            #expect(try await Self.get(h, [("X-L", "one")]).status == 200)
        }
        await redis.kill()

        // allow and deny, on their own routes.
        for (policy, expected) in [("allow-mode", 200), ("deny-mode", 503)] {
            let redis2 = try await RedisServerProcess()
            let yaml2 = Self.yaml(
                redis: "redis://127.0.0.1:\(redis2.port)/0", prefix: "gh:",
                policies: """
                      allow-mode: { requests: 1, per: 1m, by: route, on_redis_error: allow }
                      deny-mode: { requests: 100, per: 1m, by: route, on_redis_error: deny }
                    """, route: policy)
            try await Harness.run(yaml2) { h in
                try await waitUntil { h.gateway.readinessProblem == nil }
                await redis2.kill()
                try await waitUntil { h.gateway.readinessProblem != nil }
                let answers = [try await Self.get(h), try await Self.get(h)]
                #expect(answers.allSatisfy { $0.status == expected }, "\(policy)")
                let metrics = try await request(port: h.adminPort, "/metrics").text
                let mode = expected == 200 ? "allow" : "deny"
                #expect(
                    metrics.contains("gatehouse_rate_limit_fallback_total{policy=\"\(policy)\",mode=\"\(mode)\"} 2"))
                if expected == 503 { #expect(answers[0].header("Retry-After") == "1") }
            }
            await redis2.kill()
        }
    }

    @Test func memoryStoreLimitsExactlyForOneInstance() async throws {
        let yaml = Self.yaml(
            redis: "memory://", prefix: "gh:", policies: "  tiny: { requests: 2, per: 1m, by: route }",
            route: "tiny")
        try await Harness.run(yaml) { h in
            let statuses = [try await Self.get(h).status, try await Self.get(h).status, try await Self.get(h).status]
            #expect(statuses == [200, 200, 429])
        }
    }
}
