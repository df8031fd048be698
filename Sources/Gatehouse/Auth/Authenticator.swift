import CoreMetrics
import GatehouseConfig
import Logging
import NIOCore
import NIOHTTP1
import Prometheus
import UpstreamClient

/// What one loaded config says about authentication, resolved ahead: the config's API-key digests and the JWT
/// issuers by `iss`.
struct AuthSettings: Sendable {
    let configKeys: ConfigKeyTable
    let issuers: [String: JWTVerifier.AcceptedIssuer]
    let apiKey: APIKeyAuthConfig

    init(_ config: GatehouseConfiguration) {
        configKeys = ConfigKeyTable(config.consumers)
        var issuers: [String: JWTVerifier.AcceptedIssuer] = [:]
        for issuer in config.auth.jwt { issuers[issuer.issuer] = JWTVerifier.AcceptedIssuer(issuer) }
        self.issuers = issuers
        apiKey = config.auth.apiKey
    }

    /// The methods a route accepts: its `auth_methods`, or every configured one.
    func methods(for route: RouteConfig) -> [AuthMethod] {
        route.authMethods ?? (issuers.isEmpty ? [.apiKey] : [.apiKey, .jwt])
    }
}

/// Authenticates callers: API keys from the config (digests compared in constant time) or issued at runtime
/// (``RuntimeKeys``), and JWTs (``JWTVerifier``). Lives as long as the process, so key caches survive reloads.
///
/// Outcomes: the consumer; anonymous on an `optional` route without credentials; 401 with `WWW-Authenticate`
/// (RFC 6750, `error="invalid_token"` for credentials that do not verify); 403 for valid credentials of a method
/// the route does not accept; 503 when a runtime key cannot be checked (Redis away, nothing recent known).
final class Authenticator: Sendable {
    let runtimeKeys: RuntimeKeys
    let jwt: JWTVerifier
    private let metrics: AuthMetrics

    init(store: SharedStore, upstream: UpstreamClient, metrics: GatewayMetrics, logger: Logger) {
        runtimeKeys = RuntimeKeys(store: store)
        jwt = JWTVerifier(upstream: upstream, logger: logger)
        self.metrics = AuthMetrics(factory: metrics.factory)
    }

    /// Checks the credentials the route accepts: a JWT when it takes JWTs and one came, else an API key when it
    /// takes keys and one came. Credentials only of a kind the route does not take get 403 when they are valid
    /// (an API key is checked; a JWT only against keys already loaded), else 401.
    func authenticate(
        _ context: inout RequestContext, route: CompiledRoute, runtime: Runtime, eventLoop: EventLoop
    ) throws(GatewayError) -> EventLoopFuture<String?>? {
        let settings = runtime.auth
        let methods = settings.methods(for: route.config)
        let credentials = Credentials(headers: context.head.headers, query: context.query, config: settings.apiKey)
        if credentials.isEmpty {
            guard route.config.auth == .required else { return nil }
            metrics.record(method: "none", result: "missing")
            throw Self.unauthorized("This route requires credentials: an API key or a bearer token.", error: nil)
        }
        let jwtAccepted = methods.contains(.jwt) && !settings.issuers.isEmpty
        let keyAccepted = methods.contains(.apiKey)
        if let token = credentials.jwt, jwtAccepted || credentials.apiKey == nil || !keyAccepted {
            return try verifyJWT(token, settings: settings, accepted: jwtAccepted, context: &context, on: eventLoop)
        }
        guard let key = credentials.apiKey else { return nil }
        context.authorizationWasAPIKey = credentials.apiKeyInAuthorization
        let digest = KeyDigest(key: key)
        if let consumer = settings.configKeys.consumer(for: digest) {
            context.consumer = try allowed(consumer, method: .apiKey, accepted: keyAccepted)
            return nil
        }
        return runtimeKeys.lookup(digest, on: eventLoop).flatMapThrowing { answer -> String? in
            switch answer {
            case .consumer(let consumer):
                return try self.allowed(consumer, method: .apiKey, accepted: keyAccepted)
            case .unknown:
                self.metrics.record(method: "api_key", result: "invalid")
                throw Self.unauthorized("The API key is not valid.", error: "invalid_token")
            case .unavailable:
                self.metrics.record(method: "api_key", result: "unavailable")
                throw GatewayError(
                    status: .serviceUnavailable,
                    detail: "The API key cannot be checked now: keys issued at runtime live in Redis, which is away.",
                    origin: .redis)
            }
        }
    }

