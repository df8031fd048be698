import Foundation
import Yams

/// `upstreams`.
extension ConfigBuilder {
    func upstream(_ name: String, _ node: Node) -> UpstreamConfig? {
        let path = "upstreams.\(name)"
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "targets", "balance", "connect_timeout", "timeout", "retries", "health_check", "circuit_breaker",
                    "passive_health", "tls", "request_headers", "oauth2", "pause_on_retry_after",
                    "protocol",
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
        if let v = f.choice("protocol", as: UpstreamProtocol.self) { upstream.protocol = v }
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

    func oauth2(_ node: Node, _ path: String) -> OAuth2Config? {
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

    func target(_ node: Node, _ path: String) -> UpstreamTarget? {
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

    func headerRewrite(_ node: Node, _ path: String) -> HeaderRewrite {
        var rewrite = HeaderRewrite()
        guard let f = reader.fields(node, path, allowed: ["set", "remove"]) else { return rewrite }
        if let set = f["set"] { rewrite.set = headerValues(set, f.path("set")) }
        rewrite.remove = f.strings("remove") ?? []
        return rewrite
    }

    /// `Name: value` pairs of header edits; values may hold credentials, so they are kept as secrets.
    func headerValues(_ node: Node, _ path: String) -> [HeaderValue] {
        reader.pairs(node, path).compactMap { pair in
            guard Self.isToken(pair.key) else {
                reader.fail(pair.keyNode, "\(path).\(pair.key)", "not a valid header name")
                return nil
            }
            guard let value = reader.string(pair.value, "\(path).\(pair.key)") else { return nil }
            guard !value.contains(where: { $0 == "\r" || $0 == "\n" || $0 == "\0" }) else {
                reader.fail(pair.value, "\(path).\(pair.key)", "header values may not contain line breaks")
                return nil
            }
            return HeaderValue(name: pair.key, value: Secret(value))
        }
    }

    static func isToken(_ text: String) -> Bool {
        !text.isEmpty
            && text.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                    || "!#$%&'*+-.^_`|~".utf8.contains(byte)
            }
    }
}
