import Foundation

/// The whole gateway configuration, as loaded and validated from the YAML file.
public struct GatehouseConfiguration: Sendable, Encodable {
    public var server: ServerConfig
    public var admin: AdminConfig
    public var redis: RedisConfig
    public var consumers: [ConsumerConfig]
    public var auth: AuthConfig
    /// Named rate-limit policies, in file order.
    public var rateLimits: [RateLimitPolicy]
    /// Named upstreams, in file order.
    public var upstreams: [UpstreamConfig]
    public var routes: [RouteConfig]
    /// OpenTelemetry export; nil exports nothing (a client's `traceparent` is still passed on).
    public var tracing: TracingConfig?

    /// What in a valid config may not mean what its author thinks, one line each (logged at start, shown by
    /// `gatehouse check`).
    public var warnings: [String] {
        routes.compactMap { route in
            guard let cache = route.cache, cache.ttl.milliseconds > cache.maxTTL.milliseconds else { return nil }
            return "routes[\(route.id)].cache: ttl \(cache.ttl) is larger than max_ttl \(cache.maxTTL); ttl applies to "
                + "answers without freshness, max_ttl caps only the freshness an origin gives"
        }
    }

    enum CodingKeys: String, CodingKey {
        case server, admin, redis, consumers, auth
        case rateLimits = "rate_limits"
        case upstreams, routes, tracing
    }

    public func upstream(named name: String) -> UpstreamConfig? {
        upstreams.first { $0.name == name }
    }
}

/// `server:` — the client-facing listener.
public struct ServerConfig: Sendable, Encodable {
    public var listen: ListenAddress = ListenAddress(host: "0.0.0.0", port: 8080)
    /// Event-loop threads; nil means one per core.
    public var threads: Int?
    public var tls: ServerTLS?
    public var limits = ServerLimits()
    public var trustedProxies: [CIDR] = []
    public var drainTimeout: ConfigDuration = .seconds(15)
    /// Where the JSON access log goes: `stdout` (default), `off`, or a file path.
    public var accessLog: String = "stdout"
    /// What happens to request headers whose name has an underscore (`X_Consumer_ID`).
    public var headersWithUnderscores: UnderscoreHeaders = .drop
    /// HTTP/2 to clients: h2 by ALPN on a TLS listener, h2c with prior knowledge on a plain one.
    public var http2 = true

    enum CodingKeys: String, CodingKey {
        case listen, threads, tls, limits, http2
        case trustedProxies = "trusted_proxies"
        case drainTimeout = "drain_timeout"
        case accessLog = "access_log"
        case headersWithUnderscores = "headers_with_underscores"
    }
}

/// `server.headers_with_underscores`: an upstream that folds `_` into `-` would read `X_Consumer_ID` as the
/// gateway's own `X-Consumer-ID`, so such headers are dropped (default), refused with 400, or passed as they are.
public enum UnderscoreHeaders: String, Sendable, Encodable, CaseIterable {
    case drop, reject, allow
}

/// A certificate chain and private key in PEM files.
public struct TLSFiles: Sendable, Encodable, Equatable {
    public var cert: String
    public var key: String
}

/// `server.limits:` — protection against oversized or slow requests.
public struct ServerLimits: Sendable, Encodable {
    public var maxHeaderBytes: Int = 16 * 1024
    public var maxBodyBytes: Int = 10 * 1024 * 1024
    public var headerTimeout: ConfigDuration = .seconds(10)
    public var idleTimeout: ConfigDuration = .seconds(60)
    /// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    public var maxConcurrentStreams = 100
    /// A WebSocket tunnel with no bytes either way for this long is closed.
    public var websocketIdleTimeout: ConfigDuration = .seconds(300)

    enum CodingKeys: String, CodingKey {
        case maxConcurrentStreams = "max_concurrent_streams"
        case websocketIdleTimeout = "websocket_idle_timeout"
        case maxHeaderBytes = "max_header_bytes"
        case maxBodyBytes = "max_body_bytes"
        case headerTimeout = "header_timeout"
        case idleTimeout = "idle_timeout"
    }
}