    private func verifyJWT(
        _ token: String, settings: AuthSettings, accepted: Bool, context: inout RequestContext, on eventLoop: EventLoop
    ) throws(GatewayError) -> EventLoopFuture<String?>? {
        guard !settings.issuers.isEmpty else {
            metrics.record(method: "jwt", result: "invalid")
            throw Self.unauthorized("This gateway accepts no JWTs.", error: "invalid_token")
        }
        // A route that does not take JWTs never makes the gateway fetch keys for one.
        switch jwt.verify(token, accepted: settings.issuers, mayFetch: accepted, on: eventLoop) {
        case .consumer(let consumer):
            context.consumer = try allowed(consumer, method: .jwt, accepted: accepted)
            return nil
        case .invalid(let detail):
            metrics.record(method: "jwt", result: "invalid")
            throw Self.unauthorized(detail, error: "invalid_token")
        case .wait(let loaded):
            let verifier = jwt
            let issuers = settings.issuers
            return loaded.flatMapThrowing { _ -> String? in
                switch verifier.verify(token, accepted: issuers, mayFetch: false, on: eventLoop) {
                case .consumer(let consumer):
                    return try self.allowed(consumer, method: .jwt, accepted: accepted)
                case .invalid(let detail):
                    self.metrics.record(method: "jwt", result: "invalid")
                    throw Self.unauthorized(detail, error: "invalid_token")
                case .wait:
                    self.metrics.record(method: "jwt", result: "invalid")
                    throw Self.unauthorized("The issuer's keys are not available.", error: "invalid_token")
                }
            }
        }
    }

    /// The consumer, when the route accepts the method that proved it; 403 otherwise.
    private func allowed(_ consumer: String, method: AuthMethod, accepted: Bool) throws(GatewayError) -> String {
        guard accepted else {
            metrics.record(method: method.rawValue, result: "forbidden")
            throw GatewayError(
                status: .forbidden,
                detail:
                    "The credentials are valid, but this route does not accept \(method == .jwt ? "JWTs" : "API keys").",
                origin: .client)
        }
        metrics.record(method: method.rawValue, result: "ok")
        return consumer
    }

    /// 401 with an RFC 6750 challenge; `error` is left out when no credentials came (RFC 6750 §3.1).
    static func unauthorized(_ detail: String, error: String?) -> GatewayError {
        var challenge = "Bearer realm=\"gatehouse\""
        if let error {
            let description = detail.replacingOccurrences(of: "\"", with: "'")
            challenge += ", error=\"\(error)\", error_description=\"\(description)\""
        }
        return GatewayError(
            status: .unauthorized, detail: detail, origin: .client, headers: [("WWW-Authenticate", challenge)])
    }
}

/// `gatehouse_auth_total{method,result}`: authentication outcomes, never labelled by key or token. Every counter
/// is made up front: recording one is a dictionary read, no lock.
final class AuthMetrics: Sendable {
    static let methods = ["api_key", "jwt", "none"]
    static let results = ["ok", "invalid", "missing", "forbidden", "unavailable"]
    private let counters: [String: CoreMetrics.Counter]

    init(factory: PrometheusMetricsFactory) {
        var counters: [String: CoreMetrics.Counter] = [:]
        for method in Self.methods {
            for result in Self.results {
                counters[method + "|" + result] = CoreMetrics.Counter(
                    label: "gatehouse_auth_total", dimensions: [("method", method), ("result", result)],
                    factory: factory)
            }
        }
        self.counters = counters
    }

    func record(method: String, result: String) {
        counters[method + "|" + result]?.increment()
    }
}
