import Foundation
import Yams

/// Reads, interpolates and validates a Gatehouse YAML config; reports every error at once.
public enum ConfigLoader {
    /// Loads the config at `path`. Throws ``ConfigErrors`` listing every problem.
    public static func load(
        path: String,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> GatehouseConfiguration {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigErrors(issues: [
                ConfigIssue(file: path, line: 0, path: "", message: "cannot read file: \(error.localizedDescription)")
            ])
        }
        return try parse(yaml: text, file: path, environment: environment)
    }

    /// Parses config text; `file` names it in messages.
    public static func parse(
        yaml: String,
        file: String = "gatehouse.yaml",
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> GatehouseConfiguration {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch let error as YamlError {
            throw ConfigErrors(issues: [yamlIssue(error, file: file)])
        } catch {
            throw ConfigErrors(issues: [ConfigIssue(file: file, line: 1, path: "", message: "\(error)")])
        }
        let reader = NodeReader(file: file, environment: environment)
        let config = ConfigBuilder(reader: reader).build(root ?? Node.mapping(Node.Mapping([])))
        if !reader.issues.isEmpty {
            throw ConfigErrors(issues: reader.issues.sorted { ($0.line, $0.path) < ($1.line, $1.path) })
        }
        return config
    }

    private static func yamlIssue(_ error: YamlError, file: String) -> ConfigIssue {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _):
            return ConfigIssue(file: file, line: mark.line, path: "", message: "invalid YAML: \(problem)")
        default:
            return ConfigIssue(file: file, line: 1, path: "", message: "invalid YAML: \(error)")
        }
    }
}

/// Turns the checked YAML tree into ``GatehouseConfiguration`` and validates references between sections.
struct ConfigBuilder {
    let reader: NodeReader

    func build(_ root: Node) -> GatehouseConfiguration {
        let top = reader.fields(
            root, "",
            allowed: ["server", "admin", "redis", "consumers", "auth", "rate_limits", "upstreams", "routes"])
        var config = GatehouseConfiguration(
            server: ServerConfig(), admin: AdminConfig(), redis: RedisConfig(), consumers: [],
            auth: AuthConfig(), rateLimits: [], upstreams: [], routes: [])
        guard let top else { return config }
        if let node = top["server"] { config.server = server(node) }
        if let node = top["admin"] { config.admin = admin(node) }
        if let node = top["redis"] { config.redis = redis(node) }
        if let node = top["rate_limits"] {
            config.rateLimits = reader.pairs(node, "rate_limits").compactMap { rateLimit($0.key, $0.value) }
        }
        let policyNames = Set(config.rateLimits.map(\.name))
        if let node = top["consumers"], let items = reader.list(node, "consumers") {
            config.consumers = items.enumerated().compactMap { consumer($1, "consumers[\($0)]", policyNames) }
            var seen = Set<String>()
            for (index, consumer) in config.consumers.enumerated() where !seen.insert(consumer.id).inserted {
                reader.fail(items[index], "consumers[\(index)].id", "consumer \"\(consumer.id)\" is defined twice")
            }
        }
        if let node = top["auth"] { config.auth = auth(node) }
        if let node = top["upstreams"] {
            config.upstreams = reader.pairs(node, "upstreams").compactMap { upstream($0.key, $0.value) }
        }
        if let node = top["routes"], let items = reader.list(node, "routes") {
            let upstreamNames = Set(config.upstreams.map(\.name))
            var seen = Set<String>()
            for (index, item) in items.enumerated() {
                let path = "routes[\(index)]"
                guard let route = route(item, path, upstreams: upstreamNames, policies: policyNames, auth: config.auth)
                else { continue }
                if !seen.insert(route.id).inserted {
                    reader.fail(item, "\(path).id", "route id \"\(route.id)\" is used twice")
                }
                config.routes.append(route)
            }
        }
        return config
    }

    // MARK: server, admin, redis

