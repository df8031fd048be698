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
        var base = ""
        base.reserveCapacity(scheme.utf8.count + host.utf8.count + (query?.utf8.count ?? 0) + 8)
        base += "GET "
        base += scheme
        base += "://"
        base += host
        base += "?"
        if let query, !query.isEmpty {
            let pairs = query.split(separator: "&").filter { pair in
                guard let droppingParameter else { return true }
                return (pair.split(separator: "=", maxSplits: 1).first ?? "") != droppingParameter
            }
            base += pairs.sorted().joined(separator: "&")
        }
        for name in keyHeaders { base += "\n" + name.lowercased() + ": " + Self.headerValue(headers, name) }
        if let consumer { base += "\n@" + consumer }
        self.base = base
    }

    /// A request header's value as the cache compares it (`key_headers`, `Vary`): all its lines as one list, each
    /// member trimmed, joined by ", ", so that `a,b`, `a , b` and two lines `a` and `b` are one variant.
    static func headerValue(_ headers: HTTPHeaders, _ name: String) -> String {
        let lines = headers[name]
        if lines.count == 1, !lines[0].contains(",") { return String(lines[0].trimmedSpaces) }
        return lines.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false) }.map(\.trimmedSpaces)
            .joined(separator: ", ")
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

    /// The fleet lock on fetching this entry when it is missing (`lock_timeout`).
    var fleetLock: String { "cache:" + route + ":" + path + "\u{0}" + base }
}

/// What a lookup saw, so that what it leads to is written only if no purge came in between: the store's
/// version of the path, and the hot layer's purge count (nil when that layer is not in use).
struct CacheToken: Sendable {
    var version: CacheVersion
    var epoch: UInt64?

    static let initial = CacheToken(version: .initial, epoch: nil)
}

/// The response cache of one gateway process: lookups and stores in the shared store, request coalescing,
/// and metrics. The event-loop side of an exchange lives in ``CacheExchange``.
final class ResponseCache: Sendable {
    let store: SharedStore
    let flights = FlightBoard()
    /// Hot entries in this process; nil with a memory store (it is local already) or `local_cache_bytes: 0`.
    let hot: HotCache?
    private let logger: Logger

    init(store: SharedStore, localBytes: Int, logger: Logger) {
        self.store = store
        self.logger = logger
        let hot = localBytes > 0 ? HotCache(maxBytes: localBytes) : nil
        let flights = self.flights
        // Every instance's flights hear of purges, with or without a hot layer: a purge ends a landing flight.
        let watching = store.watchCachePurges(
            onPurge: { route, path in
                hot?.purge(route: route, path: path)
                flights.purge(route: route, path: path)
            },
            onLive: { live in hot?.setLive(live) })
        self.hot = watching ? hot : nil
    }

    /// What a lookup found.
    enum Lookup: Sendable {
        /// An entry for this request (fresh or not); `generation` is where a refreshed one is written.
        case found(CacheEntry, CacheToken)
        /// Nothing usable; `varyMiss` when the resource is stored, but not for these header values.
        case miss(CacheToken, varyMiss: Bool)
        /// The store could not be asked (Redis away or slow).
        case unavailable
    }

    /// The entry held in this process's memory (for `local_ttl`), if there is one: no wait.
    func lookupLocal(_ key: CacheKey, headers: HTTPHeaders, localMilliseconds: Int64) -> Lookup? {
        guard localMilliseconds > 0, let hot,
            let (entry, token) = hot.lookup(key, headers: headers, nowMilliseconds: HTTPDate.nowMilliseconds())
        else { return nil }
        return .found(entry, token)
    }

