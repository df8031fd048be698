import CoreMetrics
import GatehouseConfig
import Logging
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization

/// Where a request's response lives in the cache (SPEC §4): the route and normalised path pick the record, so
/// one purge or invalidation reaches every variant of a path; method, scheme, host, sorted query, the route's
/// `key_headers` and the consumer pick the field. HEAD is answered from GET's entries.
struct CacheKey: Sendable, Hashable {
    let route: String
    let path: String
    let base: String

    init(
        route: String, scheme: String, host: String, path: String, query: Substring?, droppingParameter: String?,
        keyHeaders: [String], headers: HTTPHeaders, consumer: String?
    ) {
        self.route = route
        self.path = path
        var base = "GET " + scheme + "://" + host + "?"
        if let query, !query.isEmpty {
            let pairs = query.split(separator: "&").filter { pair in
                guard let droppingParameter else { return true }
                return (pair.split(separator: "=", maxSplits: 1).first ?? "") != droppingParameter
            }
            base += pairs.sorted().joined(separator: "&")
        }
        for name in keyHeaders { base += "\n" + name.lowercased() + ": " + headers[name].joined(separator: ", ") }
        if let consumer { base += "\n@" + consumer }
        self.base = base
    }

    /// The field listing the headers this resource varies on.
    var markerField: String { base + CacheFields.separator }

    /// The field of the variant chosen by these request header values.
    func variantField(_ vary: [(name: String, value: String)]) -> String {
        var field = markerField
        for (name, value) in vary { field += name + "=" + value + "\n" }
        return field
    }

    /// The key concurrent misses coalesce on.
    var flightKey: String { route + "\u{0}" + path + "\u{0}" + base }
}

/// The response cache of one gateway process: lookups and stores in the shared store, request coalescing,
/// and metrics. The event-loop side of an exchange lives in ``CacheExchange``.
final class ResponseCache: Sendable {
    let store: SharedStore
    let flights = FlightBoard()
    private let logger: Logger