    private func server(_ node: Node) -> ServerConfig {
        var server = ServerConfig()
        guard
            let f = reader.fields(
                node, "server",
                allowed: [
                    "listen", "threads", "tls", "limits", "trusted_proxies", "drain_timeout", "access_log",
                    "headers_with_underscores",
                ])
        else { return server }
        if let value = listen(f, "listen") { server.listen = value }
        if let text = f.string("threads"), text != "auto" {
            if let count = Int(text), (1...256).contains(count) {
                server.threads = count
            } else {
                f.fail("threads", "expected auto or a number from 1 to 256, found \"\(text)\"")
            }
        }
        if let node = f["tls"], let t = reader.fields(node, f.path("tls"), allowed: ["cert", "key"]) {
            if let cert = t.require("cert").flatMap({ reader.string($0, t.path("cert")) }),
                let key = t.require("key").flatMap({ reader.string($0, t.path("key")) })
            {
                for (name, file) in [("cert", cert), ("key", key)] where !FileManager.default.fileExists(atPath: file) {
                    t.fail(name, "file \"\(file)\" does not exist")
                }
                server.tls = TLSFiles(cert: cert, key: key)
            }
        }
        if let node = f["limits"],
            let l = reader.fields(
                node, "server.limits",
                allowed: ["max_header_bytes", "max_body_bytes", "header_timeout", "idle_timeout"])
        {
            if let v = l.size("max_header_bytes") {
                if v < 1024 || v > 1 << 20 {
                    l.fail("max_header_bytes", "must be from 1KiB to 1MiB")
                } else {
                    server.limits.maxHeaderBytes = v
                }
            }
            if let v = l.size("max_body_bytes") { server.limits.maxBodyBytes = v }
            if let v = l.duration("header_timeout") { server.limits.headerTimeout = v }
            if let v = l.duration("idle_timeout") { server.limits.idleTimeout = v }
        }
        if let items = f.strings("trusted_proxies") {
            server.trustedProxies = items.enumerated().compactMap { index, text in
                if let cidr = CIDR.parse(text) { return cidr }
                reader.fail(
                    f["trusted_proxies"], "server.trusted_proxies[\(index)]",
                    "expected an address or CIDR, found \"\(text)\"")
                return nil
            }
        }
        if let v = f.duration("drain_timeout") { server.drainTimeout = v }
        if let v = f.string("access_log") { server.accessLog = v }
        if let v = f.choice("headers_with_underscores", as: UnderscoreHeaders.self) {
            server.headersWithUnderscores = v
        }
        return server
    }

    private func listen(_ f: Fields, _ key: String) -> ListenAddress? {
        guard let text = f.string(key) else { return nil }
        guard let address = ListenAddress.parse(text) else {
            f.fail(key, "expected host:port, found \"\(text)\"")
            return nil
        }
        return address
    }

    private func admin(_ node: Node) -> AdminConfig {
        var admin = AdminConfig()
        guard let f = reader.fields(node, "admin", allowed: ["listen", "token", "hosts", "allowed_origins"]) else {
            return admin
        }
        if let value = listen(f, "listen") { admin.listen = value }
        if let token = f.string("token") {
            if token.isEmpty { f.fail("token", "must not be empty") } else { admin.token = Secret(token) }
        }
        if let hosts = f.strings("hosts") { admin.hosts = hosts.map { $0.lowercased() } }
        if let origins = f.strings("allowed_origins") {
            for origin in origins where origin.contains("*") || !origin.contains("://") {
                f.fail("allowed_origins", "expected scheme://host[:port] (no wildcards), found \"\(origin)\"")
            }
            admin.allowedOrigins = origins.map { $0.lowercased() }
        }
        if admin.token == nil, !admin.listen.isLoopback {
            reader.fail(node, "admin.token", "required when admin.listen (\(admin.listen)) is not a loopback address")
        }
        return admin
    }