    /// Looks a request's response up; the answer arrives on `eventLoop`. A fresh entry in the hot layer answers
    /// at once; otherwise one store round trip, two when the resource varies (the marker names the headers
    /// that pick the variant). `localMilliseconds` is how long what Redis returns may stay in the hot layer.
    func lookup(
        _ key: CacheKey, headers: HTTPHeaders, localMilliseconds: Int64, mayUseLocal: Bool, on eventLoop: EventLoop
    ) -> EventLoopFuture<Lookup> {
        let hot = localMilliseconds > 0 ? self.hot : nil
        if mayUseLocal, let found = lookupLocal(key, headers: headers, localMilliseconds: localMilliseconds) {
            return eventLoop.makeSucceededFuture(found)
        }
        let epoch = self.hot?.epoch
        @Sendable func keep(_ set: [(field: String, value: HotCache.Value)], version: CacheVersion) {
            guard let hot, let epoch else { return }
            hot.put(key, set: set, version: version, milliseconds: localMilliseconds, epoch: epoch)
        }
        let store = self.store
        let logger = self.logger
        return store.cacheRead(route: key.route, path: key.path, fields: [key.base, key.markerField], on: eventLoop)
            .flatMap { record -> EventLoopFuture<Lookup> in
                if let marker = record.values.count > 1 ? record.values[1] : nil,
                    let names = VaryMarker.decode(marker)
                {
                    let vary = names.map { ($0, CacheKey.headerValue(headers, $0)) }
                    let field = key.variantField(vary)
                    return store.cacheRead(route: key.route, path: key.path, fields: [field], on: eventLoop).map {
                        variant in
                        guard let bytes = variant.values.first ?? nil, let entry = CacheEntry.decode(bytes) else {
                            return .miss(CacheToken(version: variant.version, epoch: epoch), varyMiss: true)
                        }
                        keep([(key.markerField, .marker(names)), (field, .entry(entry))], version: variant.version)
                        return .found(entry, CacheToken(version: variant.version, epoch: epoch))
                    }
                }
                guard let bytes = record.values.first ?? nil, let entry = CacheEntry.decode(bytes) else {
                    let token = CacheToken(version: record.version, epoch: epoch)
                    return eventLoop.makeSucceededFuture(.miss(token, varyMiss: false))
                }
                keep([(key.base, .entry(entry))], version: record.version)
                return eventLoop.makeSucceededFuture(.found(entry, CacheToken(version: record.version, epoch: epoch)))
            }
            .recover { error in
                logger.debug("cache lookup failed", metadata: ["error": "\(error)"])
                return .unavailable
            }
    }

    /// Writes an entry in the background; a failure only costs a later miss. The future completes when the
    /// store has answered (either way).
    @discardableResult
    func write(
        _ entry: CacheEntry, key: CacheKey, token: CacheToken, config: RouteCache, metrics: CacheMetrics,
        on eventLoop: EventLoop
    ) -> EventLoopFuture<Void> {
        let now = HTTPDate.nowMilliseconds()
        let keep = entry.storageMilliseconds(now: now, routeTTL: config.ttl.milliseconds)
        let set: [(field: String, value: [UInt8])]
        let local: [(field: String, value: HotCache.Value)]
        let remove: [String]
        if entry.vary.isEmpty {
            set = [(key.base, entry.encoded())]
            local = [(key.base, .entry(entry))]
            remove = [key.markerField]
        } else {
            let names = entry.vary.map(\.name)
            let field = key.variantField(entry.vary)
            set = [(key.markerField, VaryMarker.encoded(names)), (field, entry.encoded())]
            local = [(key.markerField, .marker(names)), (field, .entry(entry))]
            remove = [key.base]
        }
        // The lookup's epoch: when a purge came in between, the memory copy is not kept.
        if let hot, let epoch = token.epoch {
            hot.put(
                key, set: local, remove: remove, version: token.version, milliseconds: config.localTTL.milliseconds,
                epoch: epoch)
        }
        let logger = self.logger
        let written = store.cacheWrite(
            route: key.route, version: token.version, path: key.path, set: set, remove: remove,
            expireMilliseconds: keep, on: eventLoop)
        written.whenComplete { result in
            switch result {
            case .success:
                metrics.stores.increment()
            case .failure(let error):
                metrics.storeErrors.increment()
                logger.debug("cache store failed", metadata: ["error": "\(error)"])
            }
        }
        return written.recover { _ in }
    }

    /// Removes a path's entries (all variants, hosts and consumers), or a whole route's, here and, through the
    /// store, in every instance's hot layer.
    func purge(route: String, path: String?) async throws -> Int {
        hot?.purge(route: route, path: path)
        flights.purge(route: route, path: path)
        return try await store.cachePurge(route: route, path: path)
    }
}

/// Concurrent misses for one key on this instance: the first request goes upstream, the others wait for the
/// entry it makes. Shared by every event loop.
///
/// A flight stays on the board, answering with its entry, until that entry's store write has completed; a miss
/// whose lookup began before then looks again instead of leading a second flight (its lookup may have been
/// answered before the write reached Redis).
///
/// A key whose response could not be stored is remembered for a while ("hit-for-pass"): its misses then go
/// upstream side by side instead of queueing behind one another for an answer they cannot share.
final class FlightBoard: Sendable {
    /// Someone waiting for a flight, called on its own event loop with the entry, or nil when there is none.
    struct Waiter: Sendable {
        let eventLoop: EventLoop
        let callback: @Sendable (CacheEntry?) -> Void
    }

