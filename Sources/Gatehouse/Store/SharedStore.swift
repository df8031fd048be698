import GatehouseConfig
import Logging
import NIOCore
import NIOSSL
import RedisClient

/// Plain values shared by the fleet: runtime API keys, OAuth2 tokens.
protocol KeyValueStore: Sendable {
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
}

/// The response cache's records: per route and normalised path, one record whose fields are the stored variants.
///
/// A purge of a route moves it to a new generation, so no key listing (`KEYS`, `SCAN`) is ever needed; a purge of
/// a path bumps that path's version. A write names the version its lookup saw and is dropped when a purge came in
/// between, so a response fetched before a purge never lands after it.
protocol CacheRecordStore: Sendable {
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
}

/// Rate-limit buckets: every policy of a request checked in one step, with the store's clock.
protocol RateLimitStore: Sendable {
    /// Checks the request's buckets; only when every policy allows it are they all charged.
    func rateLimit(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome>
}

/// News between the instances: cache purges and `Retry-After` pauses. Without other instances (memory) there is
/// nothing to hear.
protocol FleetChannel: Sendable {
    /// Tells `onPurge` of every purge by any instance, and `onLive` when that news starts and stops flowing;
    /// false when the store has no other instances to hear from.
    func watchCachePurges(
        onPurge: @escaping @Sendable (_ route: String, _ path: String?) -> Void,
        onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool
    /// Tells every instance, this one too, that an upstream target asked for a pause.
    func announcePause(_ pause: TargetPause)
    /// Tells `onPause` of every pause any instance announces, and `onLive` when that news starts and stops
    /// flowing; false when there are no other instances.
    func watchPauses(
        onPause: @escaping @Sendable (TargetPause) -> Void, onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool
}

/// One lock for the whole fleet, for work one instance should do for all: fetching a missing cache entry,
/// fetching an OAuth2 token. It expires by itself, so a holder that dies holds it no longer than that.
protocol FleetLock: Sendable {
    /// Takes `name` for `milliseconds` unless someone holds it; true when this instance has it now.
    func lock(_ name: String, milliseconds: Int64, on eventLoop: EventLoop) -> EventLoopFuture<Bool>
    /// Whether some instance holds `name`.
    func isLocked(_ name: String, on eventLoop: EventLoop) -> EventLoopFuture<Bool>
    /// Gives `name` back, if this instance still holds it.
    func unlock(_ name: String, on eventLoop: EventLoop)
}

/// The state every gateway instance shares, in the roles the gateway's parts play with it; each part asks for
/// the role it needs.
///
/// Two real implementations: ``RedisStore`` (many instances, one Redis) and ``MemoryStore`` (`memory://`: one
/// instance without Redis). Redis's types and Lua scripts stay inside ``RedisStore``; the request path does not
/// know which store it has.
protocol SharedStore: KeyValueStore, CacheRecordStore, RateLimitStore, FleetChannel, FleetLock {
    /// What is wrong with the store for `/readyz`, or nil when it serves.
    var problem: String? { get }
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

/// Builds the store a config names.
enum SharedStores {
    static func make(_ config: RedisConfig, group: EventLoopGroup, logger: Logger, metrics: GatewayMetrics)
        -> SharedStore
    {
        // A TLS file that cannot be used is reported by `Gateway.start`, which then refuses to start.
        guard let endpoint = config.endpoint, case .some(var configuration) = try? redisConfiguration(config) else {
            return MemoryStore(cacheBytes: config.memoryCacheBytes)
        }
        configuration.poolSize = config.poolSize
        configuration.connectTimeout = .nanoseconds(config.connectTimeout.nanoseconds)
        configuration.commandTimeout = .nanoseconds(config.commandTimeout.nanoseconds)
        let client: any RedisCommands =
            configuration.clusterSeeds.isEmpty
            ? RedisClient(configuration: configuration, group: group, logger: logger, metrics: metrics.factory)
            : RedisCluster(
                configuration: configuration, seeds: configuration.clusterSeeds, group: group, logger: logger,
                metrics: metrics.factory)
        return RedisStore(
            client: client, prefix: config.keyPrefix, display: endpoint.display, group: group, logger: logger)
    }

    /// The client configuration for `redis:`; nil for `memory://`. Throws when the TLS files cannot be used.
    static func redisConfiguration(_ config: RedisConfig) throws -> RedisConfiguration? {
        switch config.endpoint {
        case .memory, nil:
            return nil
        case .unix(let path, let database, let password):
            var configuration = RedisConfiguration(address: .unix(path: path))
            configuration.database = database
            configuration.password = password
            return configuration
        case .network(let servers):
            let addresses = servers.hosts.map { RedisConfiguration.Address.tcp(host: $0.host, port: $0.port) }
            var configuration = RedisConfiguration(address: addresses[0])
            configuration.database = servers.database
            configuration.username = servers.username
            configuration.password = servers.password
            if servers.tls { configuration.tls = try tls(config.tls) }
            switch servers.topology {
            case .single:
                break
            case .sentinel(let master):
                configuration.sentinel = RedisConfiguration.Sentinel(
                    sentinels: addresses, master: master, password: config.sentinelPassword?.value)
            case .cluster:
                configuration.clusterSeeds = addresses
            }
            return configuration
        }
    }

    /// The TLS context `redis.tls` describes: verification on unless `verify: false`, the system's CAs or `ca_file`,
    /// and a client certificate when given.
    static func tls(_ config: RedisTLSConfig) throws -> RedisConfiguration.TLS {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = config.verify ? .fullVerification : .none
        if let caFile = config.caFile { tls.trustRoots = .file(caFile) }
        if let cert = config.cert, let key = config.key {
            tls.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        }
        return RedisConfiguration.TLS(context: try NIOSSLContext(configuration: tls), serverName: config.serverName)
    }
}
