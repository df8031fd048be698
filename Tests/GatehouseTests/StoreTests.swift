import DemoUpstream
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import Gatehouse
@testable import RedisClient

/// Both stores behave alike; `/readyz` follows Redis going away and coming back.
@Suite struct StoreTests {
    /// The Redis that Scripts/test started, or one of our own.
    static func sharedRedisURL() async throws -> (String, RedisServerProcess?) {
        if let url = ProcessInfo.processInfo.environment["GATEHOUSE_TEST_REDIS_URL"] { return (url, nil) }
        let server = try await RedisServerProcess()
        return ("redis://127.0.0.1:\(server.port)/0", server)
    }

    static func exercise(_ store: SharedStore, prefix: String) async throws {
        let key = "\(prefix)-\(UUID().uuidString)"
        #expect(try await store.get(key) == nil)
        #expect(try await store.set(key, [0, 1, 255], expireMilliseconds: nil, onlyIfAbsent: true))
        #expect(try await !store.set(key, [9], expireMilliseconds: nil, onlyIfAbsent: true))
        #expect(try await store.get(key) == [0, 1, 255])
        #expect(try await store.delete([key, key + "-none"]) == 1)
        // Room for a busy machine between the two increments; then past both expiries.
        #expect(try await store.increment(key + "-n", expireMilliseconds: 1500) == 1)
        #expect(try await store.increment(key + "-n", expireMilliseconds: 1500) == 2)
        _ = try await store.set(key + "-short", [1], expireMilliseconds: 100, onlyIfAbsent: false)
        try await Task.sleep(for: .milliseconds(1800))
        #expect(try await store.get(key + "-short") == nil)
        #expect(try await store.increment(key + "-n", expireMilliseconds: 400) == 1, "the counter expired")
        try await exerciseLock(store, other: nil, name: key + "-lock")
    }

    /// The fleet lock: one holder at a time, given back by its holder only, and gone by itself when it expires.
    /// `other` is a second instance on the same store, when there is one.
    static func exerciseLock(_ store: SharedStore, other: SharedStore?, name: String) async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        #expect(try await store.lock(name, milliseconds: 5000, on: loop).get())
        #expect(try await !store.lock(name, milliseconds: 5000, on: loop).get())
        #expect(try await store.isLocked(name, on: loop).get())
        if let other {
            #expect(try await !other.lock(name, milliseconds: 5000, on: loop).get())
            other.unlock(name, on: loop)
            try await Task.sleep(for: .milliseconds(100))
            #expect(try await store.isLocked(name, on: loop).get(), "only its holder gives a lock back")
        }
        store.unlock(name, on: loop)
        let deadline = ContinuousClock.now + .seconds(2)
        while try await store.isLocked(name, on: loop).get(), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(try await store.lock(name, milliseconds: 100, on: loop).get(), "given back")
        try await Task.sleep(for: .milliseconds(300))
        #expect(try await !store.isLocked(name, on: loop).get(), "expired")
        #expect(try await (other ?? store).lock(name, milliseconds: 100, on: loop).get())
    }

    @Test func memoryStore() async throws {
        try await Self.exercise(MemoryStore(), prefix: "m")
    }

    @Test func redisStoreUsesTheKeyPrefix() async throws {
        let (url, server) = try await Self.sharedRedisURL()
        var redis = RedisConfig()
        redis.url = Secret(url)
        var config = try #require(try SharedStores.redisConfiguration(redis))
        config.commandTimeout = .seconds(2)
        let client = RedisClient(configuration: config)
        try await waitUntil { client.isConnected }
        let store = RedisStore(client: client, prefix: "gh-test:", display: url)
        try await Self.exercise(store, prefix: "r")
        let otherInstance = RedisStore(client: client, prefix: "gh-test:", display: url)
        try await Self.exerciseLock(store, other: otherInstance, name: "two-\(UUID().uuidString)")
        _ = try await store.set("visible", [1], expireMilliseconds: 5000, onlyIfAbsent: false)
        #expect(try await client.get("gh-test:visible") == [1])
        await store.close()
        _ = server
    }

    @Test func readinessFollowsRedisAwayAndBack() async throws {
        let redis = try await RedisServerProcess()
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port, redis: "redis://127.0.0.1:\(redis.port)/0",
                routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(yaml) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            #expect(try await request(port: h.adminPort, "/readyz").status == 200)

            await redis.kill()
            try await waitUntil { h.gateway.readinessProblem != nil }
            let degraded = try await request(port: h.adminPort, "/readyz")
            #expect(degraded.status == 503)
            #expect(degraded.text.contains("redis"))
            // Redis away is not an error for clients.
            #expect(try await request(port: h.port, "/x").status == 200)

            try await redis.start()
            try await waitUntil(timeout: .seconds(2)) { h.gateway.readinessProblem == nil }
            #expect(try await request(port: h.adminPort, "/readyz").status == 200)
            let metrics = try await request(port: h.adminPort, "/metrics").text
            let reconnects = metrics.split(separator: "\n").first { $0.hasPrefix("gatehouse_redis_reconnects_total ") }
            #expect((reconnects?.split(separator: " ").last).flatMap { Double($0) } ?? 0 >= 1)
        }
    }
}
