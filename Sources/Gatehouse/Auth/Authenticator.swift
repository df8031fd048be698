import CoreMetrics
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOHTTP1
import Prometheus
import UpstreamClient

/// What one loaded config says about authentication, resolved ahead: the config's API-key digests, the consumer
/// ids, the client certificates' fingerprints, and the JWT issuers by `iss`.
struct AuthSettings: Sendable {
    let configKeys: ConfigKeyTable
    let consumers: Set<String>
    /// Consumer ids by the `sha256:<hex>` of their client certificates' DER.
    let certificateConsumers: [String: String]
    let issuers: [String: JWTVerifier.AcceptedIssuer]
    let apiKey: APIKeyAuthConfig

    init(_ config: GatehouseConfiguration) {
        configKeys = ConfigKeyTable(config.consumers)
        consumers = Set(config.consumers.map(\.id))
        var certificateConsumers: [String: String] = [:]
        for consumer in config.consumers {
            for fingerprint in consumer.clientCerts { certificateConsumers[fingerprint] = consumer.id }
        }
        self.certificateConsumers = certificateConsumers
        var issuers: [String: JWTVerifier.AcceptedIssuer] = [:]
        for issuer in config.auth.jwt { issuers[issuer.issuer] = JWTVerifier.AcceptedIssuer(issuer) }
        self.issuers = issuers
        apiKey = config.auth.apiKey
    }

    /// The methods a route accepts: its `auth_methods`, or every configured one.
    func methods(for route: RouteConfig) -> [AuthMethod] {
        if let methods = route.authMethods { return methods }
        var methods: [AuthMethod] = [.apiKey]
        if !issuers.isEmpty { methods.append(.jwt) }
        if !certificateConsumers.isEmpty { methods.append(.clientCert) }
        return methods
    }
}

/// Authenticates callers: API keys from the config (digests compared in constant time) or issued at runtime
/// (``RuntimeKeys``), and JWTs (``JWTVerifier``). Lives as long as the process, so key caches survive reloads.
///
/// Only credentials of a method the route accepts count: anything else is no credentials for that route. Outcomes:
/// the caller; anonymous on an `optional` route without credentials; 401 with `WWW-Authenticate` (RFC 6750,
/// `error="invalid_token"` for credentials that do not verify); 503 when a runtime key cannot be checked (Redis
/// away, nothing recent known).
final class Authenticator: Sendable {
    let runtimeKeys: RuntimeKeys
    let jwt: JWTVerifier
    private let metrics: AuthMetrics

    init(store: SharedStore, upstream: UpstreamClient, metrics: GatewayMetrics, logger: Logger) {
        runtimeKeys = RuntimeKeys(store: store)
        jwt = JWTVerifier(upstream: upstream, logger: logger)
        self.metrics = AuthMetrics(factory: metrics.factory)
    }

    /// Checks the credentials the route accepts: a client certificate a consumer names, when the route takes
    /// them; else a JWT when it takes JWTs and one came; else an API key when it takes keys and one came (on a
    /// route that takes no JWTs, a bearer token of three parts is read as a key).
    func authenticate(
        _ context: inout RequestContext, route: CompiledRoute, runtime: Runtime, eventLoop: EventLoop
    ) throws(GatewayError) -> EventLoopFuture<Caller?>? {
        let settings = runtime.auth
        let methods = settings.methods(for: route.config)
        let takesCertificate = methods.contains(.clientCert)
        // The listener verified the certificate against server.tls.client_ca; a consumer must also name it. One
        // that none names is no credential: other credentials may still prove the caller.
        var unknownCertificate = false
        if takesCertificate, let fingerprint = context.clientCertificate {
            if let consumer = settings.certificateConsumers[fingerprint] {
                metrics.record(method: "client_cert", result: "ok")
                context.caller = .consumer(consumer)
                return nil
            }
            unknownCertificate = true
        }
        let credentials = Credentials(headers: context.head.headers, query: context.query, config: settings.apiKey)
        let takesJWT = methods.contains(.jwt) && !settings.issuers.isEmpty
        let takesKey = methods.contains(.apiKey)
        if takesJWT, let token = credentials.jwt {
            context.authorizationVerified = true
            return try verifyJWT(token, settings: settings, context: &context, on: eventLoop)
        }
        let key = takesKey ? credentials.apiKey ?? credentials.jwt : nil
        guard let key else {
            guard route.config.auth == .required else { return nil }
            if unknownCertificate, credentials.isEmpty {
                metrics.record(method: "client_cert", result: "invalid")
                throw Self.unauthorized("The client certificate names no consumer.", error: "invalid_token")
            }
            metrics.record(method: "none", result: credentials.isEmpty ? "missing" : "wrong_method")
            let takes = [
                takesKey ? "an API key" : nil, takesJWT ? "a JWT bearer token" : nil,
                takesCertificate ? "a client certificate" : nil,
            ].compactMap { $0 }
            let detail = "This route requires credentials: \(takes.joined(separator: " or "))."
            throw Self.unauthorized(detail, error: credentials.isEmpty ? nil : "invalid_token")
        }
        context.authorizationWasAPIKey = credentials.apiKeyInAuthorization || credentials.apiKey == nil
        let digest = KeyDigest(key: key)
        if let consumer = settings.configKeys.consumer(for: digest) {
            metrics.record(method: "api_key", result: "ok")
            context.caller = .consumer(consumer)
            return nil
        }
        return runtimeKeys.lookup(digest, on: eventLoop).flatMapThrowing { answer -> Caller? in
            switch answer {
            case .consumer(let consumer):
                self.metrics.record(method: "api_key", result: "ok")
                return .consumer(consumer)
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
        _ token: String, settings: AuthSettings, context: inout RequestContext, on eventLoop: EventLoop
    ) throws(GatewayError) -> EventLoopFuture<Caller?>? {
        switch jwt.verify(token, accepted: settings.issuers, mayFetch: true, on: eventLoop) {
        case .verified(let subject, let issuer):
            context.caller = try caller(subject, issuer: issuer, settings: settings)
            return nil
        case .invalid(let detail):
            metrics.record(method: "jwt", result: "invalid")
            throw Self.unauthorized(detail, error: "invalid_token")
        case .wait(let loaded):
            let verifier = jwt
            let issuers = settings.issuers
            return loaded.flatMapThrowing { _ -> Caller? in
                switch verifier.verify(token, accepted: issuers, mayFetch: false, on: eventLoop) {
                case .verified(let subject, let issuer):
                    return try self.caller(subject, issuer: issuer, settings: settings)
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

    /// The caller a verified token names: under `maps_to_consumers` the configured consumer its claim names (401
    /// when none has that id), otherwise the subject as its own identity under the issuer.
    private func caller(_ subject: String, issuer: String, settings: AuthSettings) throws(GatewayError) -> Caller {
        guard settings.issuers[issuer]?.config.mapsToConsumers == true else {
            metrics.record(method: "jwt", result: "ok")
            return Caller(id: subject, issuer: issuer)
        }
        guard settings.consumers.contains(subject) else {
            metrics.record(method: "jwt", result: "invalid")
            throw Self.unauthorized("The token names no configured consumer.", error: "invalid_token")
        }
        metrics.record(method: "jwt", result: "ok")
        return .consumer(subject)
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
    static let methods = ["api_key", "jwt", "client_cert", "none"]
    static let results = ["ok", "invalid", "missing", "wrong_method", "unavailable"]
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
