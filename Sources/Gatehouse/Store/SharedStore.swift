import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOPosix
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
    /// ``get(_:)`` answered on `eventLoop`, for request paths.
    func get(_ key: String, on eventLoop: EventLoop) -> EventLoopFuture<[UInt8]?>
    /// Sets a value, optionally expiring and only when absent; returns whether it was set.
    func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int?, onlyIfAbsent: Bool) async throws -> Bool
    /// Deletes keys; returns how many existed.
    func delete(_ keys: [String]) async throws -> Int
    /// Deletes `key` only while it still holds `value`; true when it did.
    func delete(_ key: String, ifEqualTo value: [UInt8]) async throws -> Bool
    /// Adds one to a counter, giving it an expiry when it is new; returns the new value.
    func increment(_ key: String, expireMilliseconds: Int?) async throws -> Int64

    // The response cache: per route and normalised path, one record whose fields are the stored variants.
    // A purge of a route moves it to a new generation, so no key listing (`KEYS`, `SCAN`) is ever needed; a purge
    // of a path bumps that path's version. A write names the version its lookup saw and is dropped when a purge
    // came in between, so a response fetched before a purge never lands after it.

    /// Reads fields of a path's record in the route's current generation; the answer arrives on `eventLoop`
    /// (request paths stay on their event loop: no task, no thread hop where the store allows).
    func cacheRead(route: String, path: String, fields: [String], on eventLoop: EventLoop)
        -> EventLoopFuture<CacheRecord>
    /// Writes and removes fields of a path's record, keeping it at least `expireMilliseconds`, unless the route
    /// or path was purged since `version` was read.
    func cacheWrite(
        route: String, version: CacheVersion, path: String, set: [(field: String, value: [UInt8])],
        remove: [String], expireMilliseconds: Int64, on eventLoop: EventLoop
    ) -> EventLoopFuture<Void>
    /// Removes a path's record, or with no path every record of the route; returns how many entries went.
    /// Every instance watching purges hears of it.
    func cachePurge(route: String, path: String?) async throws -> Int
    /// Takes the fleet-wide lock on fetching one missing entry for `milliseconds`; true when this caller has it.
    func cacheLock(route: String, name: String, milliseconds: Int64, on eventLoop: EventLoop) -> EventLoopFuture<Bool>
    /// Whether some instance holds that lock.
    func cacheLockHeld(route: String, name: String, on eventLoop: EventLoop) -> EventLoopFuture<Bool>
    func cacheUnlock(route: String, name: String, on eventLoop: EventLoop)
    /// Whether state is shared with other instances through Redis (false for `memory://`).
    var usesRedis: Bool { get }
    /// Runs the rate-limit script over the request's buckets (Redis only).
    func rateLimit(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome>
    /// Tells `onPurge` of every purge by any instance, and `onLive` when that news starts and stops flowing;
    /// false when the store has no other instances to hear from (memory).
    func watchCachePurges(
        onPurge: @escaping @Sendable (_ route: String, _ path: String?) -> Void,
        onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool
    /// Tells every instance, this one too, that an upstream target asked for a pause (nothing for memory).
    func announcePause(_ pause: TargetPause)
    /// Tells `onPause` of every pause any instance announces, and `onLive` when that news starts and stops
    /// flowing; false when there are no other instances (memory).
    func watchPauses(
        onPause: @escaping @Sendable (TargetPause) -> Void, onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool
    func close() async
}

/// Fields read from a cached path's record, with the version they were read in.
struct CacheRecord: Sendable {
    var version: CacheVersion
    var values: [[UInt8]?]
}

/// Which purges a read has seen: the route's generation and the path's version.
struct CacheVersion: Sendable, Equatable {
    var generation: Int64
    var path: Int64

    static let initial = CacheVersion(generation: 0, path: 0)
}

/// Field names in a path's record: a variant field ends in a separator and the varying header values; the
/// marker that lists a resource's `Vary` headers is the base field plus the separator alone.
enum CacheFields {
    static let separator = "\u{1}"

    /// Whether a field holds a response (not a Vary marker), for counting purged entries.
    static func isEntry(_ field: String) -> Bool { !field.hasSuffix(separator) }
}

/// ``SharedStore`` on Redis, with every key under the configured prefix.
final class RedisStore: SharedStore {
    let client: RedisClient
    private let prefix: String
    private let display: String
    private let group: EventLoopGroup
    private let logger: Logger
    private let subscriptions = Mutex<[RedisSubscription]>([])

    init(
        client: RedisClient, prefix: String, display: String,
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger = Logger(label: "gatehouse")
    ) {
        self.client = client
        self.prefix = prefix
        self.display = display
        self.group = group
        self.logger = logger
    }

    var problem: String? { client.isConnected ? nil : "redis: not connected to \(display)" }

    func get(_ key: String) async throws -> [UInt8]? {
        try await client.get(prefix + key)
    }

    func get(_ key: String, on eventLoop: EventLoop) -> EventLoopFuture<[UInt8]?> {
        client.send(["GET", .string(prefix + key)], on: eventLoop).map(\.bytes)
    }

    func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int?, onlyIfAbsent: Bool) async throws -> Bool {
        try await client.set(prefix + key, value, expireMilliseconds: expireMilliseconds, onlyIfAbsent: onlyIfAbsent)
    }

    func delete(_ keys: [String]) async throws -> Int {
        guard !keys.isEmpty else { return 0 }
        return Int(try await client.send(["DEL"] + keys.map { .string(prefix + $0) }).integer ?? 0)
    }

    static let deleteIfEqualScript = RedisScript(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")

    func delete(_ key: String, ifEqualTo value: [UInt8]) async throws -> Bool {
        let reply = try await client.evalsha(Self.deleteIfEqualScript, keys: [prefix + key], arguments: [.bytes(value)])
        return reply.integer == 1
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

    /// Keys: `cache:{route}:gen` holds the route's generation; `cache:{route}:pv:{path}` a path's version;
    /// `cache:{route}:{gen}:{path}` is a path's record (a hash); `cache:{route}:{gen}:#` counts the entries written
    /// in that generation, for the purge answer.
    private func cacheKey(_ route: String, _ rest: String) -> String { prefix + "cache:" + route + ":" + rest }

    static let cacheReadScript = RedisScript(
        """
        local g = redis.call('GET', KEYS[1]) or '0'
        local out = {g, redis.call('GET', ARGV[1] .. 'pv:' .. ARGV[2]) or '0'}
        local record = ARGV[1] .. g .. ':' .. ARGV[2]
        for i = 3, #ARGV do out[#out + 1] = redis.call('HGET', record, ARGV[i]) end
        return out
        """)

    /// KEYS: record, counter, generation, path version. ARGV: ttl, generation and path version seen, the number of
    /// fields to remove, those fields, then field/value pairs. Returns 0 when a purge came in between.
    static let cacheWriteScript = RedisScript(
        """
        if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[2] or (redis.call('GET', KEYS[4]) or '0') ~= ARGV[3] then
          return 0
        end
        local ttl = tonumber(ARGV[1])
        local removals = tonumber(ARGV[4])
        for i = 5, 4 + removals do
          if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 and string.byte(ARGV[i], -1) ~= 1 then
            redis.call('DECR', KEYS[2])
          end
        end
        for i = 5 + removals, #ARGV, 2 do
          if redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 and string.byte(ARGV[i], -1) ~= 1 then
            redis.call('INCR', KEYS[2])
          end
        end
        for i = 1, 2 do
          if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
        end
        return 1
        """)

    /// Purges and tells every instance (`PUBLISH` on the purge channel: route, newline, path or nothing).
    static let cachePurgeScript = RedisScript(
        """
        local g = redis.call('GET', KEYS[1]) or '0'
        local counter = ARGV[1] .. g .. ':#'
        redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\\n' .. ARGV[2])
        if ARGV[2] == '' then
          local n = tonumber(redis.call('GET', counter) or '0')
          redis.call('INCR', KEYS[1])
          return n
        end
        local version = ARGV[1] .. 'pv:' .. ARGV[2]
        redis.call('INCR', version)
        redis.call('PEXPIRE', version, 86400000)
        local record = ARGV[1] .. g .. ':' .. ARGV[2]
        local n = 0
        for _, field in ipairs(redis.call('HKEYS', record)) do
          if string.byte(field, -1) ~= 1 then n = n + 1 end
        end
        redis.call('DEL', record)
        if n > 0 and redis.call('EXISTS', counter) == 1 then redis.call('DECRBY', counter, n) end
        return n
        """)

    func cacheRead(route: String, path: String, fields: [String], on eventLoop: EventLoop)
        -> EventLoopFuture<CacheRecord>
    {
        client.evalsha(
            Self.cacheReadScript, keys: [cacheKey(route, "gen")],
            arguments: [.string(cacheKey(route, "")), .string(path)] + fields.map { .string($0) }, on: eventLoop
        ).flatMapThrowing { reply in
            guard case .array(let items?) = reply, items.count >= 2,
                let generation = items[0].string.flatMap({ Int64($0) }),
                let pathVersion = items[1].string.flatMap({ Int64($0) })
            else {
                throw RedisError(.protocolError, "unexpected reply to the cache read")
            }
            return CacheRecord(
                version: CacheVersion(generation: generation, path: pathVersion),
                values: items.dropFirst(2).map(\.bytes))
        }
    }

    func cacheWrite(
        route: String, version: CacheVersion, path: String, set: [(field: String, value: [UInt8])],
        remove: [String], expireMilliseconds: Int64, on eventLoop: EventLoop
    ) -> EventLoopFuture<Void> {
        var arguments: [RedisArgument] = [
            .string(String(expireMilliseconds)), .string(String(version.generation)), .string(String(version.path)),
            .string(String(remove.count)),
        ]
        arguments += remove.map { .string($0) }
        for (field, value) in set { arguments += [.string(field), .bytes(value)] }
        let generation = version.generation
        return client.evalsha(
            Self.cacheWriteScript,
            keys: [
                cacheKey(route, "\(generation):\(path)"), cacheKey(route, "\(generation):#"), cacheKey(route, "gen"),
                cacheKey(route, "pv:" + path),
            ],
            arguments: arguments, on: eventLoop
        ).map { _ in }
    }

    func cachePurge(route: String, path: String?) async throws -> Int {
        let reply = try await client.evalsha(
            Self.cachePurgeScript, keys: [cacheKey(route, "gen")],
            arguments: [.string(cacheKey(route, "")), .string(path ?? ""), .string(purgeChannel), .string(route)])
        return Int(reply.integer ?? 0)
    }

    private var purgeChannel: String { prefix + "cache:purge" }

    var usesRedis: Bool { true }

    func rateLimit(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome> {
        client.evalsha(
            RateLimiter.script, keys: checks.map { prefix + $0.key }, arguments: RateLimiter.arguments(checks),
            on: eventLoop
        ).flatMapThrowing { try RateLimiter.outcome(checks, reply: $0) }
    }

    func cacheLock(route: String, name: String, milliseconds: Int64, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        client.send(
            ["SET", .string(cacheKey(route, "lock:" + name)), "1", "PX", .string(String(milliseconds)), "NX"],
            on: eventLoop
        ).map { !$0.isNull }
    }

    func cacheLockHeld(route: String, name: String, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        client.send(["EXISTS", .string(cacheKey(route, "lock:" + name))], on: eventLoop).map { $0.integer == 1 }
    }

    func cacheUnlock(route: String, name: String, on eventLoop: EventLoop) {
        _ = client.send(["DEL", .string(cacheKey(route, "lock:" + name))], on: eventLoop)
    }

    func watchCachePurges(
        onPurge: @escaping @Sendable (_ route: String, _ path: String?) -> Void,
        onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool {
        let watcher = RedisSubscription(
            configuration: client.configuration, channel: purgeChannel, eventLoop: group.next(), logger: logger,
            onMessage: { payload in
                let text = String(decoding: payload, as: UTF8.self)
                guard let newline = text.firstIndex(of: "\n") else { return }
                let path = text[text.index(after: newline)...]
                onPurge(String(text[..<newline]), path.isEmpty ? nil : String(path))
            }, onLive: onLive)
        subscriptions.withLock { $0.append(watcher) }
        return true
    }

    private var pauseChannel: String { prefix + "upstream:pause" }

    func announcePause(_ pause: TargetPause) {
        _ = client.send(["PUBLISH", .string(pauseChannel), .string(pause.encoded)], on: group.next())
    }

    func watchPauses(
        onPause: @escaping @Sendable (TargetPause) -> Void, onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool {
        let watcher = RedisSubscription(
            configuration: client.configuration, channel: pauseChannel, eventLoop: group.next(), logger: logger,
            onMessage: { payload in
                if let pause = TargetPause(encoded: String(decoding: payload, as: UTF8.self)) { onPause(pause) }
            }, onLive: onLive)
        subscriptions.withLock { $0.append(watcher) }
        return true
    }

    func close() async {
        for watcher in subscriptions.withLock({ $0 }) { await watcher.close() }
        await client.close()
    }
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

    func get(_ key: String, on eventLoop: EventLoop) -> EventLoopFuture<[UInt8]?> {
        let now = Self.now()
        let value = entries.withLock { entries -> [UInt8]? in
            guard let entry = entries[key], entry.expires.map({ $0 > now }) ?? true else { return nil }
            return entry.value
        }
        return eventLoop.makeSucceededFuture(value)
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

    func delete(_ key: String, ifEqualTo value: [UInt8]) async throws -> Bool {
        entries.withLock { entries in
            guard entries[key]?.value == value else { return false }
            entries[key] = nil
            return true
        }
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

    /// A path's record in memory: its variants, when it expires, and its place in the write order.
    private struct Record {
        var fields: [String: [UInt8]]
        var expires: UInt64
        var written: UInt64 = 0

        var bytes: Int { fields.reduce(0) { $0 + $1.key.utf8.count + $1.value.count } }
    }

    /// A route's records by path, and the versions purges have moved it and its paths to.
    private struct RouteRecords {
        var paths: [String: Record] = [:]
        var generation: Int64 = 0
        var pathVersions: [String: Int64] = [:]

        func version(of path: String) -> CacheVersion {
            CacheVersion(generation: generation, path: pathVersions[path] ?? 0)
        }
    }

    /// The records, and the bytes their fields hold in all.
    private let records = Mutex<(routes: [String: RouteRecords], bytes: Int)>(([:], 0))
    private let writes = Atomic<Int>(0)
    /// `redis.memory_cache_bytes`: past it, expired records go, then the least recently written.
    private let cacheBytes: Int

    init(cacheBytes: Int = 256 << 20) {
        self.cacheBytes = cacheBytes
    }

    func cacheRead(route: String, path: String, fields: [String], on eventLoop: EventLoop)
        -> EventLoopFuture<CacheRecord>
    {
        let now = Self.now()
        let record = records.withLock { records in
            let routeRecords = records.routes[route] ?? RouteRecords()
            let version = routeRecords.version(of: path)
            guard let record = routeRecords.paths[path], record.expires > now else {
                return CacheRecord(version: version, values: fields.map { _ in nil })
            }
            return CacheRecord(version: version, values: fields.map { record.fields[$0] })
        }
        return eventLoop.makeSucceededFuture(record)
    }

    func cacheWrite(
        route: String, version: CacheVersion, path: String, set: [(field: String, value: [UInt8])],
        remove: [String], expireMilliseconds: Int64, on eventLoop: EventLoop
    ) -> EventLoopFuture<Void> {
        let now = Self.now()
        let expires = now + UInt64(max(0, expireMilliseconds)) * 1_000_000
        let count = writes.wrappingAdd(1, ordering: .relaxed).newValue
        let limit = cacheBytes
        records.withLock { records in
            var routeRecords = records.routes[route] ?? RouteRecords()
            guard routeRecords.version(of: path) == version else { return }
            var record = routeRecords.paths[path] ?? Record(fields: [:], expires: expires)
            records.bytes -= record.bytes
            if record.expires <= now { record = Record(fields: [:], expires: expires) }
            for field in remove { record.fields[field] = nil }
            for (field, value) in set { record.fields[field] = value }
            record.expires = max(record.expires, expires)
            record.written = UInt64(count)
            records.bytes += record.bytes
            routeRecords.paths[path] = record
            records.routes[route] = routeRecords
            if count % 1024 == 0 || records.bytes > limit { Self.evict(&records, now: now, limit: limit) }
        }
        return eventLoop.makeSucceededVoidFuture()
    }

    /// Drops expired records and, while more than `limit` bytes remain, the least recently written, down to 90%
    /// of it (so a full cache does not evict on every write).
    private static func evict(_ records: inout (routes: [String: RouteRecords], bytes: Int), now: UInt64, limit: Int) {
        var live: [(route: String, path: String, written: UInt64, bytes: Int)] = []
        var bytes = 0
        for (route, routeRecords) in records.routes {
            var kept = routeRecords
            kept.paths = routeRecords.paths.filter { $0.value.expires > now }
            for (path, record) in kept.paths {
                let size = record.bytes
                bytes += size
                live.append((route, path, record.written, size))
            }
            records.routes[route] = kept
        }
        if bytes > limit {
            let target = limit / 10 * 9
            for victim in live.sorted(by: { $0.written < $1.written }) {
                guard bytes > target else { break }
                records.routes[victim.route]?.paths[victim.path] = nil
                bytes -= victim.bytes
            }
        }
        records.bytes = bytes
    }

    func cachePurge(route: String, path: String?) async throws -> Int {
        let now = Self.now()
        return records.withLock { records in
            var routeRecords = records.routes[route] ?? RouteRecords()
            let removed: [Record]
            if let path {
                routeRecords.pathVersions[path, default: 0] += 1
                removed = routeRecords.paths.removeValue(forKey: path).map { [$0] } ?? []
            } else {
                routeRecords.generation += 1
                routeRecords.pathVersions = [:]
                removed = Array(routeRecords.paths.values)
                routeRecords.paths = [:]
            }
            records.routes[route] = routeRecords
            records.bytes -= removed.reduce(0) { $0 + $1.bytes }
            return removed.filter { $0.expires > now }.reduce(0) { total, record in
                total + record.fields.keys.filter(CacheFields.isEntry).count
            }
        }
    }

    func watchCachePurges(
        onPurge: @escaping @Sendable (_ route: String, _ path: String?) -> Void,
        onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool { false }

    func announcePause(_ pause: TargetPause) {}

    func watchPauses(
        onPause: @escaping @Sendable (TargetPause) -> Void, onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool { false }

    var usesRedis: Bool { false }

    func rateLimit(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome> {
        eventLoop.makeFailedFuture(RedisError(.unavailable, "memory:// keeps rate limits in the rate limiter"))
    }

    // One instance: coalescing inside the process is all there is, so the lock is always this caller's.
    func cacheLock(route: String, name: String, milliseconds: Int64, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        eventLoop.makeSucceededFuture(true)
    }

    func cacheLockHeld(route: String, name: String, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        eventLoop.makeSucceededFuture(false)
    }

    func cacheUnlock(route: String, name: String, on eventLoop: EventLoop) {}

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
            return MemoryStore(cacheBytes: config.memoryCacheBytes)
        }
        configuration.poolSize = config.poolSize
        configuration.connectTimeout = .nanoseconds(config.connectTimeout.nanoseconds)
        configuration.commandTimeout = .nanoseconds(config.commandTimeout.nanoseconds)
        return RedisStore(
            client: RedisClient(configuration: configuration, group: group, logger: logger, metrics: metrics.factory),
            prefix: config.keyPrefix, display: display(endpoint), group: group, logger: logger)
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
