import DemoUpstream
import Foundation
import GatehouseConfig
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import Gatehouse
@testable import RedisClient

/// The response cache end to end: a real gateway, a real upstream, entries in a real Redis.
@Suite struct CacheTests {
    /// A gateway whose `/cache/...` and `/truncate/...` routes cache in Redis under a key prefix of their own.
    static func yaml(redis: String, prefix: String, cache: String = "ttl: 30s") -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port, redis: redis, redisKeyPrefix: prefix,
                routes: """
                      - id: c
                        match: { path_prefix: "/cache/" }
                        upstream: demo
                        cache: { \(cache) }
                      - id: t
                        match: { path_prefix: "/truncate/" }
                        upstream: demo
                        cache: { ttl: 30s }
                      - id: plain
                        match: { path_prefix: "/" }
                        upstream: demo
                    """)
        }
    }

    /// Runs `body` against a gateway caching in the test Redis, with a fresh key prefix.
    static func run(cache: String = "ttl: 30s", _ body: (Harness) async throws -> Void) async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let prefix = "gh-cache-\(UUID().uuidString.prefix(8)):"
        try await Harness.run(yaml(redis: url, prefix: prefix, cache: cache)) { h in
            // Redis answers and the purge subscription is up (the hot layer is in use), as in steady state.
            try await waitUntil { h.gateway.readinessProblem == nil && h.gateway.core.cache.hot?.epoch != nil }
            try await body(h)
        }
        _ = server
    }

    static func get(_ h: Harness, _ path: String, headers: [(String, String)] = []) async throws -> RawResponse {
        try await request(port: h.port, path, headers: headers)
    }

    @Test func freshHitComesFromRedisWithAge() async throws {
        try await Self.run { h in
            let first = try await Self.get(h, "/cache/a?cc=max-age%3D60")
            #expect(first.status == 200)
            #expect(first.header("Cache-Status") == "gatehouse; fwd=miss; stored")
            try await waitUntil { h.upstream.requestCount == 1 }
            try await Task.sleep(for: .milliseconds(100))  // the store is written after the answer
            let second = try await Self.get(h, "/cache/a?cc=max-age%3D60")
            #expect(second.status == 200)
            #expect(second.header("Cache-Status")?.hasPrefix("gatehouse; hit; ttl=") == true)
            #expect(second.body == first.body)
            #expect(second.header("Age").flatMap(Int.init) != nil)
            #expect(second.header("X-Request-ID") != first.header("X-Request-ID"))
            #expect(h.upstream.requestCount == 1)
            // Query order does not matter; another query is another entry.
            let reordered = try await Self.get(h, "/cache/a?cc=max-age%3D60&")
            #expect(reordered.header("Cache-Status")?.contains("hit") == true)
            let head = try await request(port: h.port, "/cache/a?cc=max-age%3D60", method: "HEAD")
            #expect(head.header("Cache-Status")?.contains("hit") == true)
            #expect(head.header("Content-Length") == String(first.body.count))
            #expect(h.upstream.requestCount == 1)
        }
    }

    @Test func ageAndFreshnessFollowTheOrigin() async throws {
        try await Self.run(cache: "ttl: 1s, max_ttl: 2s") { h in
            // The origin says the response is already 50 s old: Age counts from there.
            _ = try await Self.get(h, "/cache/aged?cc=max-age%3D100&age=50")
            try await Task.sleep(for: .milliseconds(100))
            let aged = try await Self.get(h, "/cache/aged?cc=max-age%3D100&age=50")
            // max_ttl (2 s) caps the origin's 100 s, and the entry is 50 s old: it is stale at once.
            #expect(aged.header("Cache-Status")?.contains("hit") == false)

            // Without freshness from the origin the route's ttl (1 s) applies.
            let stored = ContinuousClock.now  // before the request: its response delay counts as age
            _ = try await Self.get(h, "/cache/ttl")
            try await Task.sleep(for: .milliseconds(100))
            let fresh = try await Self.get(h, "/cache/ttl")
            if ContinuousClock.now - stored < .milliseconds(900) {  // else too loaded a machine to tell
                #expect(fresh.header("Cache-Status")?.contains("hit") == true)
            }
            try await Task.sleep(for: .milliseconds(1100))
            #expect(try await Self.get(h, "/cache/ttl").header("Cache-Status")?.contains("hit") == false)

            // An Expires in the past is stale; one in the future is fresh.
            let future = Self.httpDate(Date().addingTimeInterval(60))
            let encoded = future.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? ""
            _ = try await Self.get(h, "/cache/expires?expires=\(encoded)")
            try await Task.sleep(for: .milliseconds(100))
            #expect(
                try await Self.get(h, "/cache/expires?expires=\(encoded)").header("Cache-Status")?.contains("hit")
                    == true)
        }
    }

    static func httpDate(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        return formatter.string(from: date)
    }

    @Test func responsesThatMustNotBeStored() async throws {
        try await Self.run(cache: "ttl: 30s, max_object_bytes: 1KiB") { h in
            let cases: [(path: String, headers: [(String, String)], detail: String)] = [
                ("/cache/ns?cc=no-store", [], "no-store"),
                ("/cache/p?cc=private%2C%20max-age%3D60", [], "private"),
                ("/cache/sc?cookie=a%3Db&cc=max-age%3D60", [], "set-cookie"),
                ("/cache/s500?status=500", [], "status"),
                ("/cache/s302?status=302", [], "status"),
                ("/cache/star?vary=*&cc=max-age%3D60", [], "vary-star"),
                ("/cache/big?size=5000&cc=max-age%3D60", [], "too-large"),
                ("/cache/rq?cc=max-age%3D60", [("Cache-Control", "no-store")], "no-store"),
            ]
            for item in cases {
                let before = h.upstream.requestCount
                let first = try await Self.get(h, item.path, headers: item.headers)
                #expect(first.header("Cache-Status") == "gatehouse; fwd=miss; detail=\(item.detail)", "\(item.path)")
                try await Task.sleep(for: .milliseconds(50))
                let second = try await Self.get(h, item.path, headers: item.headers)
                #expect(second.header("Cache-Status")?.contains("hit") == false, "\(item.path)")
                #expect(h.upstream.requestCount == before + 2, "\(item.path) reached the upstream twice")
            }
            // A body too large to store still reaches the client whole.
            #expect(try await Self.get(h, "/cache/big?size=5000&cc=max-age%3D60").body.count == 5000)
            // A request with credentials on a route that is not shared skips the cache.
            let authorized = try await Self.get(
                h, "/cache/auth?cc=max-age%3D60", headers: [("Authorization", "Bearer x")])
            #expect(authorized.header("Cache-Status") == "gatehouse; fwd=bypass; detail=authorization")
            let metrics = try await request(port: h.adminPort, "/metrics").text
            #expect(metrics.contains("gatehouse_cache_skipped_total{route=\"c\",reason=\"set-cookie\"} 2"))
        }
    }

    @Test func sharedRouteStoresAuthenticatedResponsesOnlyWhenTheyAllowIt() async throws {
        try await Self.run(cache: "ttl: 30s, shared: true") { h in
            let auth = [("Authorization", "Bearer x")]
            _ = try await Self.get(h, "/cache/s1?cc=max-age%3D60", headers: auth)
            #expect(
                try await Self.get(h, "/cache/s1?cc=max-age%3D60", headers: auth).header("Cache-Status")?.contains(
                    "hit") == false)
            _ = try await Self.get(h, "/cache/s2?cc=s-maxage%3D60", headers: auth)
            try await Task.sleep(for: .milliseconds(100))
            #expect(
                try await Self.get(h, "/cache/s2?cc=s-maxage%3D60", headers: auth).header("Cache-Status")?.contains(
                    "hit") == true)
        }
    }

    @Test func varyKeepsOneEntryPerHeaderValue() async throws {
        try await Self.run(cache: "ttl: 30s, key_headers: [X-Tenant]") { h in
            let path = "/cache/v?vary=Accept&cc=max-age%3D60"
            let a1 = try await Self.get(h, path, headers: [("Accept", "text/a")])
            try await Task.sleep(for: .milliseconds(100))
            let b1 = try await Self.get(h, path, headers: [("Accept", "text/b")])
            #expect(b1.header("Cache-Status") == "gatehouse; fwd=vary-miss; stored")
            try await Task.sleep(for: .milliseconds(100))
            let a2 = try await Self.get(h, path, headers: [("Accept", "text/a")])
            let b2 = try await Self.get(h, path, headers: [("Accept", "text/b")])
            #expect(a2.header("Cache-Status")?.contains("hit") == true)
            #expect(b2.header("Cache-Status")?.contains("hit") == true)
            #expect(a2.json["accept"] as? String == "text/a")
            #expect(b2.json["accept"] as? String == "text/b")
            #expect(a1.body == a2.body)
            #expect(h.upstream.requestCount == 2)
            // A key header splits the cache too.
            let tenant = try await Self.get(h, path, headers: [("Accept", "text/a"), ("X-Tenant", "t2")])
            #expect(tenant.header("Cache-Status")?.contains("hit") == false)
        }
    }

    @Test func staleEntriesAreRevalidatedAndA304RefreshesThem() async throws {
        try await Self.run { h in
            // max-age=2: the origin's Date has whole seconds, so a refreshed entry may look up to a second old.
            let path = "/cache/r?cc=max-age%3D2&etag=%22v1%22"
            let first = try await Self.get(h, path)
            try await Task.sleep(for: .milliseconds(2200))
            let clock = ContinuousClock()
            let revalidated = try await Self.get(h, path)
            let refreshedAt = clock.now
            #expect(revalidated.status == 200)
            #expect(revalidated.header("Cache-Status")?.hasPrefix("gatehouse; fwd=stale") == true)
            #expect(revalidated.header("Cache-Status")?.contains("fwd-status=304") == true)
            #expect(revalidated.body == first.body, "the stored body, not the 304's empty one")
            #expect(h.upstream.requestCount == 2)
            // The refreshed entry is written in the background: wait until Redis has it (the second store).
            try await Self.waitForStores(h, 2)
            let refreshed = try await Self.get(h, path)
            let requestsAfterRefresh = h.upstream.requestCount
            // The client's own conditional request is answered 304 from the cache.
            let conditional = try await Self.get(h, path, headers: [("If-None-Match", "\"v1\"")])
            #expect(conditional.status == 304)
            #expect(conditional.header("ETag") == "\"v1\"")
            #expect(conditional.body.isEmpty)
            // The entry is fresh for at least a second again; only a machine too loaded to ask within it sees it
            // stale, or finds Redis slower than its 100 ms command timeout (the lookup is then bypassed, as it
            // should be).
            let status = refreshed.header("Cache-Status") ?? ""
            if clock.now - refreshedAt < .milliseconds(900), !status.contains("redis-unavailable") {
                #expect(status.contains("hit"), "the 304 made it fresh again: \(status)")
                #expect(requestsAfterRefresh == 2, "\(status)")
            }
            let other = try await Self.get(h, path, headers: [("If-None-Match", "\"v0\"")])
            #expect(other.status == 200)
        }
    }

    @Test func noCacheAndMustRevalidateAreHonoured() async throws {
        try await Self.run(cache: "ttl: 30s, stale_while_revalidate: 30s, stale_if_error: 30s") { h in
            // no-cache: stored, but validated before every use.
            let path = "/cache/nc?cc=no-cache&etag=%22n%22"
            _ = try await Self.get(h, path)
            try await Task.sleep(for: .milliseconds(100))
            let second = try await Self.get(h, path)
            #expect(second.header("Cache-Status")?.contains("fwd-status=304") == true)
            #expect(h.upstream.requestCount == 2)

            // must-revalidate: never served stale, even with the route's stale windows.
            let strict = "/cache/mr?cc=max-age%3D1%2C%20must-revalidate"
            _ = try await Self.get(h, strict)
            try await Task.sleep(for: .milliseconds(1200))
            h.upstream.failure = (503, nil)
            let failed = try await Self.get(h, strict)
            #expect(failed.status == 503, "the origin's error, not the stale entry")
            h.upstream.failure = nil

            // A client's no-cache makes the cache validate first.
            let fresh = "/cache/cn?cc=max-age%3D60&etag=%22c%22"
            _ = try await Self.get(h, fresh)
            try await Task.sleep(for: .milliseconds(100))
            let before = h.upstream.requestCount
            let validated = try await Self.get(h, fresh, headers: [("Cache-Control", "no-cache")])
            #expect(validated.header("Cache-Status")?.contains("fwd=request") == true)
            #expect(h.upstream.requestCount == before + 1)
        }
    }

    @Test func staleWhileRevalidateServesAtOnceAndRefreshesOnce() async throws {
        try await Self.run(cache: "ttl: 30s, stale_while_revalidate: 10s") { h in
            let path = "/cache/swr?cc=max-age%3D2&delay=600"
            let first = try await Self.get(h, path)
            try await Task.sleep(for: .milliseconds(2200))
            let clock = ContinuousClock()
            let start = clock.now
            let stale = try await Self.get(h, path)
            #expect(clock.now - start < .milliseconds(500), "served without waiting for the 600 ms origin")
            #expect(stale.header("Cache-Status")?.hasPrefix("gatehouse; hit; stale") == true)
            #expect(stale.body == first.body)
            // More stale reads while the refresh runs (the origin takes 600 ms) do not start another one.
            for _ in 0..<3 { _ = try await Self.get(h, path) }
            try await Task.sleep(for: .milliseconds(100))
            #expect(h.upstream.requestCount == 2)
            // Once it lands, reads are fresh.
            var next = try await Self.get(h, path)
            while next.header("Cache-Status")?.hasPrefix("gatehouse; hit; stale") == true,
                clock.now - start < .seconds(5)
            {
                try await Task.sleep(for: .milliseconds(50))
                next = try await Self.get(h, path)
            }
            #expect(next.header("Cache-Status")?.hasPrefix("gatehouse; hit; ttl=") == true)
            #expect(next.body != first.body, "the refreshed response")
        }
    }

    @Test func staleIfErrorCoversFailuresWithinItsWindow() async throws {
        try await Self.run(cache: "ttl: 30s, stale_if_error: 60s") { h in
            let path = "/cache/sie?cc=max-age%3D1"
            let first = try await Self.get(h, path)
            try await Task.sleep(for: .milliseconds(1200))
            h.upstream.failure = (503, nil)
            let on5xx = try await Self.get(h, path)
            #expect(on5xx.status == 200)
            #expect(on5xx.body == first.body)
            #expect(on5xx.header("Cache-Status") == "gatehouse; fwd=stale; fwd-status=503; detail=stale-if-error")
            // The origin gone entirely (the config now points at a closed port): refused connections too.
            let config = try String(contentsOfFile: h.configPath, encoding: .utf8)
            try config.replacingOccurrences(of: "127.0.0.1:\(h.upstream.port)", with: "127.0.0.1:1")
                .write(toFile: h.configPath, atomically: true, encoding: .utf8)
            try h.gateway.reload()
            let down = try await Self.get(h, path)
            #expect(down.status == 200)
            #expect(down.header("Cache-Status") == "gatehouse; fwd=stale; detail=stale-if-error")
            // Without a stored entry the failure is the client's answer, still with Cache-Status.
            let missing = try await Self.get(h, "/cache/none")
            #expect(missing.status == 502)
            #expect(missing.header("Cache-Status") == "gatehouse; fwd=miss")
        }
    }

    @Test func concurrentMissesSendOneUpstreamRequest() async throws {
        try await Self.run { h in
            let path = "/cache/slow?delay=300&cc=max-age%3D60"
            let responses = try await withThrowingTaskGroup(of: RawResponse.self) { group in
                for _ in 0..<50 { group.addTask { try await Self.get(h, path) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(h.upstream.requestCount == 1)
            #expect(responses.allSatisfy { $0.status == 200 && $0.body == responses[0].body })
            let statuses = responses.compactMap { $0.header("Cache-Status") }
            #expect(statuses.filter { $0 == "gatehouse; fwd=miss; stored" }.count == 1)
            // The others waited for it, or (on a slow machine, arriving once it was stored) found it.
            let collapsed = statuses.filter { $0 == "gatehouse; fwd=miss; collapsed" }.count
            #expect(collapsed + statuses.filter { $0.hasPrefix("gatehouse; hit") }.count == 49)
            #expect(collapsed > 0)

            // When the leader's answer cannot be shared, the others go upstream themselves.
            let unshared = "/cache/slow2?delay=200&cc=no-store"
            let before = h.upstream.requestCount
            let answers = try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<5 { group.addTask { try await Self.get(h, unshared).status } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(answers == Array(repeating: 200, count: 5))
            #expect(h.upstream.requestCount == before + 5)
        }
    }

    @Test func largeBodiesAreStoredWhileStreamingAndTruncatedOnesNever() async throws {
        try await Self.run(cache: "ttl: 30s, max_object_bytes: 1MiB") { h in
            let path = "/cache/large?size=600000&cc=max-age%3D60"
            let first = try await Self.get(h, path)
            #expect(first.body.count == 600_000)
            try await Task.sleep(for: .milliseconds(200))
            let second = try await Self.get(h, path)
            #expect(second.header("Cache-Status")?.contains("hit") == true)
            #expect(second.body == first.body)

            // The upstream breaks off half way: the client's connection is cut, nothing is stored.
            _ = try? await Self.get(h, "/truncate/2000")
            try await Task.sleep(for: .milliseconds(100))
            _ = try? await Self.get(h, "/truncate/2000")
            #expect(h.upstream.requestCount == 3, "both truncated answers came from the upstream")
            let metrics = try await request(port: h.adminPort, "/metrics").text
            #expect(metrics.contains("gatehouse_cache_skipped_total{route=\"t\",reason=\"incomplete\"} 2"))
        }
    }

    @Test func unsafeMethodsAndPurgesRemoveEntries() async throws {
        try await Self.run { h in
            let a = "/cache/items/a?cc=max-age%3D60"
            let b = "/cache/items/b?cc=max-age%3D60"
            for path in [a, b, a + "&v=2"] { _ = try await Self.get(h, path) }
            try await Task.sleep(for: .milliseconds(100))
            #expect(try await Self.get(h, a).header("Cache-Status")?.contains("hit") == true)

            // A successful POST invalidates every entry of its path before its answer ends.
            let post = try await request(port: h.port, "/cache/items/a", method: "POST", body: "x")
            #expect(post.status == 200)
            #expect(post.header("Cache-Status") == "gatehouse; fwd=method")
            #expect(try await Self.get(h, a).header("Cache-Status")?.contains("hit") == false)
            #expect(try await Self.get(h, b).header("Cache-Status")?.contains("hit") == true)

            try await Task.sleep(for: .milliseconds(100))
            let onePath = try await request(
                port: h.adminPort, "/cache/purge", method: "POST", body: "{\"route\":\"c\",\"path\":\"/cache/items/a\"}"
            )
            #expect(onePath.status == 200)
            #expect(onePath.json["purged"] as? Int == 1)
            #expect(try await Self.get(h, b).header("Cache-Status")?.contains("hit") == true)

            let route = try await request(port: h.adminPort, "/cache/purge", method: "POST", body: "{\"route\":\"c\"}")
            #expect(route.status == 200)
            #expect((route.json["purged"] as? Int ?? 0) >= 1)
            #expect(try await Self.get(h, b).header("Cache-Status")?.contains("hit") == false)

            let unknown = try await request(
                port: h.adminPort, "/cache/purge", method: "POST", body: "{\"route\":\"x\"}")
            #expect(unknown.status == 404)
            #expect(unknown.header("Content-Type") == "application/problem+json")
            let malformed = try await request(port: h.adminPort, "/cache/purge", method: "POST", body: "nope")
            #expect(malformed.status == 400)
        }
    }

    @Test func redisAwayBypassesTheCacheAndCachingResumes() async throws {
        let redis = try await RedisServerProcess()
        let yaml = Self.yaml(redis: "redis://127.0.0.1:\(redis.port)/0", prefix: "gh:")
        try await Harness.run(yaml) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            let path = "/cache/away?cc=max-age%3D60"
            _ = try await Self.get(h, path)
            await redis.kill()
            try await waitUntil { h.gateway.readinessProblem != nil }
            let away = try await Self.get(h, path)
            #expect(away.status == 200)
            #expect(away.header("Cache-Status") == "gatehouse; fwd=bypass; detail=redis-unavailable")
            try await redis.start()
            try await waitUntil(timeout: .seconds(3)) { h.gateway.readinessProblem == nil }
            #expect(try await Self.get(h, path).header("Cache-Status") == "gatehouse; fwd=miss; stored")
            try await Task.sleep(for: .milliseconds(100))
            #expect(try await Self.get(h, path).header("Cache-Status")?.contains("hit") == true)
        }
        await redis.kill()
    }

    @Test func anEntrySurvivesAGatewayRestart() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let prefix = "gh-restart-\(UUID().uuidString.prefix(8)):"
        let path = "/cache/kept?cc=max-age%3D60"
        var body: [UInt8] = []
        try await Harness.run(Self.yaml(redis: url, prefix: prefix)) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            body = try await Self.get(h, path).body
            try await Task.sleep(for: .milliseconds(100))
        }
        try await Harness.run(Self.yaml(redis: url, prefix: prefix)) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            let again = try await Self.get(h, path)
            #expect(again.header("Cache-Status")?.contains("hit") == true)
            #expect(again.body == body)
            #expect(h.upstream.requestCount == 0)
        }
        _ = server
    }

    /// Waits (up to 3 s) until the gateway has written `count` entries of route `c` to the store: the store is
    /// written after the answer, and a loaded machine may take longer than any fixed sleep.
    static func waitForStores(_ h: Harness, _ count: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(3)
        while ContinuousClock.now < deadline,
            try await !request(port: h.adminPort, "/metrics").text.contains(
                "gatehouse_cache_stores_total{route=\"c\"} \(count)")
        {
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    @Test func instancesShareEntriesAndPurgesReachEveryHotCopyAtOnce() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let yaml = Self.yaml(
            redis: url, prefix: "gh-two-\(UUID().uuidString.prefix(8)):", cache: "ttl: 30s, local_ttl: 60s")
        func redisCommands(_ h: Harness) async throws -> Double {
            let text = try await request(port: h.adminPort, "/metrics").text
            let line = text.split(separator: "\n").first { $0.hasPrefix("gatehouse_redis_commands_total ") }
            return (line?.split(separator: " ").last).flatMap { Double($0) } ?? -1
        }
        try await Harness.run(yaml) { a in
            try await Harness.run(yaml) { b in
                try await waitUntil { a.gateway.core.cache.hot?.epoch != nil && b.gateway.core.cache.hot?.epoch != nil }
                let path = "/cache/shared?cc=max-age%3D60"
                _ = try await Self.get(a, path)
                try await Self.waitForStores(a, 1)
                #expect(try await Self.get(b, path).header("Cache-Status")?.contains("hit") == true, "from Redis")
                let before = try await redisCommands(b)
                #expect(try await Self.get(b, path).header("Cache-Status")?.contains("hit") == true)
                #expect(try await redisCommands(b) == before, "the second hit came from b's memory")
                #expect(b.upstream.requestCount == 0)

                // A purge through a reaches b's copy at once.
                let purge = try await request(
                    port: a.adminPort, "/cache/purge", method: "POST",
                    body: "{\"route\":\"c\",\"path\":\"/cache/shared\"}")
                #expect(purge.json["purged"] as? Int == 1)
                try await Task.sleep(for: .milliseconds(50))
                #expect(try await Self.get(b, path).header("Cache-Status") == "gatehouse; fwd=miss; stored")
                #expect(b.upstream.requestCount == 1)

                // So does a write through a.
                try await Task.sleep(for: .milliseconds(100))
                #expect(try await Self.get(b, path).header("Cache-Status")?.contains("hit") == true)
                #expect(try await request(port: a.port, "/cache/shared", method: "PUT", body: "x").status == 200)
                try await Task.sleep(for: .milliseconds(50))
                #expect(try await Self.get(b, path).header("Cache-Status")?.contains("hit") == false)
            }
        }
        _ = server
    }

    @Test func aRedisLockCoalescesMissesAcrossInstances() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let yaml = Self.yaml(
            redis: url, prefix: "gh-lock-\(UUID().uuidString.prefix(8)):", cache: "ttl: 30s, lock_timeout: 3s")
        try await Harness.run(yaml) { a in
            try await Harness.run(yaml) { b in
                try await waitUntil { a.gateway.readinessProblem == nil && b.gateway.readinessProblem == nil }
                let path = "/cache/fleet?delay=400&cc=max-age%3D60"
                let answers = try await withThrowingTaskGroup(of: RawResponse.self) { group in
                    for index in 0..<20 { group.addTask { try await Self.get(index % 2 == 0 ? a : b, path) } }
                    return try await group.reduce(into: []) { $0.append($1) }
                }
                #expect(answers.allSatisfy { $0.status == 200 && $0.body == answers[0].body })
                #expect(a.upstream.requestCount + b.upstream.requestCount == 1, "one request for the whole fleet")

                // A fetch that cannot be stored releases the lock: the other instance does not wait it out.
                let clock = ContinuousClock()
                let start = clock.now
                let unshared = "/cache/fleet2?delay=200&cc=no-store"
                async let first = Self.get(a, unshared)
                try await Task.sleep(for: .milliseconds(50))
                let second = try await Self.get(b, unshared)
                #expect(try await first.status == 200 && second.status == 200)
                #expect(clock.now - start < .milliseconds(2500), "b went upstream once a's lock was released")
            }
        }
        _ = server
    }

    @Test func hostileHeadersNeitherCrashNorPoison() async throws {
        try await Self.run { h in
            // Huge numbers from the origin are capped, not trapped on.
            let huge = "/cache/huge?cc=max-age%3D99999999999999999999999&age=99999999999999999999999"
            #expect(try await Self.get(h, huge).status == 200)
            try await Task.sleep(for: .milliseconds(100))
            #expect(try await Self.get(h, huge).status == 200)
            // A client's absurd date on a hit with Last-Modified.
            let dated = "/cache/lm?cc=max-age%3D60&lm=Sun%2C%2006%20Nov%201994%2008%3A49%3A37%20GMT"
            _ = try await Self.get(h, dated)
            try await Task.sleep(for: .milliseconds(100))
            let absurd = try await Self.get(
                h, dated, headers: [("If-Modified-Since", "Sun, 06 Nov 99999999999 08:49:37 GMT")])
            #expect(absurd.status == 200)
            let matching = try await Self.get(
                h, dated, headers: [("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")])
            #expect(matching.status == 304)

            // A Host that is not host[:port] never reaches the cache or the upstream.
            let bad = try await RawConnection.with(port: h.port) { connection in
                try await connection.send("GET /cache/h HTTP/1.1\r\nHost: test.local:@evil.example\r\n\r\n")
                return try await connection.readResponse()
            }
            #expect(bad.status == 400)
            // Ports are part of the key: what the upstream saw as X-Forwarded-Host differs.
            func withHost(_ host: String) async throws -> RawResponse {
                try await RawConnection.with(port: h.port) { connection in
                    try await connection.send(
                        "GET /cache/h?cc=max-age%3D60 HTTP/1.1\r\nHost: \(host)\r\nConnection: close\r\n\r\n")
                    return try await connection.readResponse()
                }
            }
            _ = try await withHost("a.example:8080")
            try await Task.sleep(for: .milliseconds(100))
            #expect(try await withHost("a.example:8080").header("Cache-Status")?.contains("hit") == true)
            #expect(try await withHost("a.example:9090").header("Cache-Status")?.contains("hit") == false)

            // A response that varies on a header the gateway sets cannot be keyed by the client's value.
            let varying = try await Self.get(h, "/cache/xff?vary=X-Forwarded-For&cc=max-age%3D60")
            #expect(varying.header("Cache-Status") == "gatehouse; fwd=miss; detail=vary-gateway-header")
        }
    }

    @Test func aResponseFetchedBeforeAPurgeIsNotStoredAfterIt() async throws {
        try await Self.run { h in
            let path = "/cache/race?delay=400&cc=max-age%3D60"
            async let slow = Self.get(h, path)
            try await waitUntil { h.upstream.requestCount == 1 }
            let purge = try await request(
                port: h.adminPort, "/cache/purge", method: "POST", body: "{\"route\":\"c\",\"path\":\"/cache/race\"}")
            #expect(purge.status == 200)
            #expect(try await slow.status == 200)
            try await Task.sleep(for: .milliseconds(150))
            let after = try await Self.get(h, path)
            #expect(after.header("Cache-Status")?.contains("hit") == false, "the pre-purge answer was not kept")
            #expect(h.upstream.requestCount == 2)
        }
    }

    // MARK: pieces

    @Test func unstorableKeysSkipCoalescingForAWhile() {
        let board = FlightBoard()
        #expect(Self.role(board.join("k", waiter: nil)) == "lead")
        #expect(Self.role(board.join("k", waiter: nil)) == "pass", "HEAD and refreshes never wait")
        board.land("k", entry: nil, written: nil, unstorable: true)
        #expect(Self.role(board.join("k", waiter: nil)) == "pass")
        #expect(Self.role(board.join("other", waiter: nil)) == "lead")
    }

    /// A miss racing the leader's store write neither leads a second flight nor waits for nothing.
    @Test func aMissThatRacesTheStoreWriteIsAnsweredFromTheLandedFlight() {
        let board = FlightBoard()
        let loop = EmbeddedEventLoop()
        let waiter = FlightBoard.Waiter(eventLoop: loop) { _ in }
        let entry = CacheEntry(
            status: 200, headers: [], body: ByteBuffer(string: "x"), responseTime: 0, initialAge: 0,
            freshness: .init(
                lifetime: 60_000, staleWhileRevalidate: 0, staleIfError: 0, noCache: false, mustRevalidate: false),
            vary: [])
        let lookedUp = FlightBoard.now()
        #expect(Self.role(board.join("k", waiter: waiter, lookupStarted: lookedUp)) == "lead")
        let written = loop.makePromise(of: Void.self)
        board.land("k", entry: entry, written: written.futureResult)
        #expect(Self.role(board.join("k", waiter: waiter, lookupStarted: lookedUp)) == "landed")
        written.succeed()
        #expect(Self.role(board.join("k", waiter: waiter, lookupStarted: lookedUp)) == "lookAgain")
        #expect(Self.role(board.join("k", waiter: waiter, lookupStarted: FlightBoard.now())) == "lead")

        // A purge ends a landing at once; the write completing later leaves the next flight alone.
        let key = "route\u{0}/path\u{0}GET http://a?"
        #expect(Self.role(board.join(key, waiter: waiter)) == "lead")
        let slowWrite = loop.makePromise(of: Void.self)
        board.land(key, entry: entry, written: slowWrite.futureResult)
        board.purge(route: "route", path: "/other")
        #expect(Self.role(board.join(key, waiter: waiter)) == "landed")
        board.purge(route: "route", path: "/path")
        #expect(Self.role(board.join(key, waiter: waiter)) == "lead")
        slowWrite.succeed()
        #expect(Self.role(board.join(key, waiter: waiter)) == "wait")
    }

    private static func role(_ role: FlightBoard.Role) -> String {
        switch role {
        case .lead: "lead"
        case .wait: "wait"
        case .pass: "pass"
        case .landed: "landed"
        case .lookAgain: "lookAgain"
        }
    }

    @Test func cacheControlAndDates() {
        let control = CacheControl(["public, max-age=60", "s-maxage=\"30\", stale-if-error=5, private=\"x\""])
        #expect(control.isPublic && control.isPrivate)
        #expect(control.maxAge == 60 && control.sharedMaxAge == 30 && control.staleIfError == 5)
        #expect(CacheControl(["max-age=abc"]).maxAge == 0, "a malformed max-age is stale")
        #expect(HTTPDate.parse("Sun, 06 Nov 1994 08:49:37 GMT") == 784_111_777)
        #expect(HTTPDate.parse("Sunday, 06-Nov-94 08:49:37 GMT") == 784_111_777)
        #expect(HTTPDate.parse("Sun Nov  6 08:49:37 1994") == 784_111_777)
        #expect(HTTPDate.parse("0") == nil)
        #expect(HTTPDate.parse("SUN, 06 NOV 1994 08:49:37 gmt") == 784_111_777, "names in any case")
        for invalid in [
            "Sun, 06 Nov 1994 8:49:37 GMT", "Sat, 06 Nov 60 08:49:37 GMT", "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06-Nov-1994 08:49:37 GMT",
            "Sun, 06 Nov 1994  08:49:37 GMT", "Sun 06 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37", "Sun Nov 6 08:49:37 1994",
            "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT", "Funday, 06-Nov-94 08:49:37 GMT",
            "Sunday, 06-Nov-+9 08:49:37 GMT",
        ] {
            #expect(HTTPDate.parse(invalid) == nil, "\(invalid)")
        }
        #expect(CacheControl(["max-age = 5"]).maxAge == 0 && CacheControl(["max-age=5, max-age=6"]).maxAge == 0)
        #expect(
            CacheControl(["no-cache=\"a, max-age=1\", max-age=7"]).maxAge == 7,
            "a comma inside quotes separates nothing")
        #expect(CacheControl(["max-age=60, x=\"y, private"]).isPrivate, "an unclosed quote hides no directive")
        #expect(CacheControl(targeted: "private=\"Set-Cookie\", max-age=60")?.isPrivate == true)
        #expect(CacheControl(targeted: "max-age=1.5")?.maxAge == 0 && CacheControl(targeted: "") == nil)
        #expect(CacheControl(targeted: "max-age=60, no-store").map { $0.maxAge == 60 && $0.noStore } == true)
        #expect(CacheControl(targeted: "max-age=\"60\"")?.maxAge == 0, "a string is not a max-age: stale")
        #expect(CacheControl(targeted: "max-age=6 0") == nil, "not a dictionary: ignored")
        #expect(EntityTag.list("\"a,b\", W/\"c\"") == [EntityTag("\"a,b\""), EntityTag("W/\"c\"")])
        #expect(
            !EntityTag("W/\"c\"").stronglyMatches(EntityTag("\"c\""))
                && EntityTag("W/\"c\"").weaklyMatches(EntityTag("c")))
        #expect(ByteRange("bytes=-0")?.bounds(length: 10) == nil && ByteRange("bytes=5-2") == nil)
        #expect(
            ByteRange("bytes=3-")?.bounds(length: 10) == 3...9 && ByteRange("bytes=-20")?.bounds(length: 10) == 0...9)
    }

    @Test func entriesRoundTripAndAgeFollowsRFC9111() throws {
        let entry = CacheEntry(
            status: 200, headers: [("ETag", "\"x\""), ("Content-Type", "text/plain")],
            body: ByteBuffer(bytes: [0, 1, 2, 255]), responseTime: 1_000_000, initialAge: 5_000,
            freshness: .init(
                lifetime: 60_000, staleWhileRevalidate: 1, staleIfError: 2, noCache: true, mustRevalidate: false),
            vary: [("accept", "a")])
        let decoded = try #require(CacheEntry.decode(entry.encoded()))
        #expect(decoded.body == entry.body && decoded.freshness == entry.freshness && decoded.etag == "\"x\"")
        #expect(decoded.vary.first?.value == "a")
        #expect(decoded.age(now: 1_010_000) == 15_000)
        #expect(decoded.freshnessLeft(now: 1_010_000) == 45_000)
        #expect(CacheEntry.decode(VaryMarker.encoded(["accept"])) == nil)

        var route = RouteCache()
        route.maxTTL = .seconds(3600)
        let facts = CachePolicy.RequestFacts(
            authenticated: false, keyedPerConsumer: false, noStore: false, headers: [:], requestTime: 99_000)
        let stored = try CachePolicy.evaluate(
            status: 200, headers: [("Cache-Control", "max-age=100"), ("Age", "10")], request: facts,
            responseTime: 100_000, route: route
        ).get()
        #expect(stored.initialAge == 11_000, "Age plus the response delay")
        #expect(stored.freshness.lifetime == 100_000)
        // Date has whole seconds: one of this very second adds no age, one 3 s back adds 3 s.
        func apparentAge(date: String) throws -> Int64 {
            let later = CachePolicy.RequestFacts(
                authenticated: false, keyedPerConsumer: false, noStore: false, headers: [:], requestTime: 100_900)
            return try CachePolicy.evaluate(
                status: 200, headers: [("Cache-Control", "max-age=1"), ("Date", date)], request: later,
                responseTime: 100_950, route: route
            ).get().initialAge
        }
        #expect(try apparentAge(date: "Thu, 01 Jan 1970 00:01:40 GMT") == 50)
        #expect(try apparentAge(date: "Thu, 01 Jan 1970 00:01:37 GMT") == 3_000)

        // The route's stale windows do not apply to s-maxage (it carries proxy-revalidate); the origin's do.
        route.staleIfError = .seconds(60)
        let shared = try CachePolicy.evaluate(
            status: 200, headers: [("Cache-Control", "s-maxage=10")], request: facts, responseTime: 100_000,
            route: route
        ).get()
        #expect(shared.freshness.staleIfError == 0)
        let explicit = try CachePolicy.evaluate(
            status: 200, headers: [("Cache-Control", "max-age=10, stale-if-error=999999999")], request: facts,
            responseTime: 100_000, route: route
        ).get()
        #expect(explicit.freshness.staleIfError == route.maxTTL.milliseconds, "capped at max_ttl")
        #expect(CacheSkip.noStore.startsPass(status: 200) && !CacheSkip.status.startsPass(status: 503))
        #expect(!CacheSkip.authorization.startsPass(status: 200))
    }

    @Test func keysSeparateConsumersHostsAndQueries() {
        func key(host: String = "a", query: Substring? = "x=1&y=2", consumer: String? = nil) -> CacheKey {
            CacheKey(
                route: "r", scheme: "http", host: host, path: "/p", query: query, droppingParameter: "api_key",
                keyHeaders: [], headers: [:], consumer: consumer)
        }
        #expect(key(consumer: "alice").base != key(consumer: "bob").base)
        #expect(key(consumer: "alice").base != key().base)
        #expect(key(host: "b").base != key().base)
        #expect(key(query: "y=2&x=1").base == key().base)
        #expect(key(query: "y=2&x=1&api_key=secret").base == key().base)
    }
}
