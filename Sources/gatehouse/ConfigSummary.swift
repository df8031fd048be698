import GatehouseConfig

/// The version printed by `gatehouse --version`.
enum GatehouseVersion {
    static let current = "0.1.0"
}

/// The one-screen summary `gatehouse check` prints for a valid config.
enum ConfigSummary {
    static func text(_ config: GatehouseConfiguration, path: String) -> String {
        var lines = ["\(path): OK"]
        lines.append("  listen      \(config.server.listen)\(config.server.tls != nil ? " (TLS)" : "")")
        lines.append("  admin       \(config.admin.listen)\(config.admin.token != nil ? " (token)" : "")")
        let redis = config.redis.endpoint.map(\.display) ?? "invalid"
        lines.append("  redis       \(redis) (pool \(config.redis.poolSize))")
        lines.append(
            "  upstreams   \(config.upstreams.count): "
                + config.upstreams.map { "\($0.name) (\($0.targets.count) target\($0.targets.count == 1 ? "" : "s"))" }
                .joined(separator: ", "))
        lines.append("  routes      \(config.routes.count)")
        for route in config.routes {
            let match = route.match.path ?? (route.match.pathPrefix.map { $0 + "*" } ?? "")
            let methods = route.match.methods?.joined(separator: ",") ?? "*"
            let target = route.upstream.map { "-> \($0)" } ?? "-> respond \(route.respond?.status ?? 200)"
            let cache = route.cache.map { " (cache: ttl \($0.ttl), max \($0.maxTTL))" } ?? ""
            lines.append("    \(route.id): \(route.match.host ?? "*") \(methods) \(match) \(target)\(cache)")
        }
        lines.append(
            "  consumers   \(config.consumers.count), rate limit policies \(config.rateLimits.count), jwt issuers \(config.auth.jwt.count)"
        )
        let warnings = config.warnings
        if !warnings.isEmpty {
            lines.append("  warnings (logged at start too):")
            for warning in warnings { lines.append("    - \(warning)") }
        }
        return lines.joined(separator: "\n")
    }
}
