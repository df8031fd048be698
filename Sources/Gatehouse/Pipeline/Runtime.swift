import GatehouseConfig
import NIOCore
import NIOHTTP1

/// Everything the request path needs from one loaded config, built once per load and swapped whole on reload.
final class Runtime: Sendable {
    let config: GatehouseConfiguration
    let routes: [CompiledRoute]
    let table: RouteTable
    let trustedProxies: [CIDR]
    /// The API-key query parameter, if configured; never forwarded upstream.
    let apiKeyQueryParameter: String?
    let auth: AuthSettings
    let rateLimitRules: [String: RateLimitRule]
    /// Each consumer's own policy, by consumer id.
    let consumerRateLimits: [String: String]
    /// The upstreams, in config order.
    let pools: [UpstreamPool]

    /// Builds the runtime for `config`; upstream targets that `previous` had keep their health state.
    init(config: GatehouseConfiguration, metrics: GatewayMetrics, previous: Runtime? = nil) {
        self.config = config
        pools = config.upstreams.map { upstream in
            UpstreamPool(
                upstream, apiKeyHeader: config.auth.apiKey.header, factory: metrics.factory,
                previous: previous?.pools.first { $0.config.name == upstream.name })
        }
        let byName = Dictionary(pools.map { ($0.config.name, $0) }, uniquingKeysWith: { first, _ in first })
        routes = config.routes.map { route in
            CompiledRoute(
                route, pool: route.upstream.flatMap { byName[$0] }, metrics: metrics.routeMetrics(route.id),
                cacheMetrics: route.cache.map { _ in CacheMetrics(route: route.id, factory: metrics.factory) })
        }
        table = RouteTable(config.routes)
        trustedProxies = config.server.trustedProxies
        apiKeyQueryParameter = config.auth.apiKey.queryParam
        auth = AuthSettings(config)
        rateLimitRules = Dictionary(
            config.rateLimits.map { ($0.name, RateLimitRule($0, factory: metrics.factory)) },
            uniquingKeysWith: { first, _ in first })
        consumerRateLimits = Dictionary(
            config.consumers.compactMap { consumer in consumer.rateLimit.map { (consumer.id, $0) } },
            uniquingKeysWith: { first, _ in first })
    }
}

/// One route with what it needs at request time resolved ahead.
final class CompiledRoute: Sendable {
    let config: RouteConfig
    let pool: UpstreamPool?
    let direct: DirectAnswer?
    let timeoutMilliseconds: Int
    let connectTimeoutMilliseconds: Int
    let metrics: RouteMetrics
    /// Set on routes with `cache:`.
    let cacheMetrics: CacheMetrics?
    /// Request headers (lower-cased) the gateway sets, replaces or removes on the way to this route's upstream.
    let gatewayHeaders: Set<String>
    let ipRules: IPRules?
    let cors: CORSPolicy?
    /// `request_headers`, applied after the upstream's own; nil when empty.
    let requestEdits: HeaderEdits?
    /// `response_headers`, applied to every answer of the route; nil when empty.
    let responseEdits: HeaderEdits?
    let compression: CompressionPolicy?

    init(_ config: RouteConfig, pool: UpstreamPool?, metrics: RouteMetrics, cacheMetrics: CacheMetrics? = nil) {
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.cacheMetrics = cacheMetrics
        var gatewayHeaders = ForwardPhase.droppedRequestHeaders.union(pool?.droppedHeaders ?? [])
        for header in pool?.config.requestHeaders.set ?? [] { gatewayHeaders.insert(header.name.lowercased()) }
        requestEdits = config.requestHeaders.isEmpty ? nil : HeaderEdits(config.requestHeaders)
        responseEdits = config.responseHeaders.isEmpty ? nil : HeaderEdits(config.responseHeaders)
        gatewayHeaders.formUnion(requestEdits?.names ?? [])
        self.gatewayHeaders = gatewayHeaders
        ipRules = IPRules(allow: config.allowIPs, deny: config.denyIPs)
        cors = config.cors.map(CORSPolicy.init)
        compression = config.compression.map(CompressionPolicy.init)
        direct = config.respond.map(DirectAnswer.init)
        let upstreamTimeout = pool?.config.timeout.milliseconds ?? 30_000
        timeoutMilliseconds = Int(max(1, config.timeout?.milliseconds ?? upstreamTimeout))
        connectTimeoutMilliseconds = Int(max(1, pool?.config.connectTimeout.milliseconds ?? 1000))
    }
}

/// An answer the gateway makes whole: a `respond:` route's, prebuilt, or a CORS preflight's.
struct DirectAnswer: Sendable {
    let status: HTTPResponseStatus
    let headers: HTTPHeaders
    let body: ByteBuffer

    /// An answer without a body (204).
    init(status: HTTPResponseStatus, headers: HTTPHeaders) {
        self.status = status
        self.headers = headers
        body = ByteBuffer()
    }

    init(_ response: DirectResponse) {
        status = HTTPResponseStatus(statusCode: response.status)
        var headers = HTTPHeaders()
        for header in response.headers { headers.add(name: header.name, value: header.value) }
        headers.replaceOrAdd(name: "Content-Length", value: String(response.body.utf8.count))
        self.headers = headers
        body = ByteBuffer(string: response.body)
    }
}
