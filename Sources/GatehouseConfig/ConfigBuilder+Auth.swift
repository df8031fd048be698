import Foundation
import Yams

/// `consumers`, `auth` and `rate_limits`.
extension ConfigBuilder {
    func consumer(_ node: Node, _ path: String, _ policies: Set<String>) -> ConsumerConfig? {
        guard let f = reader.fields(node, path, allowed: ["id", "api_keys", "client_certs", "rate_limit"]),
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
        if let certs = f.strings("client_certs") {
            for (index, cert) in certs.enumerated() where !Self.isKeyHash(cert) {
                reader.fail(
                    f["client_certs"], "\(path).client_certs[\(index)]",
                    "expected sha256:<64 hex digits of the certificate's DER> "
                        + "(openssl x509 -outform der | sha256sum)")
            }
            consumer.clientCerts = certs.map { $0.lowercased() }
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

    func auth(_ node: Node) -> AuthConfig {
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

    func jwt(_ node: Node, _ path: String) -> JWTIssuerConfig? {
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

    func rateLimit(_ name: String, _ node: Node) -> RateLimitPolicy? {
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
}
