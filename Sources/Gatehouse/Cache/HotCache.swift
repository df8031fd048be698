import NIOCore
import NIOHTTP1
import Synchronization

/// Hot entries of the shared cache, kept in this process for a moment (the route's `local_ttl`) so frequent hits
/// skip the Redis round trip.
///
/// Only fresh entries are answered from here; everything else (stale, `no-cache`, revalidation) goes to Redis.
/// Purges and invalidations reach every instance's copy at once through Redis pub/sub; while that subscription is
/// down the layer is emptied and unused, because a purge could pass unseen. Memory is bounded by `maxBytes`.
final class HotCache: Sendable {
    enum Value {
        case entry(CacheEntry)
        case marker([String])
    }

    private struct Item {
        var value: Value
        var version: CacheVersion
        /// Monotonic deadline in nanoseconds.
        var until: UInt64
        var bytes: Int
    }

    private struct State {
        /// Items by route, path and field, as the records in Redis.
        var routes: [String: [String: [String: Item]]] = [:]
        var bytes = 0
        var live = false
        /// Counts purges, so a Redis read that raced a purge does not put back what the purge removed.
        var epoch: UInt64 = 0
    }

    let maxBytes: Int
    private let state = Mutex(State())

    init(maxBytes: Int) {
        self.maxBytes = maxBytes
    }

    /// The purge count now, or nil while the layer is not in use.
    var epoch: UInt64? { state.withLock { $0.live ? $0.epoch : nil } }

    /// A fresh entry for the key, if this process holds one.
    func lookup(_ key: CacheKey, headers: HTTPHeaders, nowMilliseconds: Int64) -> (CacheEntry, CacheToken)? {
        let now = NIODeadline.now().uptimeNanoseconds
        return state.withLock { state -> (CacheEntry, CacheToken)? in
            guard state.live, let fields = state.routes[key.route]?[key.path] else { return nil }
            var item = fields[key.base]
            if let marker = fields[key.markerField], marker.until > now, case .marker(let names) = marker.value {
                item = fields[key.variantField(names.map { ($0, CacheKey.headerValue(headers, $0)) })]
            }
            guard let item, item.until > now, case .entry(let entry) = item.value,
                !entry.freshness.noCache, entry.freshnessLeft(now: nowMilliseconds) > 0
            else { return nil }
            return (entry, CacheToken(version: item.version, epoch: state.epoch))
        }
    }

    /// Keeps fields of a path's record for `milliseconds`, unless a purge happened since `epoch`.
    func put(
        _ key: CacheKey, set: [(field: String, value: Value)], remove: [String] = [], version: CacheVersion,
        milliseconds: Int64, epoch: UInt64
    ) {
        guard milliseconds > 0 else { return }
        let until = NIODeadline.now().uptimeNanoseconds + UInt64(milliseconds) * 1_000_000
        state.withLock { state in
            guard state.live, state.epoch == epoch else { return }
            var fields = state.routes[key.route]?[key.path] ?? [:]
            for field in remove { state.bytes -= fields.removeValue(forKey: field)?.bytes ?? 0 }
            for (field, value) in set {
                let bytes = Self.size(of: value) + field.utf8.count
                state.bytes += bytes - (fields[field]?.bytes ?? 0)
                fields[field] = Item(value: value, version: version, until: until, bytes: bytes)
            }
            state.routes[key.route, default: [:]][key.path] = fields
            if state.bytes > maxBytes { Self.evict(&state, limit: maxBytes * 3 / 4) }
        }
    }

    /// Drops a path's items, or a route's.
    func purge(route: String, path: String?) {
        state.withLock { state in
            state.epoch &+= 1
            let removed: [[String: Item]]
            if let path {
                removed = state.routes[route]?.removeValue(forKey: path).map { [$0] } ?? []
            } else {
                removed = state.routes.removeValue(forKey: route).map { Array($0.values) } ?? []
            }
            for fields in removed { state.bytes -= fields.values.reduce(0) { $0 + $1.bytes } }
        }
    }

    /// The pub/sub subscription came up (use the layer) or went down (empty it and stop using it).
    func setLive(_ live: Bool) {
        state.withLock { state in
            state.live = live
            state.epoch &+= 1
            state.routes = [:]
            state.bytes = 0
        }
    }

    private static func size(of value: Value) -> Int {
        switch value {
        case .entry(let entry):
            return entry.body.readableBytes + entry.headers.reduce(64) { $0 + $1.name.utf8.count + $1.value.utf8.count }
        case .marker(let names): return names.reduce(16) { $0 + $1.utf8.count }
        }
    }

    /// Drops expired items, then whole paths, until memory is under `limit`.
    private static func evict(_ state: inout State, limit: Int) {
        let now = NIODeadline.now().uptimeNanoseconds
        for (route, paths) in state.routes {
            for (path, fields) in paths {
                let expired = fields.filter { $0.value.until <= now }
                guard !expired.isEmpty else { continue }
                state.bytes -= expired.values.reduce(0) { $0 + $1.bytes }
                let kept = fields.filter { $0.value.until > now }
                state.routes[route]?[path] = kept.isEmpty ? nil : kept
            }
        }
        while state.bytes > limit, let route = state.routes.keys.first {
            guard let path = state.routes[route]?.keys.first else {
                state.routes[route] = nil
                continue
            }
            state.bytes -= state.routes[route]?.removeValue(forKey: path)?.values.reduce(0) { $0 + $1.bytes } ?? 0
            if state.routes[route]?.isEmpty == true { state.routes[route] = nil }
        }
    }
}
