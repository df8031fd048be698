import Foundation
import GatehouseConfig
import Logging
import NIOCore
import RedisClient
import Synchronization

/// The state every gateway instance shares — cached responses, rate-limit counters, runtime API keys.
///
/// Two real implementations: ``RedisStore`` (many instances, one Redis) and ``MemoryStore`` (`memory://`:
/// one instance without Redis, and the fallback while Redis is away). The pipeline does not know which it has.
protocol SharedStore: Sendable {
    /// What is wrong with the store for `/readyz`, or nil when it serves.
    var problem: String? { get }
    func get(_ key: String) async throws -> [UInt8]?
    /// Sets a value, optionally expiring and only when absent; returns whether it was set.
    func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int?, onlyIfAbsent: Bool) async throws -> Bool
    /// Deletes keys; returns how many existed.
    func delete(_ keys: [String]) async throws -> Int
    /// Adds one to a counter, giving it an expiry when it is new; returns the new value.
    func increment(_ key: String, expireMilliseconds: Int?) async throws -> Int64
    func close() async
}

/// ``SharedStore`` on Redis, with every key under the configured prefix.
final class RedisStore: SharedStore {
    let client: RedisClient
    private let prefix: String
    private let display: String

    init(client: RedisClient, prefix: String, display: String) {
        self.client = client
        self.prefix = prefix
        self.display = display
    }

    var problem: String? { client.isConnected ? nil : "redis: not connected to \(display)" }

    func get(_ key: String) async throws -> [UInt8]? {
        try await client.get(prefix + key)
    }

    func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int?, onlyIfAbsent: Bool) async throws -> Bool {
        try await client.set(prefix + key, value, expireMilliseconds: expireMilliseconds, onlyIfAbsent: onlyIfAbsent)
    }

    func delete(_ keys: [String]) async throws -> Int {
        guard !keys.isEmpty else { return 0 }
        return Int(try await client.send(["DEL"] + keys.map { .string(prefix + $0) }).integer ?? 0)
    }

    static let incrementScript = RedisScript(
        """
        local n = redis.call('INCR', KEYS[1])
        if n == 1 and tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
        return n
        """)

    func increment(_ key: String, expireMilliseconds: Int?) async throws -> Int64 {
        let reply = try await client.evalsha(
            Self.incrementScript, keys: [prefix + key], arguments: [.string(String(expireMilliseconds ?? 0))])
        return reply.integer ?? 0
    }

    func close() async { await client.close() }
}

/// ``SharedStore`` in this process's memory: exact for one instance, per instance for many.
final class MemoryStore: SharedStore {
    private struct Entry {
        var value: [UInt8]
        var expires: UInt64?
    }

    private let entries = Mutex<[String: Entry]>([:])

    var problem: String? { nil }

    private static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    private static func expiry(_ milliseconds: Int?) -> UInt64? {
        milliseconds.map { now() + UInt64(max(0, $0)) * 1_000_000 }
    }

    func get(_ key: String) async throws -> [UInt8]? {
        let now = Self.now()
        return entries.withLock { entries in
            guard let entry = entries[key] else { return nil }
            if let expires = entry.expires, expires <= now {
                entries[key] = nil
                return nil
            }
            return entry.value
        }
    }

    func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int?, onlyIfAbsent: Bool) async throws -> Bool {
        let now = Self.now()
        return entries.withLock { entries in
            if onlyIfAbsent, let entry = entries[key], entry.expires.map({ $0 > now }) ?? true { return false }
            entries[key] = Entry(value: value, expires: Self.expiry(expireMilliseconds))
            if entries.count % 1024 == 0 { Self.purge(&entries, now: now) }
            return true
        }
    }

    func delete(_ keys: [String]) async throws -> Int {
        entries.withLock { entries in keys.reduce(0) { $0 + (entries.removeValue(forKey: $1) == nil ? 0 : 1) } }
    }

    func increment(_ key: String, expireMilliseconds: Int?) async throws -> Int64 {
        let now = Self.now()
        return entries.withLock { entries in
            var entry = entries[key]
            if let expires = entry?.expires, expires <= now { entry = nil }
            let current = entry.flatMap { Int64(String(decoding: $0.value, as: UTF8.self)) } ?? 0
            let next = current + 1
            entries[key] = Entry(
                value: Array(String(next).utf8), expires: entry?.expires ?? Self.expiry(expireMilliseconds))
            return next
        }
    }

    func close() async {}

    /// Drops expired entries (run now and then on writes, so memory does not grow with dead keys).
    private static func purge(_ entries: inout [String: Entry], now: UInt64) {
        entries = entries.filter { $0.value.expires.map { $0 > now } ?? true }
    }
}

/// Builds the store a config names.
enum SharedStores {
    static func make(_ config: RedisConfig, group: EventLoopGroup, logger: Logger, metrics: GatewayMetrics)
        -> SharedStore
    {
        guard let endpoint = config.endpoint, var configuration = redisConfiguration(for: endpoint) else {
            return MemoryStore()
        }
        configuration.poolSize = config.poolSize
        configuration.connectTimeout = .nanoseconds(config.connectTimeout.nanoseconds)
        configuration.commandTimeout = .nanoseconds(config.commandTimeout.nanoseconds)
        return RedisStore(
            client: RedisClient(configuration: configuration, group: group, logger: logger, metrics: metrics.factory),
            prefix: config.keyPrefix, display: display(endpoint))
    }

    /// The client configuration for a Redis endpoint; nil for `memory://`.
    static func redisConfiguration(for endpoint: RedisEndpoint) -> RedisConfiguration? {
        switch endpoint {
        case .memory:
            return nil
        case .tcp(let host, let port, let database, let username, let password):
            var configuration = RedisConfiguration(address: .tcp(host: host, port: port))
            configuration.database = database
            configuration.username = username
            configuration.password = password
            return configuration
        case .unix(let path, let database, let password):
            var configuration = RedisConfiguration(address: .unix(path: path))
            configuration.database = database
            configuration.password = password
            return configuration
        }
    }

    /// The endpoint without credentials, for `/readyz`.
    static func display(_ endpoint: RedisEndpoint) -> String {
        switch endpoint {
        case .memory: return "memory://"
        case .tcp(let host, let port, let database, _, _): return "\(host):\(port)/\(database)"
        case .unix(let path, let database, _): return "unix:\(path)?db=\(database)"
        }
    }
}