/// `admin:` — the admin API listener.
public struct AdminConfig: Sendable, Encodable {
    public var listen: ListenAddress = ListenAddress(host: "127.0.0.1", port: 9901)
    public var token: Secret?
    /// The Host values the admin API answers, besides its listen address (DNS rebinding): a name, or host:port.
    public var hosts: [String] = ["localhost", "127.0.0.1", "[::1]"]
    /// Browser origins whose state-changing requests (POST, DELETE, ...) the admin API accepts; none by default.
    public var allowedOrigins: [String] = []

    enum CodingKeys: String, CodingKey {
        case listen, token, hosts
        case allowedOrigins = "allowed_origins"
    }
}

/// `redis:` — the shared store for cache, limits and runtime keys.
public struct RedisConfig: Sendable, Encodable {
    /// `redis://[:password@]host:port/db`, `unix:///path.sock`, or `memory://`.
    public var url: Secret = Secret("redis://127.0.0.1:6379/0")
    public var poolSize: Int = 4
    public var connectTimeout: ConfigDuration = .milliseconds(500)
    public var commandTimeout: ConfigDuration = .milliseconds(100)
    public var keyPrefix: String = "gatehouse:"
    /// Memory each instance may use to keep hot cache entries from Redis (0: every hit asks Redis).
    public var localCacheBytes: Int = 64 << 20
    /// With `memory://`: the most bytes of cached responses the process keeps; the oldest go first past it.
    public var memoryCacheBytes: Int = 256 << 20
    /// TLS for `rediss` URLs.
    public var tls = RedisTLSConfig()
    /// The sentinels' own password, when they need one (`redis-sentinel://`).
    public var sentinelPassword: Secret?

    enum CodingKeys: String, CodingKey {
        case url
        case poolSize = "pool_size"
        case connectTimeout = "connect_timeout"
        case commandTimeout = "command_timeout"
        case keyPrefix = "key_prefix"
        case localCacheBytes = "local_cache_bytes"
        case memoryCacheBytes = "memory_cache_bytes"
        case tls
        case sentinelPassword = "sentinel_password"
    }

    public init() {}

    /// Where `url` points; nil only for a URL the loader would have refused.
    public var endpoint: RedisEndpoint? { RedisEndpoint.parse(url.value) }
}

/// `redis.tls`: for `rediss://` URLs. Verification is on by default, against the system's CAs or `ca_file`.
public struct RedisTLSConfig: Sendable, Encodable {
    public var caFile: String?
    /// A client certificate and key, for servers that ask for one.
    public var cert: String?
    public var key: String?
    /// The name the server's certificate must carry (and SNI); default: the host connected to.
    public var serverName: String?
    public var verify = true

    enum CodingKeys: String, CodingKey {
        case caFile = "ca_file"
        case cert, key
        case serverName = "server_name"
        case verify
    }
}

/// What a `redis.url` names: in-process memory, a unix socket, or Redis over the network (one server, a master
/// found through sentinels, or a cluster).
public enum RedisEndpoint: Sendable, Hashable {
    case memory
    case unix(path: String, database: Int, password: String?)
    case network(RedisServers)

    /// The endpoint without credentials, for logs, `/readyz` and `gatehouse check`.
    public var display: String {
        switch self {
        case .memory: "memory://"
        case .unix(let path, let database, _): "unix:\(path)?db=\(database)"
        case .network(let servers): servers.display
        }
    }

