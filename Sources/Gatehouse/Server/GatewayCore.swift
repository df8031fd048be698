import GatehouseConfig
import Logging
import NIOCore
import Synchronization
import UpstreamClient

/// What every connection shares: the current runtime (swapped whole on reload), the upstream client,
/// metrics and the access log.
final class GatewayCore: Sendable {
    private let current: Mutex<Runtime>
    let upstream: UpstreamClient
    /// Shared state: Redis, or memory for `memory://`.
    let store: SharedStore
    /// The response cache, in `store`.
    let cache: ResponseCache
    /// API keys and JWTs; its caches outlive reloads.
    let authenticator: Authenticator
    /// `rate_limits`, in Redis (or memory).
    let rateLimiter: RateLimiter
    /// OAuth2 client-credentials tokens for upstreams; they outlive reloads.
    let oauth2: OAuth2Tokens
    let metrics: GatewayMetrics
    let accessLog: AccessLog?
    /// Span export, when `tracing:` is configured (it changes only on restart).
    let tracing: GatewayTracing?
    let logger: Logger
    /// Metrics for requests that matched no route.
    let unroutedMetrics: RouteMetrics
    private let pausesHeard = Atomic<Bool>(false)
    /// Each event loop's index, which picks its upstream worker.
    private let loopIndices: [ObjectIdentifier: Int]

    init(
        runtime: Runtime, upstream: UpstreamClient, store: SharedStore, loops: [EventLoop], metrics: GatewayMetrics,
        accessLog: AccessLog?, tracing: GatewayTracing?, logger: Logger
    ) {
        self.tracing = tracing
        self.store = store
        cache = ResponseCache(store: store, localBytes: runtime.config.redis.localCacheBytes, logger: logger)
        authenticator = Authenticator(store: store, upstream: upstream, metrics: metrics, logger: logger)
        rateLimiter = RateLimiter(store: store, eventLoop: loops[0], logger: logger)
        oauth2 = OAuth2Tokens(store: store, client: upstream, metrics: metrics, logger: logger)
        var indices: [ObjectIdentifier: Int] = [:]
        for (index, loop) in loops.enumerated() { indices[ObjectIdentifier(loop)] = index }
        loopIndices = indices
        current = Mutex(runtime)
        self.upstream = upstream
        self.metrics = metrics
        self.accessLog = accessLog
        self.logger = logger
        unroutedMetrics = metrics.routeMetrics("-")
        _ = store.watchPauses(
            onPause: { [weak self] pause in
                self?.runtime.pools.first { $0.config.name == pause.upstream }?.apply(pause)
            },
            onLive: { [weak self] live in self?.pausesHeard.store(live, ordering: .relaxed) })
    }

    /// Whether this instance hears the `Retry-After` pauses other instances announce (subscribed in Redis).
    var hearsPauses: Bool { pausesHeard.load(ordering: .relaxed) }

    /// The runtime new requests use; requests in flight keep the one they started with.
    var runtime: Runtime { current.withLock { $0 } }

    func swap(to runtime: Runtime) { current.withLock { $0 = runtime } }

    /// The upstream worker for connections on `loop`.
    func workerIndex(for loop: EventLoop) -> Int? { loopIndices[ObjectIdentifier(loop)] }
}
