public import Foundation
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
            allowed: [
                "server", "admin", "redis", "consumers", "auth", "rate_limits", "upstreams", "routes", "tracing",
            ])
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
        if let node = top["tracing"] { config.tracing = tracing(node) }
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
        checkClientCertificates(config, root)
        return config
    }

    func tracing(_ node: Node) -> TracingConfig? {
        guard let f = reader.fields(node, "tracing", allowed: ["otlp_endpoint", "service_name", "sample_ratio"]),
            let endpoint = f.require("otlp_endpoint").flatMap({ reader.string($0, f.path("otlp_endpoint")) })
        else { return nil }
        guard let url = URLComponents(string: endpoint), url.scheme == "http" || url.scheme == "https",
            url.host?.isEmpty == false
        else {
            f.fail("otlp_endpoint", "expected an http:// or https:// base URL, found \"\(endpoint)\"")
            return nil
        }
        var tracing = TracingConfig(otlpEndpoint: endpoint.hasSuffix("/") ? String(endpoint.dropLast()) : endpoint)
        if let v = f.string("service_name") { tracing.serviceName = v }
        if let text = f.string("sample_ratio") {
            if let ratio = Double(text), (0...1).contains(ratio) {
                tracing.sampleRatio = ratio
            } else {
                f.fail("sample_ratio", "expected a number from 0 to 1, found \"\(text)\"")
            }
        }
        return tracing
    }

    /// Client certificates identify consumers only where the listener asks for them.
    private func checkClientCertificates(_ config: GatehouseConfiguration, _ root: Node) {
        guard config.server.tls?.clientCA == nil else { return }
        for route in config.routes where route.authMethods?.contains(.clientCert) == true {
            reader.fail(
                root, "routes[\(route.id)].auth_methods",
                "client_cert needs server.tls.client_ca (the CA that client certificates are verified against)")
        }
    }
}