    private func redis(_ node: Node) -> RedisConfig {
        var redis = RedisConfig()
        guard
            let f = reader.fields(
                node, "redis",
                allowed: [
                    "url", "pool_size", "connect_timeout", "command_timeout", "key_prefix", "local_cache_bytes",
                    "memory_cache_bytes",
                ])
        else { return redis }
        if let url = f.string("url") {
            if RedisEndpoint.parse(url) != nil {
                redis.url = Secret(url)
            } else {
                f.fail("url", "expected redis://[:password@]host:port/db, unix:///path.sock or memory://")
            }
        }
        if let v = f.int("pool_size", min: 1, max: 64) { redis.poolSize = v }
        if let v = f.duration("connect_timeout") { redis.connectTimeout = v }
        if let v = f.duration("command_timeout") { redis.commandTimeout = v }
        if let v = f.string("key_prefix") { redis.keyPrefix = v }
        if let v = f.size("local_cache_bytes") { redis.localCacheBytes = v }
        if let v = f.size("memory_cache_bytes") { redis.memoryCacheBytes = v }
        return redis
    }

    // MARK: consumers, auth, rate limits

    private func consumer(_ node: Node, _ path: String, _ policies: Set<String>) -> ConsumerConfig? {
        guard let f = reader.fields(node, path, allowed: ["id", "api_keys", "rate_limit"]),
            let id = f.require("id").flatMap({ reader.string($0, f.path("id")) })
        else { return nil }
        var consumer = ConsumerConfig(id: id)
        if let keys = f.strings("api_keys") {
            for (index, key) in keys.enumerated() where !Self.isKeyHash(key) {
                reader.fail(
                    f["api_keys"], "\(path).api_keys[\(index)]",
                    "expected sha256:<64 hex digits> (see `gatehouse hash-key`); plaintext keys are not accepted")
            }
            consumer.apiKeys = keys.map { $0.lowercased() }
        }
        if let policy = f.string("rate_limit") {
            if !policies.contains(policy) { f.fail("rate_limit", "unknown rate limit policy \"\(policy)\"") }
            consumer.rateLimit = policy
        }
        return consumer
    }

    static func isKeyHash(_ text: String) -> Bool {
        guard text.hasPrefix("sha256:") else { return false }
        let hex = text.dropFirst(7)
        return hex.count == 64 && hex.allSatisfy(\.isHexDigit)
    }

    private func auth(_ node: Node) -> AuthConfig {
        var auth = AuthConfig()
        guard let f = reader.fields(node, "auth", allowed: ["api_key", "jwt"]) else { return auth }
        if let node = f["api_key"], let k = reader.fields(node, "auth.api_key", allowed: ["header", "query_param"]) {
            if let header = k.string("header") { auth.apiKey.header = header }
            auth.apiKey.queryParam = k.string("query_param")
        }
        if let node = f["jwt"], let items = reader.list(node, "auth.jwt") {
            auth.jwt = items.enumerated().compactMap { jwt($1, "auth.jwt[\($0)]") }
        }
        return auth
    }

    static let jwtAlgorithms = [
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ]