    /// What a request that missed does.
    enum Role {
        /// Go upstream; others wait for this request's entry.
        case lead
        /// Added as a waiter.
        case wait
        /// Go upstream without a flight: the key's responses were not storable lately.
        case pass
        /// A flight just landed with this entry, which is still being written: answer from it.
        case landed(CacheEntry)
        /// A flight's entry was written after this request's lookup began: look it up again.
        case lookAgain
    }

    /// How long an unstorable key skips coalescing.
    static let passNanoseconds: UInt64 = 10_000_000_000
    /// How long a landing is remembered for lookups that began before it (longer than any lookup takes).
    static let landingNanoseconds: UInt64 = 5_000_000_000
    /// Keys remembered (as unstorable, or as just landed), at most; beyond it the oldest half is forgotten.
    static let rememberLimit = 10_000

    private enum Flight {
        case airborne([Waiter])
        /// Landed, its entry still being written; `id` tells this landing from a later one of the same key.
        case landing(CacheEntry, id: UInt64)
    }

    private struct State {
        var flights: [String: Flight] = [:]
        var passes: [String: UInt64] = [:]
        var landings: [String: UInt64] = [:]
        var nextLandingID: UInt64 = 0
    }

    private let state = Mutex(State())

    /// The board's clock, for `join`'s `lookupStarted`.
    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// `lookupStarted` (from `now()`) is when the request's store lookup began; nil for requests that looked
    /// nothing up.
    func join(_ key: String, waiter: Waiter?, lookupStarted: UInt64? = nil) -> Role {
        let now = Self.now()
        return state.withLock { state in
            if let until = state.passes[key] {
                if until > now { return .pass }
                state.passes[key] = nil
            }
            switch state.flights[key] {
            case .airborne(var waiters):
                guard let waiter else { return .pass }
                waiters.append(waiter)
                state.flights[key] = .airborne(waiters)
                return .wait
            case .landing(let entry, _):
                return waiter == nil ? .pass : .landed(entry)
            case nil:
                if let lookupStarted, let landed = state.landings[key], landed >= lookupStarted {
                    return .lookAgain
                }
                state.flights[key] = .airborne([])
                return .lead
            }
        }
    }

    /// Ends a flight and hands its entry (or nil) to everyone waiting; `unstorable` starts a pass period.
    /// `written` is the entry's store write: until it completes, the board answers with the entry itself.
    func land(_ key: String, entry: CacheEntry?, written: EventLoopFuture<Void>?, unstorable: Bool = false) {
        let now = Self.now()
        let landing = entry.flatMap { entry in written.map { (entry, $0) } }
        let (flight, id) = state.withLock { state in
            if unstorable { Self.remember(key, until: now + Self.passNanoseconds, in: &state.passes, now: now) }
            if let (entry, _) = landing {
                state.nextLandingID += 1
                let id = state.nextLandingID
                return (state.flights.updateValue(.landing(entry, id: id), forKey: key), id)
            }
            return (state.flights.removeValue(forKey: key), 0)
        }
        if let (_, written) = landing {
            written.whenComplete { _ in
                let now = Self.now()
                self.state.withLock { state in
                    // A purge may have ended this landing, and a new flight begun since.
                    if case .landing(_, id) = state.flights[key] { state.flights[key] = nil }
                    let forgotten = now > Self.landingNanoseconds ? now - Self.landingNanoseconds : 0
                    Self.remember(key, until: now, in: &state.landings, now: forgotten)
                }
            }
        }
        guard case .airborne(let waiters) = flight else { return }
        for waiter in waiters { waiter.eventLoop.execute { waiter.callback(entry) } }
    }

    /// A purge: landed entries of the route (or of one path of it) are no longer answered from.
    func purge(route: String, path: String?) {
        let prefix = route + "\u{0}" + (path.map { $0 + "\u{0}" } ?? "")
        state.withLock { state in
            for (key, flight) in state.flights where key.hasPrefix(prefix) {
                if case .landing = flight { state.flights[key] = nil }
            }
        }
    }

    /// Keeps `key` with a time in a bounded map: at the limit, entries older than `now` go, and when that frees
    /// less than a quarter of it, the oldest half too (so a busy map is not filtered again on every insert).
    private static func remember(_ key: String, until time: UInt64, in map: inout [String: UInt64], now: UInt64) {
        if map.count >= rememberLimit {
            map = map.filter { $0.value > now }
            if map.count >= rememberLimit * 3 / 4 {
                for (old, _) in map.sorted(by: { $0.value < $1.value }).prefix(map.count / 2) { map[old] = nil }
            }
        }
        map[key] = time
    }
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
