import Foundation
import GatehouseConfig
import NIOCore
import Synchronization

/// ``SharedStore`` in this process's memory (`memory://`): exact for one instance, which is the whole fleet.
final class MemoryStore: SharedStore {
    private struct Entry {
        var value: [UInt8]
        var expires: UInt64?
    }

    private let entries = Mutex<[String: Entry]>([:])
    private let limiter = LocalRateLimiter()

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

    /// One instance: memory is exact.
    func rateLimit(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome> {
        eventLoop.makeSucceededFuture(limiter.check(checks))
    }

    // The fleet is this process: a lock is a key here.

    func lock(_ name: String, milliseconds: Int64, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        let now = Self.now()
        let taken = entries.withLock { entries -> Bool in
            if let held = entries["lock:" + name], held.expires.map({ $0 > now }) ?? true { return false }
            entries["lock:" + name] = Entry(value: [], expires: Self.expiry(Int(milliseconds)))
            return true
        }
        return eventLoop.makeSucceededFuture(taken)
    }

    func isLocked(_ name: String, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        let now = Self.now()
        let held = entries.withLock { entries in entries["lock:" + name]?.expires.map { $0 > now } ?? false }
        return eventLoop.makeSucceededFuture(held)
    }

    func unlock(_ name: String, on eventLoop: EventLoop) {
        entries.withLock { entries in entries["lock:" + name] = nil }
    }

    func close() async {}

    /// Drops expired entries (run now and then on writes, so memory does not grow with dead keys).
    private static func purge(_ entries: inout [String: Entry], now: UInt64) {
        entries = entries.filter { $0.value.expires.map { $0 > now } ?? true }
    }
}