    private func jwt(_ node: Node, _ path: String) -> JWTIssuerConfig? {
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "issuer", "audiences", "algorithms", "jwks_file", "jwks_url", "secret", "consumer_claim", "leeway",
                    "maps_to_consumers",
                ]),
            let issuer = f.require("issuer").flatMap({ reader.string($0, f.path("issuer")) })
        else { return nil }
        var jwt = JWTIssuerConfig(issuer: issuer)
        jwt.audiences = f.strings("audiences") ?? []
        jwt.algorithms = f.strings("algorithms") ?? ["RS256", "ES256"]
        for algorithm in jwt.algorithms where !Self.jwtAlgorithms.contains(algorithm) {
            let why =
                algorithm.lowercased() == "none" ? "\"none\" is never accepted" : "unknown algorithm \"\(algorithm)\""
            f.fail("algorithms", why)
        }
        jwt.jwksFile = f.string("jwks_file")
        jwt.jwksURL = f.string("jwks_url")
        jwt.secret = f.string("secret").map(Secret.init)
        if let claim = f.string("consumer_claim") { jwt.consumerClaim = claim }
        if let leeway = f.duration("leeway") { jwt.leeway = leeway }
        if let v = f.bool("maps_to_consumers") { jwt.mapsToConsumers = v }
        // Keys fetched over plain HTTP could be swapped by anyone on the path, and with them every identity; only
        // a loopback address (a sidecar on the same host) has no path to attack.
        if let url = jwt.jwksURL, !Self.isSafeKeyURL(url) {
            f.fail("jwks_url", "expected an https:// URL (http:// only to a loopback address), found \"\(url)\"")
        }
        if jwt.jwksFile != nil, jwt.jwksURL != nil { f.fail("jwks_url", "give jwks_file or jwks_url, not both") }
        let usesHMAC = jwt.algorithms.contains { $0.hasPrefix("HS") }
        let keyAlgorithms = jwt.algorithms.filter { !$0.hasPrefix("HS") && Self.jwtAlgorithms.contains($0) }
        let usesKeys = !keyAlgorithms.isEmpty
        if usesHMAC, jwt.secret == nil { f.fail("secret", "required for HS algorithms") }
        if usesKeys, jwt.jwksFile == nil, jwt.jwksURL == nil {
            f.fail(
                "jwks_file",
                "jwks_file or jwks_url is required for \(jwt.algorithms.filter { !$0.hasPrefix("HS") }.joined(separator: ", "))"
            )
        }
        if let file = jwt.jwksFile, !FileManager.default.fileExists(atPath: file) {
            f.fail("jwks_file", "file \"\(file)\" does not exist")
        }
        return jwt
    }

    /// An https URL with a host, or http to 127.0.0.0/8, [::1] or localhost.
    static func isSafeKeyURL(_ url: String) -> Bool {
        guard let parts = URLComponents(string: url), let host = parts.host?.lowercased(), !host.isEmpty else {
            return false
        }
        switch parts.scheme?.lowercased() {
        case "https": return true
        case "http":
            if host == "localhost" { return true }
            let bytes = IPAddressText.parse(host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")))
            return bytes.map { $0.count == 4 ? $0[0] == 127 : $0 == Array(repeating: 0, count: 15) + [1] } ?? false
        default: return false
        }
    }

    private func rateLimit(_ name: String, _ node: Node) -> RateLimitPolicy? {
        let path = "rate_limits.\(name)"
        guard
            let f = reader.fields(
                node, path, allowed: ["requests", "per", "burst", "by", "algorithm", "on_redis_error"])
        else { return nil }
        // The name goes into Redis keys and into RateLimit headers (a quoted string there).
        if name.isEmpty || !name.utf8.allSatisfy({ $0 < 0x80 && (isalnum(Int32($0)) != 0 || $0 == 0x2D || $0 == 0x5F) })
        {
            f.fail("requests", "the policy name \"\(name)\" must be letters, digits, - and _ only")
        }
        // Read every field before giving up, so that all of its errors are reported at once.
        let requests = f.require("requests").flatMap { reader.int($0, f.path("requests"), min: 1) }
        let per = f.require("per").flatMap { reader.duration($0, f.path("per")) }
        let burst = f.int("burst", min: 1)
        var by = RateLimitPolicy.Key.consumer
        if let text = f.string("by") {
            switch text {
            case "consumer": by = .consumer
            case "ip": by = .ip
            case "route": by = .route
            default:
                if text.hasPrefix("header:"), text.count > 7 {
                    by = .header(String(text.dropFirst(7)))
                } else {
                    f.fail("by", "expected consumer | ip | route | header:<Name>, found \"\(text)\"")
                }
            }
        }
        guard let requests, let per else { return nil }
        if per.nanoseconds < 1_000_000 { f.fail("per", "must be at least 1ms") }
        var policy = RateLimitPolicy(name: name, requests: requests, per: per, burst: burst ?? requests)
        policy.by = by
        if let v = f.choice("algorithm", as: RateLimitPolicy.Algorithm.self) { policy.algorithm = v }
        if let v = f.choice("on_redis_error", as: RateLimitPolicy.RedisErrorMode.self) { policy.onRedisError = v }
        return policy
    }

    // MARK: upstreams

    private func upstream(_ name: String, _ node: Node) -> UpstreamConfig? {
        let path = "upstreams.\(name)"
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "targets", "balance", "connect_timeout", "timeout", "retries", "health_check", "circuit_breaker",
                    "passive_health", "tls", "request_headers", "oauth2", "pause_on_retry_after",
                ])
        else { return nil }
        var upstream = UpstreamConfig(name: name)
        if let node = f.require("targets"), let items = reader.list(node, f.path("targets")) {
            if items.isEmpty { f.fail("targets", "needs at least one target") }
            upstream.targets = items.enumerated().compactMap { index, item in target(item, "\(path).targets[\(index)]")
            }
        }
        if let text = f.string("balance") {
            switch text {
            case "round_robin": upstream.balance = .roundRobin
            case "least_requests": upstream.balance = .leastRequests
            case "random": upstream.balance = .random
            default:
                if text.hasPrefix("hash:header:"), text.count > 12 {
                    upstream.balance = .hashHeader(String(text.dropFirst(12)))
                } else {
                    f.fail(
                        "balance",
                        "expected round_robin | least_requests | random | hash:header:<Name>, found \"\(text)\"")
                }
            }
        }
        if let v = f.duration("connect_timeout") { upstream.connectTimeout = v }
        if let v = f.duration("timeout") { upstream.timeout = v }
        if let node = f["retries"],
            let r = reader.fields(node, f.path("retries"), allowed: ["attempts", "on", "budget"])
        {
            var retries = RetryPolicy()
            if let v = r.int("attempts", min: 1, max: 10) { retries.attempts = v }
            if let items = r.strings("on") {
                retries.on = items.compactMap { item in
                    if item == "connect_failure" { return .connectFailure }
                    if let code = Int(item), (500...599).contains(code) || code == 429 { return .status(code) }
                    r.fail("on", "expected connect_failure or a 5xx/429 status, found \"\(item)\"")
                    return nil
                }
            }
            if let n = r["budget"], let v = reader.double(n, r.path("budget"), min: 0, max: 1) { retries.budget = v }
            upstream.retries = retries
        }
        if let node = f["health_check"],
            let h = reader.fields(
                node, f.path("health_check"), allowed: ["path", "interval", "unhealthy_after", "healthy_after"])
        {
            var check = HealthCheckConfig()
            if let v = h.string("path") {
                if v.hasPrefix("/") { check.path = v } else { h.fail("path", "must start with /") }
            }
            if let v = h.duration("interval") { check.interval = v }
            if let v = h.int("unhealthy_after", min: 1) { check.unhealthyAfter = v }
            if let v = h.int("healthy_after", min: 1) { check.healthyAfter = v }
            upstream.healthCheck = check
        }
        if let node = f["circuit_breaker"],
            let c = reader.fields(
                node, f.path("circuit_breaker"), allowed: ["failure_ratio", "min_requests", "open_for"])
        {
            var breaker = CircuitBreakerConfig()
            if let n = c["failure_ratio"], let v = reader.double(n, c.path("failure_ratio"), min: 0.01, max: 1) {
                breaker.failureRatio = v
            }
            if let v = c.int("min_requests", min: 1) { breaker.minRequests = v }
            if let v = c.duration("open_for") { breaker.openFor = v }
            upstream.circuitBreaker = breaker
        }
        if let node = f["passive_health"],
            let p = reader.fields(node, f.path("passive_health"), allowed: ["failures", "eject_for", "max_eject_for"])
        {
            if let v = p.int("failures", min: 0) { upstream.passiveHealth.failures = v }
            if let v = p.duration("eject_for") { upstream.passiveHealth.ejectFor = v }
            let maxEjectFor = p.duration("max_eject_for")
            if let maxEjectFor { upstream.passiveHealth.maxEjectFor = maxEjectFor }
            // Only two values the file gives can contradict each other; a longer eject_for raises the default cap.
            if upstream.passiveHealth.maxEjectFor.milliseconds < upstream.passiveHealth.ejectFor.milliseconds {
                if maxEjectFor == nil {
                    upstream.passiveHealth.maxEjectFor = upstream.passiveHealth.ejectFor
                } else {
                    p.fail("max_eject_for", "must not be shorter than eject_for")
                }
            }
        }
        if let node = f["oauth2"] { upstream.oauth2 = oauth2(node, f.path("oauth2")) }
        if let v = f.choice("pause_on_retry_after", as: RetryAfterPause.self) { upstream.pauseOnRetryAfter = v }
        if let node = f["tls"], let t = reader.fields(node, f.path("tls"), allowed: ["verify", "ca_file"]) {
            if let v = t.bool("verify") { upstream.tls.verify = v }
            upstream.tls.caFile = t.string("ca_file")
            if let file = upstream.tls.caFile, !FileManager.default.fileExists(atPath: file) {
                t.fail("ca_file", "file \"\(file)\" does not exist")
            }
        }
        if let node = f["request_headers"] {
            upstream.requestHeaders = headerRewrite(node, f.path("request_headers"))
        }
        return upstream
    }

    private func oauth2(_ node: Node, _ path: String) -> OAuth2Config? {
        guard
            let f = reader.fields(
                node, path, allowed: ["token_url", "client_id", "client_secret", "scopes", "audience", "client_auth"])
        else { return nil }
        // Each required key is looked up, so every missing one is reported.
        let tokenURL = f.require("token_url").flatMap { reader.string($0, f.path("token_url")) }
        let clientID = f.require("client_id").flatMap { reader.string($0, f.path("client_id")) }
        let secret = f.require("client_secret").flatMap { reader.string($0, f.path("client_secret")) }
        guard let tokenURL, let clientID, let secret else { return nil }
        guard let parsed = URLComponents(string: tokenURL), let scheme = parsed.scheme,
            ["http", "https"].contains(scheme), parsed.host?.isEmpty == false
        else {
            f.fail("token_url", "expected an http:// or https:// URL, found \"\(tokenURL)\"")
            return nil
        }
        var config = OAuth2Config(tokenURL: tokenURL, clientID: clientID, clientSecret: Secret(secret))
        if let scopes = f.strings("scopes") { config.scopes = scopes }
        config.audience = f.string("audience")
        if let text = f.string("client_auth") {
            if let auth = OAuth2Config.ClientAuth(rawValue: text) {
                config.clientAuth = auth
            } else {
                f.fail("client_auth", "expected basic | body, found \"\(text)\"")
            }
        }
        return config
    }

    private func target(_ node: Node, _ path: String) -> UpstreamTarget? {
        guard let f = reader.fields(node, path, allowed: ["url", "weight"]),
            let url = f.require("url").flatMap({ reader.string($0, f.path("url")) })
        else { return nil }
        guard let parsed = URLComponents(string: url), let scheme = parsed.scheme, ["http", "https"].contains(scheme),
            let host = parsed.host, !host.isEmpty, parsed.query == nil, parsed.path.isEmpty || parsed.path == "/"
        else {
            f.fail("url", "expected http://host:port or https://host:port without a path, found \"\(url)\"")
            return nil
        }
        var target = UpstreamTarget(url: url.hasSuffix("/") ? String(url.dropLast()) : url)
        if let weight = f.int("weight", min: 1, max: 1000) { target.weight = weight }
        return target
    }

    private func headerRewrite(_ node: Node, _ path: String) -> HeaderRewrite {
        var rewrite = HeaderRewrite()
        guard let f = reader.fields(node, path, allowed: ["set", "remove"]) else { return rewrite }
        if let set = f["set"] {
            rewrite.set = reader.pairs(set, f.path("set")).compactMap { pair in
                guard Self.isToken(pair.key) else {
                    reader.fail(pair.keyNode, "\(path).set.\(pair.key)", "not a valid header name")
                    return nil
                }
                guard let value = reader.string(pair.value, "\(path).set.\(pair.key)") else { return nil }
                guard !value.contains(where: { $0 == "\r" || $0 == "\n" || $0 == "\0" }) else {
                    reader.fail(pair.value, "\(path).set.\(pair.key)", "header values may not contain line breaks")
                    return nil
                }
                return HeaderValue(name: pair.key, value: Secret(value))
            }
        }
        rewrite.remove = f.strings("remove") ?? []
        return rewrite
    }

    static func isToken(_ text: String) -> Bool {
        !text.isEmpty
            && text.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                    || "!#$%&'*+-.^_`|~".utf8.contains(byte)
            }
    }

    // MARK: routes

    private func route(
        _ node: Node, _ path: String, upstreams: Set<String>, policies: Set<String>, auth: AuthConfig
    ) -> RouteConfig? {
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "id", "match", "upstream", "rewrite", "auth", "auth_methods", "rate_limit", "cache", "timeout",
                    "respond", "forward_authorization",
                ]),
            let id = f.require("id").flatMap({ reader.string($0, f.path("id")) }),
            let matchNode = f.require("match"),
            let match = routeMatch(matchNode, f.path("match"))
        else { return nil }
        var route = RouteConfig(id: id, match: match)
        route.line = node.mark?.line ?? 0
        route.upstream = f.string("upstream")
        if let name = route.upstream, !upstreams.contains(name) {
            f.fail("upstream", "unknown upstream \"\(name)\"")
        }
        if let node = f["respond"] { route.respond = respond(node, f.path("respond")) }
        if route.upstream == nil, f["respond"] == nil {
            reader.fail(node, f.path("upstream"), "a route needs upstream or respond")
        }
        if route.upstream != nil, f["respond"] != nil { f.fail("respond", "give upstream or respond, not both") }
        if let node = f["rewrite"],
            let r = reader.fields(node, f.path("rewrite"), allowed: ["strip_prefix", "add_prefix", "path"])
        {
            var rewrite = RouteRewrite(
                stripPrefix: r.string("strip_prefix"), addPrefix: r.string("add_prefix"), path: r.string("path"))
            if rewrite.path != nil, rewrite.stripPrefix != nil || rewrite.addPrefix != nil {
                r.fail("path", "give path, or strip_prefix/add_prefix, not both")
            }
            for key in ["strip_prefix", "add_prefix", "path"] {
                if let value = r.string(key), !value.hasPrefix("/") { r.fail(key, "must start with /") }
            }
            if let template = rewrite.path {
                let known = Set(PathTemplate.parameters(in: match.path ?? ""))
                for name in PathTemplate.parameters(in: template) where !known.contains(name) {
                    r.fail("path", "parameter {\(name)} is not in the route's match.path")
                }
            }
            if rewrite.addPrefix?.hasSuffix("/") == true, rewrite.addPrefix != "/" {
                rewrite.addPrefix = String(rewrite.addPrefix?.dropLast() ?? "")
            }
            route.rewrite = rewrite
        }
        if let v = f.choice("auth", as: AuthRequirement.self) { route.auth = v }
        if let methods = f.strings("auth_methods") {
            route.authMethods = methods.compactMap { name in
                if let method = AuthMethod(rawValue: name) { return method }
                f.fail("auth_methods", "expected api_key or jwt, found \"\(name)\"")
                return nil
            }
        }
        if route.auth != .none, auth.jwt.isEmpty, route.authMethods == [.jwt] {
            f.fail("auth_methods", "jwt is named but auth.jwt configures no issuer")
        }
        if let node = f["rate_limit"] {
            let names =
                reader.isNull(node)
                ? []
                : (node.scalar != nil
                    ? reader.string(node, f.path("rate_limit")).map { [$0] } : f.strings("rate_limit")) ?? []
            for name in names where !policies.contains(name) {
                f.fail("rate_limit", "unknown rate limit policy \"\(name)\"")
            }
            route.rateLimit = names
        }
        if let node = f["cache"] { route.cache = cache(node, f.path("cache")) }
        route.timeout = f.duration("timeout")
        if let v = f.bool("forward_authorization") { route.forwardAuthorization = v }
        return route
    }

    private func routeMatch(_ node: Node, _ path: String) -> RouteMatch? {
        guard let f = reader.fields(node, path, allowed: ["host", "methods", "path", "path_prefix"]) else { return nil }
        var match = RouteMatch()
        if let host = f.string("host") {
            let bare = host.hasPrefix("*.") ? String(host.dropFirst(2)) : host
            if bare.isEmpty || bare.contains("*") || bare.contains("/") || bare.contains(" ") {
                f.fail("host", "expected a host name or *.suffix, found \"\(host)\"")
            }
            match.host = host.lowercased()
        }
        if let methods = f.strings("methods") {
            match.methods = methods.map { $0.uppercased() }
            for method in methods where !Self.isToken(method) {
                f.fail("methods", "\"\(method)\" is not a method name")
            }
        }
        match.path = f.string("path")
        match.pathPrefix = f.string("path_prefix")
        switch (match.path, match.pathPrefix) {
        case (nil, nil): reader.fail(node, f.path("path"), "give path or path_prefix")
        case (.some, .some): f.fail("path_prefix", "give path or path_prefix, not both")
        default: break
        }
        for key in ["path", "path_prefix"] {
            guard let value = f.string(key) else { continue }
            if !value.hasPrefix("/") { f.fail(key, "must start with /") }
        }
        if let template = match.path, let problem = PathTemplate.problem(in: template) { f.fail("path", problem) }
        return match
    }

    private func cache(_ node: Node, _ path: String) -> RouteCache? {
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "ttl", "max_ttl", "stale_while_revalidate", "stale_if_error", "key_headers", "shared",
                    "max_object_bytes", "store_set_cookie", "local_ttl", "lock_timeout",
                ])
        else { return nil }
        var cache = RouteCache()
        if let v = f.duration("ttl") { cache.ttl = v }
        if let v = f.duration("max_ttl") { cache.maxTTL = v }
        if let v = f.duration("stale_while_revalidate") { cache.staleWhileRevalidate = v }
        if let v = f.duration("stale_if_error") { cache.staleIfError = v }
        if let v = f.strings("key_headers") { cache.keyHeaders = v }
        if let v = f.bool("shared") { cache.shared = v }
        if let v = f.size("max_object_bytes") { cache.maxObjectBytes = v }
        if let v = f.bool("store_set_cookie") { cache.storeSetCookie = v }
        if let v = f.duration("local_ttl") { cache.localTTL = v }
        if let v = f.duration("lock_timeout") { cache.lockTimeout = v }
        // ttl larger than max_ttl is valid (SPEC §7.1): ttl is for answers without freshness, max_ttl caps the rest.
        return cache
    }

    private func respond(_ node: Node, _ path: String) -> DirectResponse? {
        guard let f = reader.fields(node, path, allowed: ["status", "body", "headers"]) else { return nil }
        var response = DirectResponse()
        if let v = f.int("status", min: 200, max: 599) { response.status = v }
        if let v = f.string("body") { response.body = v }
        if [204, 304].contains(response.status), !response.body.isEmpty {
            f.fail("body", "a \(response.status) answer has no body")
        }
        if let headers = f["headers"] {
            response.headers = reader.pairs(headers, f.path("headers")).compactMap { pair in
                guard Self.isToken(pair.key) else {
                    reader.fail(pair.keyNode, "\(path).headers.\(pair.key)", "not a valid header name")
                    return nil
                }
                guard let value = reader.string(pair.value, "\(path).headers.\(pair.key)") else { return nil }
                guard !value.unicodeScalars.contains(where: { $0.value < 0x20 && $0 != "\t" || $0.value == 0x7F })
                else {
                    reader.fail(
                        pair.value, "\(path).headers.\(pair.key)", "header values may not contain control characters")
                    return nil
                }
                return DirectHeader(name: pair.key, value: value)
            }
        }
        return response
    }
}

/// Path templates such as `/v1/users/{id}`: one parameter is one whole segment.
public enum PathTemplate {
    /// The parameter names of a template, in order.
    public static func parameters(in template: String) -> [String] {
        template.split(separator: "/").compactMap { segment in
            segment.hasPrefix("{") && segment.hasSuffix("}") ? String(segment.dropFirst().dropLast()) : nil
        }
    }

    /// A description of what is wrong with a template, or nil.
    public static func problem(in template: String) -> String? {
        var names = Set<String>()
        for segment in template.split(separator: "/") where segment.contains("{") || segment.contains("}") {
            guard segment.hasPrefix("{"), segment.hasSuffix("}"), segment.count > 2 else {
                return "a parameter must be a whole segment such as {id}, found \"\(segment)\""
            }
            let name = String(segment.dropFirst().dropLast())
            guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else {
                return "bad parameter name \"\(name)\""
            }
            guard names.insert(name).inserted else { return "parameter {\(name)} appears twice" }
        }
        return nil
    }
}