    /// Parses `memory://`, `unix:///path.sock[?db=N&password=P]`, and
    /// `redis[s]://[user[:password]@]host[:port][/db]`,
    /// `redis[s]-sentinel://[user[:password]@]host[:port],host[:port]...[/db]#master`,
    /// `redis[s]-cluster://[user[:password]@]host[:port],host[:port]...` (`rediss` for TLS).
    public static func parse(_ url: String) -> RedisEndpoint? {
        if url == "memory://" { return .memory }
        guard let schemeEnd = url.range(of: "://") else { return nil }
        let scheme = url[..<schemeEnd.lowerBound]
        if scheme == "unix" {
            guard let components = URLComponents(string: url), !components.path.isEmpty else { return nil }
            let query = components.queryItems ?? []
            let db = query.first { $0.name == "db" }?.value
            guard let database = db.map(Int.init) ?? 0, database >= 0 else { return nil }
            return .unix(
                path: components.path, database: database, password: query.first { $0.name == "password" }?.value)
        }
        let tls = scheme.hasPrefix("rediss")
        var rest = Substring(url[schemeEnd.upperBound...])
        var master: String?
        if let hash = rest.firstIndex(of: "#") {
            master = String(rest[rest.index(after: hash)...]).removingPercentEncoding
            rest = rest[..<hash]
        }
        let topology: RedisServers.Topology
        switch scheme {
        case "redis", "rediss": topology = .single
        case "redis-sentinel", "rediss-sentinel":
            guard let master, !master.isEmpty else { return nil }
            topology = .sentinel(master: master)
        case "redis-cluster", "rediss-cluster": topology = .cluster
        default: return nil
        }
        if case .sentinel = topology {} else if master != nil { return nil }
        var username: String?
        var password: String?
        if let at = rest.lastIndex(of: "@") {
            let userinfo = rest[..<at]
            rest = rest[rest.index(after: at)...]
            if let colon = userinfo.firstIndex(of: ":") {
                username = String(userinfo[..<colon]).removingPercentEncoding
                password = String(userinfo[userinfo.index(after: colon)...]).removingPercentEncoding
            } else {
                username = String(userinfo).removingPercentEncoding
            }
            if username?.isEmpty == true { username = nil }
        }
        var database = 0
        if let slash = rest.firstIndex(of: "/") {
            let path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
            if !path.isEmpty {
                guard let number = Int(path), number >= 0 else { return nil }
                database = number
            }
        }
        if case .cluster = topology, database != 0 { return nil }
        let defaultPort = if case .sentinel = topology { 26379 } else { 6379 }
        var hosts: [RedisServers.Host] = []
        for item in rest.split(separator: ",", omittingEmptySubsequences: false) {
            guard let host = RedisServers.Host.parse(item, defaultPort: defaultPort) else { return nil }
            hosts.append(host)
        }
        guard !hosts.isEmpty else { return nil }
        if case .single = topology, hosts.count != 1 { return nil }
        return .network(
            RedisServers(
                topology: topology, hosts: hosts, tls: tls, database: database, username: username,
                password: password))
    }
}

/// Redis over the network: one server, the master that sentinels name, or a cluster, and how to log in.
public struct RedisServers: Sendable, Hashable {
    public enum Topology: Sendable, Hashable {
        case single
        case sentinel(master: String)
        case cluster
    }

    /// A host and port.
    public struct Host: Sendable, Hashable, CustomStringConvertible {
        public var host: String
        public var port: Int

        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }

        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

        /// `host`, `host:port`, `[v6]` or `[v6]:port`.
        static func parse(_ text: Substring, defaultPort: Int) -> Host? {
            var host = text
            var port = defaultPort
            if host.hasPrefix("[") {
                guard let close = host.firstIndex(of: "]") else { return nil }
                let after = host[host.index(after: close)...]
                host = host[host.index(after: host.startIndex)..<close]
                if !after.isEmpty {
                    guard after.hasPrefix(":"), let number = Int(after.dropFirst()) else { return nil }
                    port = number
                }
            } else if let colon = host.lastIndex(of: ":") {
                guard let number = Int(host[host.index(after: colon)...]) else { return nil }
                port = number
                host = host[..<colon]
            }
            guard !host.isEmpty, (1...65535).contains(port) else { return nil }
            return Host(host: String(host), port: port)
        }
    }

    public var topology: Topology
    public var hosts: [Host]
    public var tls: Bool
    public var database: Int
    public var username: String?
    public var password: String?

    public var display: String {
        let list = hosts.map(\.description).joined(separator: ",")
        let scheme = tls ? "rediss" : "redis"
        switch topology {
        case .single: return "\(scheme)://\(list)/\(database)"
        case .sentinel(let master): return "\(scheme)-sentinel://\(list)/\(database)#\(master)"
        case .cluster: return "\(scheme)-cluster://\(list)"
        }
    }
}