    init(store: SharedStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    /// What a lookup found.
    enum Lookup: Sendable {
        /// An entry for this request (fresh or not); `generation` is where a refreshed one is written.
        case found(CacheEntry, generation: Int64)
        /// Nothing usable; `varyMiss` when the resource is stored, but not for these header values.
        case miss(generation: Int64, varyMiss: Bool)
        /// The store could not be asked (Redis away or slow).
        case unavailable
    }

    func lookup(_ key: CacheKey, headers: HTTPHeaders) async -> Lookup {
        do {
            let record = try await store.cacheRead(
                route: key.route, path: key.path, fields: [key.base, key.markerField])
            if let marker = record.values.count > 1 ? record.values[1] : nil, let names = VaryMarker.decode(marker) {
                let vary = names.map { ($0, headers[$0].joined(separator: ", ")) }
                let variant = try await store.cacheRead(
                    route: key.route, path: key.path, fields: [key.variantField(vary)])
                guard let bytes = variant.values.first ?? nil, let entry = CacheEntry.decode(bytes) else {
                    return .miss(generation: variant.generation, varyMiss: true)
                }
                return .found(entry, generation: variant.generation)
            }
            guard let bytes = record.values.first ?? nil, let entry = CacheEntry.decode(bytes) else {
                return .miss(generation: record.generation, varyMiss: false)
            }
            return .found(entry, generation: record.generation)
        } catch {
            logger.debug("cache lookup failed", metadata: ["error": "\(error)"])
            return .unavailable
        }
    }

    /// Writes an entry in the background; a failure only costs a later miss.
    func write(_ entry: CacheEntry, key: CacheKey, generation: Int64, routeTTL: Int64, metrics: CacheMetrics) {
        let now = HTTPDate.nowMilliseconds()
        let keep = entry.storageMilliseconds(now: now, routeTTL: routeTTL)
        let set: [(field: String, value: [UInt8])]
        let remove: [String]
        if entry.vary.isEmpty {
            set = [(key.base, entry.encoded())]
            remove = [key.markerField]
        } else {
            set = [
                (key.markerField, VaryMarker.encoded(entry.vary.map(\.name))),
                (key.variantField(entry.vary), entry.encoded()),
            ]
            remove = [key.base]
        }
        let store = self.store
        let logger = self.logger
        Task {
            do {
                try await store.cacheWrite(
                    route: key.route, generation: generation, path: key.path, set: set, remove: remove,
                    expireMilliseconds: keep)
                metrics.stores.increment()
            } catch {
                metrics.storeErrors.increment()
                logger.debug("cache store failed", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Removes a path's entries (all variants, hosts and consumers), or a whole route's.
    func purge(route: String, path: String?) async throws -> Int {
        try await store.cachePurge(route: route, path: path)
    }
}

/// Concurrent misses for one key on this instance: the first request goes upstream, the others wait for the
/// entry it makes. Shared by every event loop.
final class FlightBoard: Sendable {
    /// Someone waiting for a flight, called on its own event loop with the entry, or nil when there is none.
    struct Waiter: Sendable {
        let eventLoop: EventLoop
        let callback: @Sendable (CacheEntry?) -> Void
    }

    private let flights = Mutex<[String: [Waiter]]>([:])

    /// Whether this request leads (no flight for the key yet) or was added as a waiter.
    func join(_ key: String, waiter: Waiter?) -> Bool {
        flights.withLock { flights in
            if flights[key] == nil {
                flights[key] = []
                return true
            }
            if let waiter { flights[key]?.append(waiter) }
            return false
        }
    }

    /// Ends a flight and hands its entry (or nil) to everyone waiting.
    func land(_ key: String, entry: CacheEntry?) {
        let waiters = flights.withLock { $0.removeValue(forKey: key) } ?? []
        for waiter in waiters { waiter.eventLoop.execute { waiter.callback(entry) } }
    }

    var count: Int { flights.withLock { $0.count } }
}

/// The cache metrics of one route.
final class CacheMetrics: Sendable {
    let hits: CoreMetrics.Counter
    let misses: CoreMetrics.Counter
    let staleWhileRevalidate: CoreMetrics.Counter
    let staleIfError: CoreMetrics.Counter
    let revalidations: CoreMetrics.Counter
    let notModified: CoreMetrics.Counter
    let coalesced: CoreMetrics.Counter
    let stores: CoreMetrics.Counter
    let storeErrors: CoreMetrics.Counter
    let bypassed: CoreMetrics.Counter
    private let skipped: [CacheSkip: CoreMetrics.Counter]

    init(route: String, factory: PrometheusMetricsFactory) {
        func counter(_ name: String, _ extra: [(String, String)] = []) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: name, dimensions: [("route", route)] + extra, factory: factory)
        }
        hits = counter("gatehouse_cache_hits_total")
        misses = counter("gatehouse_cache_misses_total")
        staleWhileRevalidate = counter("gatehouse_cache_stale_served_total", [("reason", "while-revalidate")])
        staleIfError = counter("gatehouse_cache_stale_served_total", [("reason", "if-error")])
        revalidations = counter("gatehouse_cache_revalidations_total", [("result", "modified")])
        notModified = counter("gatehouse_cache_revalidations_total", [("result", "not-modified")])
        coalesced = counter("gatehouse_cache_coalesced_total")
        stores = counter("gatehouse_cache_stores_total")
        storeErrors = counter("gatehouse_cache_store_errors_total")
        bypassed = counter("gatehouse_cache_bypassed_total")
        var skipped: [CacheSkip: CoreMetrics.Counter] = [:]
        for reason in CacheSkip.allCases {
            skipped[reason] = counter("gatehouse_cache_skipped_total", [("reason", reason.rawValue)])
        }
        self.skipped = skipped
    }

    func skipped(_ reason: CacheSkip) { skipped[reason]?.increment() }
}