/// `server.tls`: the client listener's certificates, chosen by SNI, and what it asks of clients.
public struct ServerTLS: Sendable, Encodable, Equatable {
    /// Certificate and key files; the first answers clients whose SNI names none of them.
    public var certificates: [TLSFiles]
    /// When set, clients are asked for a certificate, verified against this CA (PEM file).
    public var clientCA: String?
    /// The lowest TLS version accepted.
    public var minVersion: TLSVersion = .v1_2

    enum CodingKeys: String, CodingKey {
        case certificates
        case clientCA = "client_ca"
        case minVersion = "min_version"
    }
}

/// A TLS protocol version, as `min_version` names it.
public enum TLSVersion: String, Sendable, Encodable, CaseIterable {
    case v1_2 = "1.2"
    case v1_3 = "1.3"
}

/// One entry of `consumers:` — a known caller.
public struct ConsumerConfig: Sendable, Encodable {
    public var id: String
    /// `sha256:<hex>` hashes of the consumer's API keys.
    public var apiKeys: [String] = []
    /// `sha256:<hex>` of the DER of each client certificate that identifies the consumer.
    public var clientCerts: [String] = []
    public var rateLimit: String?

    enum CodingKeys: String, CodingKey {
        case id
        case apiKeys = "api_keys"
        case clientCerts = "client_certs"
        case rateLimit = "rate_limit"
    }
}

/// `tracing:` — OpenTelemetry spans exported over OTLP/HTTP.
public struct TracingConfig: Sendable, Encodable {
    /// The collector's base URL; spans go to `<endpoint>/v1/traces`.
    public var otlpEndpoint: String
    public var serviceName: String = "gatehouse"
    /// The share of traces started here that are exported (a client's sampled `traceparent` always is).
    public var sampleRatio: Double = 1.0

    enum CodingKeys: String, CodingKey {
        case otlpEndpoint = "otlp_endpoint"
        case serviceName = "service_name"
        case sampleRatio = "sample_ratio"
    }
}

/// `auth:` — how callers prove who they are.
public struct AuthConfig: Sendable, Encodable {
    public var apiKey = APIKeyAuthConfig()
    public var jwt: [JWTIssuerConfig] = []

    enum CodingKeys: String, CodingKey {
        case apiKey = "api_key"
        case jwt
    }
}

/// `auth.api_key:` — where API keys are read from.
public struct APIKeyAuthConfig: Sendable, Encodable {
    public var header: String = "X-API-Key"
    public var queryParam: String?

    enum CodingKeys: String, CodingKey {
        case header
        case queryParam = "query_param"
    }
}

/// One entry of `auth.jwt:` — an accepted token issuer.
public struct JWTIssuerConfig: Sendable, Encodable {
    public var issuer: String
    public var audiences: [String] = []
    public var algorithms: [String] = []
    public var jwksFile: String?
    public var jwksURL: String?
    public var secret: Secret?
    public var consumerClaim: String = "sub"
    public var leeway: ConfigDuration = .seconds(30)
    /// false: the claim is the caller's own identity under this issuer, never a configured consumer; true: the
    /// claim must name a configured consumer, and the token then acts as that consumer.
    public var mapsToConsumers: Bool = false

    enum CodingKeys: String, CodingKey {
        case issuer, audiences, algorithms
        case jwksFile = "jwks_file"
        case jwksURL = "jwks_url"
        case secret
        case consumerClaim = "consumer_claim"
        case leeway
        case mapsToConsumers = "maps_to_consumers"
    }
}

/// One named entry of `rate_limits:`.
public struct RateLimitPolicy: Sendable, Encodable {
    public enum Key: Sendable, Hashable, Encodable {
        case consumer, ip, route
        case header(String)

        public func encode(to encoder: Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .consumer: try container.encode("consumer")
            case .ip: try container.encode("ip")
            case .route: try container.encode("route")
            case .header(let name): try container.encode("header:\(name)")
            }
        }
    }

    public enum Algorithm: String, Sendable, Encodable, CaseIterable {
        case gcra
        case slidingWindow = "sliding_window"
        case fixedWindow = "fixed_window"
    }

    public enum RedisErrorMode: String, Sendable, Encodable, CaseIterable {
        case local, allow, deny
    }

    public var name: String
    public var requests: Int
    public var per: ConfigDuration
    /// How many may come at once; defaults to `requests`.
    public var burst: Int
    public var by: Key = .consumer
    public var algorithm: Algorithm = .gcra
    public var onRedisError: RedisErrorMode = .local

    enum CodingKeys: String, CodingKey {
        case name, requests, per, burst, by, algorithm
        case onRedisError = "on_redis_error"
    }
}

/// One named entry of `upstreams:` — a service the gateway forwards to.
public struct UpstreamConfig: Sendable, Encodable {
    public enum Balance: Sendable, Hashable, Encodable {
        case roundRobin, leastRequests, random
        case hashHeader(String)

        public func encode(to encoder: Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .roundRobin: try container.encode("round_robin")
            case .leastRequests: try container.encode("least_requests")
            case .random: try container.encode("random")
            case .hashHeader(let name): try container.encode("hash:header:\(name)")
            }
        }
    }

    public var name: String
    public var targets: [UpstreamTarget] = []
    public var balance: Balance = .roundRobin
    public var connectTimeout: ConfigDuration = .seconds(1)
    public var timeout: ConfigDuration = .seconds(30)
    public var retries: RetryPolicy?
    public var healthCheck: HealthCheckConfig?
    public var circuitBreaker: CircuitBreakerConfig?
    /// Ejection of targets that keep failing real requests; on by default.
    public var passiveHealth = PassiveHealthConfig()
    public var tls = UpstreamTLS()
    public var requestHeaders = HeaderRewrite()
    /// Client-credentials tokens fetched for this upstream and sent as `Authorization: Bearer`.
    public var oauth2: OAuth2Config?
    /// Who waits when the upstream answers 429/503 with `Retry-After`.
    public var pauseOnRetryAfter: RetryAfterPause = .off
    /// The HTTP version spoken to the targets.
    public var `protocol`: UpstreamProtocol = .auto

    enum CodingKeys: String, CodingKey {
        case name, targets, balance
        case connectTimeout = "connect_timeout"
        case timeout, retries
        case healthCheck = "health_check"
        case circuitBreaker = "circuit_breaker"
        case passiveHealth = "passive_health"
        case tls
        case requestHeaders = "request_headers"
        case oauth2
        case pauseOnRetryAfter = "pause_on_retry_after"
        case `protocol`
    }
}

/// `protocol` of an upstream: `auto` (HTTP/2 when TLS's ALPN offers it, else HTTP/1.1), `http1`, or `http2` (over TLS
/// by ALPN, on `http://` targets h2c with prior knowledge). gRPC needs HTTP/2.
public enum UpstreamProtocol: String, Sendable, Encodable, CaseIterable {
    case auto, http1, http2
}

/// `pause_on_retry_after`: off (the answer just passes), upstream (every caller waits, on every instance), or
/// consumer (only the caller who was told to wait: a per-user limit upstream is not everyone's).
public enum RetryAfterPause: String, Sendable, Encodable, CaseIterable {
    case off, upstream, consumer
}

/// `passive_health:` of an upstream: `failures` consecutive failed requests eject a target for `eject_for`,
/// doubled on each ejection that follows without a success in between, up to `max_eject_for`.
public struct PassiveHealthConfig: Sendable, Encodable {
    /// 0 turns passive ejection off.
    public var failures: Int = 5
    public var ejectFor: ConfigDuration = .seconds(5)
    public var maxEjectFor: ConfigDuration = .seconds(300)

    enum CodingKeys: String, CodingKey {
        case failures
        case ejectFor = "eject_for"
        case maxEjectFor = "max_eject_for"
    }
}

/// `oauth2:` of an upstream: the OAuth 2.0 client-credentials grant (RFC 6749 §4.4).
public struct OAuth2Config: Sendable, Encodable {
    /// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
    public enum ClientAuth: String, Sendable, Encodable {
        /// HTTP Basic with the client id and secret (the default every server must support).
        case basic
        /// `client_id` and `client_secret` in the form body.
        case body
    }

    public var tokenURL: String
    public var clientID: String
    public var clientSecret: Secret
    public var scopes: [String] = []
    /// Sent as `audience` when set (Auth0 and others need it).
    public var audience: String?
    public var clientAuth: ClientAuth = .basic

    enum CodingKeys: String, CodingKey {
        case tokenURL = "token_url"
        case clientID = "client_id"
        case clientSecret = "client_secret"
        case scopes, audience
        case clientAuth = "client_auth"
    }
}

/// One server of an upstream.
public struct UpstreamTarget: Sendable, Encodable {
    /// Base URL, `http://host:port` or `https://host:port`, without a path.
    public var url: String
    public var weight: Int = 1
}

/// `retries:` of an upstream.
public struct RetryPolicy: Sendable, Encodable {
    public enum Condition: Sendable, Hashable, Encodable {
        case connectFailure
        case status(Int)

        public func encode(to encoder: Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .connectFailure: try container.encode("connect_failure")
            case .status(let code): try container.encode(code)
            }
        }
    }

    /// Every try, the first included.
    public var attempts: Int = 1
    public var on: [Condition] = [.connectFailure]
    /// Retries may add at most this fraction of the upstream's requests (plus a small reserve), so retries
    /// cannot multiply an outage.
    public var budget: Double = 0.2

    public init(attempts: Int = 1, on: [Condition] = [.connectFailure], budget: Double = 0.2) {
        self.attempts = attempts
        self.on = on
        self.budget = budget
    }
}

/// `health_check:` of an upstream.
public struct HealthCheckConfig: Sendable, Encodable {
    public var path: String = "/healthz"
    public var interval: ConfigDuration = .seconds(5)
    public var unhealthyAfter: Int = 3
    public var healthyAfter: Int = 2

    enum CodingKeys: String, CodingKey {
        case path, interval
        case unhealthyAfter = "unhealthy_after"
        case healthyAfter = "healthy_after"
    }
}

/// `circuit_breaker:` of an upstream.
public struct CircuitBreakerConfig: Sendable, Encodable {
    public var failureRatio: Double = 0.5
    public var minRequests: Int = 20
    public var openFor: ConfigDuration = .seconds(30)

    enum CodingKeys: String, CodingKey {
        case failureRatio = "failure_ratio"
        case minRequests = "min_requests"
        case openFor = "open_for"
    }
}

/// `tls:` of an upstream — how the gateway verifies it.
public struct UpstreamTLS: Sendable, Encodable {
    public var verify: Bool = true
    public var caFile: String?

    enum CodingKeys: String, CodingKey {
        case verify
        case caFile = "ca_file"
    }
}

/// Header edits applied to requests (`set` replaces, `remove` deletes).
public struct HeaderRewrite: Sendable, Encodable {
    /// Header name and value, in file order; values are treated as secrets.
    public var set: [HeaderValue] = []
    public var remove: [String] = []

    public var isEmpty: Bool { self.set.isEmpty && remove.isEmpty }
}

/// A header name with a value that may hold a credential.
public struct HeaderValue: Sendable, Encodable {
    public var name: String
    public var value: Secret
}

/// One entry of `routes:`.
public struct RouteConfig: Sendable, Encodable {
    public var id: String
    public var match: RouteMatch
    public var upstream: String?
    public var rewrite: RouteRewrite?
    public var auth: AuthRequirement = .none
    public var authMethods: [AuthMethod]?
    public var rateLimit: [String] = []
    public var cache: RouteCache?
    public var timeout: ConfigDuration?
    public var respond: DirectResponse?
    /// Whether a client `Authorization` the gateway did not verify goes upstream (false: it is removed).
    public var forwardAuthorization: Bool = false
    /// Whether `Upgrade: websocket` requests are tunnelled to the upstream (else the upgrade is not forwarded).
    public var websocket: Bool = false
    /// Client networks allowed on the route (empty: all); checked after `denyIPs`.
    public var allowIPs: [CIDR] = []
    /// Client networks refused on the route.
    public var denyIPs: [CIDR] = []
    public var cors: CORSConfig?
    /// Edits to the request sent upstream, after the upstream's own `request_headers`.
    public var requestHeaders = HeaderTransform()
    /// Edits to every answer of the route, errors and cache hits included.
    public var responseHeaders = HeaderTransform()
    /// nil: answers are never compressed.
    public var compression: CompressionConfig?
    /// The line of the route in the config file, for messages.
    public var line: Int = 0

    enum CodingKeys: String, CodingKey {
        case id, match, upstream, rewrite, auth
        case authMethods = "auth_methods"
        case rateLimit = "rate_limit"
        case cache, timeout, respond
        case forwardAuthorization = "forward_authorization"
        case websocket
        case allowIPs = "allow_ips"
        case denyIPs = "deny_ips"
        case cors
        case requestHeaders = "request_headers"
        case responseHeaders = "response_headers"
        case compression
    }
}

/// `cors:` of a route: which browser origins may call it, what they may send, and what they may read.
public struct CORSConfig: Sendable, Encodable {
    /// Origins as `scheme://host[:port]`, lower-cased, or `["*"]`.
    public var allowOrigins: [String] = []
    public var allowMethods: [String] = ["GET", "HEAD", "POST"]
    public var allowHeaders: [String] = []
    public var exposeHeaders: [String] = []
    public var allowCredentials = false
    /// How long a browser may keep a preflight's answer.
    public var maxAge: ConfigDuration?

    enum CodingKeys: String, CodingKey {
        case allowOrigins = "allow_origins"
        case allowMethods = "allow_methods"
        case allowHeaders = "allow_headers"
        case exposeHeaders = "expose_headers"
        case allowCredentials = "allow_credentials"
        case maxAge = "max_age"
    }
}

/// Header edits of a route: `set` replaces every value, `add` appends one, `remove` deletes (any case).
public struct HeaderTransform: Sendable, Encodable {
    public var set: [HeaderValue] = []
    public var add: [HeaderValue] = []
    /// Header names, lower-cased.
    public var remove: [String] = []

    public var isEmpty: Bool { self.set.isEmpty && add.isEmpty && remove.isEmpty }
}

/// `compression:` of a route: answers of these types and at least this size are sent gzip- or br-encoded.
public struct CompressionConfig: Sendable, Encodable {
    public var minBytes = 1024
    /// Media types; `text/*` covers a whole top-level type.
    public var types: [String] = ["application/json", "text/*"]

    enum CodingKeys: String, CodingKey {
        case minBytes = "min_bytes"
        case types
    }
}

/// `auth:` of a route.
public enum AuthRequirement: String, Sendable, Encodable, CaseIterable {
    case required, optional, none
}

/// A way of authenticating, as named in `auth_methods`.
public enum AuthMethod: String, Sendable, Encodable, CaseIterable {
    case apiKey = "api_key"
    case jwt
    case clientCert = "client_cert"
}

/// `match:` of a route.
public struct RouteMatch: Sendable, Encodable {
    /// Exact host or `*.suffix`; nil matches any host.
    public var host: String?
    /// Upper-case methods; nil allows every method.
    public var methods: [String]?
    /// Exact path or template with `{name}` segments.
    public var path: String?
    public var pathPrefix: String?

    enum CodingKeys: String, CodingKey {
        case host, methods, path
        case pathPrefix = "path_prefix"
    }
}

/// `rewrite:` of a route.
public struct RouteRewrite: Sendable, Encodable {
    public var stripPrefix: String?
    public var addPrefix: String?
    /// A path template using the route's `{name}` parameters.
    public var path: String?

    public init(stripPrefix: String? = nil, addPrefix: String? = nil, path: String? = nil) {
        self.stripPrefix = stripPrefix
        self.addPrefix = addPrefix
        self.path = path
    }

    enum CodingKeys: String, CodingKey {
        case stripPrefix = "strip_prefix"
        case addPrefix = "add_prefix"
        case path
    }
}

/// `cache:` of a route.
public struct RouteCache: Sendable, Encodable {
    public var ttl: ConfigDuration = .seconds(30)
    public var maxTTL: ConfigDuration = .seconds(3600)
    public var staleWhileRevalidate: ConfigDuration = .seconds(0)
    public var staleIfError: ConfigDuration = .seconds(0)
    public var keyHeaders: [String] = []
    public var shared: Bool = false
    public var maxObjectBytes: Int = 1 << 20
    /// Whether responses with `Set-Cookie` may be stored.
    public var storeSetCookie: Bool = false
    /// How long an instance may answer from its in-memory copy of a fresh entry before asking Redis again.
    /// Purges and invalidations reach every copy at once; this bounds how long another instance's newer
    /// version of a still-fresh entry goes unseen.
    public var localTTL: ConfigDuration = .seconds(1)
    /// When set, a miss takes a short Redis lock so that one instance in the whole fleet fetches it; the others
    /// wait up to this long for its entry. 0: each instance fetches its own misses (still coalesced inside it).
    public var lockTimeout: ConfigDuration = .seconds(0)
    /// Heuristic freshness (RFC 9111 §4.2.2): a response with `Last-Modified` and no explicit freshness is fresh
    /// for this share of the time since it was modified, capped by `max_ttl`. 0: `Last-Modified` gives no
    /// freshness, and `ttl` applies as to a response without it.
    public var lastModifiedFactor: Double = 0.1
    /// RFC 9213 targeted fields, most specific first: the first one a response carries (and that parses) takes
    /// the place of `Cache-Control` for this cache.
    public var targetedFields: [String] = ["CDN-Cache-Control"]
    /// Whether the targeted fields also reach the client (for CDN caches in front of the gateway, RFC 9213 §3);
    /// false: they are this cache's alone and removed.
    public var forwardTargetedFields = false

    public init() {}

    enum CodingKeys: String, CodingKey {
        case ttl
        case maxTTL = "max_ttl"
        case staleWhileRevalidate = "stale_while_revalidate"
        case staleIfError = "stale_if_error"
        case keyHeaders = "key_headers"
        case shared
        case maxObjectBytes = "max_object_bytes"
        case storeSetCookie = "store_set_cookie"
        case localTTL = "local_ttl"
        case lockTimeout = "lock_timeout"
        case lastModifiedFactor = "last_modified_factor"
        case targetedFields = "targeted_fields"
        case forwardTargetedFields = "forward_targeted_fields"
    }
}

/// `respond:` of a route — an answer made by the gateway itself.
public struct DirectResponse: Sendable, Encodable {
    public var status: Int = 200
    public var body: String = ""
    /// Header name and value, in file order.
    public var headers: [DirectHeader] = []
}

/// A header of a direct response.
public struct DirectHeader: Sendable, Encodable {
    public var name: String
    public var value: String
}
