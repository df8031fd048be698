import GatehouseConfig
import NIOHTTP1

/// A route's `cors`, resolved ahead: what a browser's preflight is answered with, and what every answer to an
/// allowed origin carries (the Fetch standard's CORS protocol).
struct CORSPolicy: Sendable {
    private let anyOrigin: Bool
    private let origins: Set<String>
    private let credentials: Bool
    private let methods: String
    private let allowHeaders: String?
    private let exposeHeaders: String?
    private let maxAge: String?

    init(_ config: CORSConfig) {
        anyOrigin = config.allowOrigins == ["*"]
        origins = Set(config.allowOrigins)
        credentials = config.allowCredentials
        methods = config.allowMethods.joined(separator: ", ")
        allowHeaders = config.allowHeaders.isEmpty ? nil : config.allowHeaders.joined(separator: ", ")
        exposeHeaders = config.exposeHeaders.isEmpty ? nil : config.exposeHeaders.joined(separator: ", ")
        maxAge = config.maxAge.map { String($0.milliseconds / 1000) }
    }

    /// Whether a request is a CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
    static func isPreflight(_ head: HTTPRequestHead) -> Bool {
        head.method == .OPTIONS && head.headers.contains(name: "Origin")
            && head.headers.contains(name: "Access-Control-Request-Method")
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, or nil when that origin is not allowed.
    private func allowedOrigin(_ headers: HTTPHeaders) -> String? {
        guard let origin = headers.first(name: "Origin") else { return nil }
        if anyOrigin { return credentials ? origin : "*" }
        return origins.contains(origin.lowercased()) ? origin : nil
    }

    /// Whether answers differ by `Origin` (they do unless every origin gets `*`).
    private var variesByOrigin: Bool { !anyOrigin || credentials }

    /// The answer to a preflight: 204, with the `Access-Control-Allow-*` headers only for an allowed origin.
    func preflight(_ request: HTTPHeaders) -> DirectAnswer {
        var headers = HTTPHeaders()
        if let origin = allowedOrigin(request) {
            headers.add(name: "Access-Control-Allow-Origin", value: origin)
            if credentials { headers.add(name: "Access-Control-Allow-Credentials", value: "true") }
            headers.add(name: "Access-Control-Allow-Methods", value: methods)
            if let allowHeaders { headers.add(name: "Access-Control-Allow-Headers", value: allowHeaders) }
            if let maxAge { headers.add(name: "Access-Control-Max-Age", value: maxAge) }
        }
        headers.add(name: "Vary", value: "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        return DirectAnswer(status: .noContent, headers: headers)
    }

    /// Adds what an actual answer carries: the upstream's own `Access-Control-*` give way to the route's, an allowed
    /// origin gets `Access-Control-Allow-Origin` (and credentials and exposed headers), and `Vary: Origin` marks an
    /// answer that depends on it, so no cache hands one origin's answer to another.
    func apply(to headers: inout HTTPHeaders, request: HTTPHeaders) {
        headers.remove(name: "Access-Control-Allow-Origin")
        headers.remove(name: "Access-Control-Allow-Credentials")
        headers.remove(name: "Access-Control-Expose-Headers")
        if let origin = allowedOrigin(request) {
            headers.add(name: "Access-Control-Allow-Origin", value: origin)
            if credentials { headers.add(name: "Access-Control-Allow-Credentials", value: "true") }
            if let exposeHeaders { headers.add(name: "Access-Control-Expose-Headers", value: exposeHeaders) }
        }
        if variesByOrigin { headers.addVary("Origin") }
    }
}

/// A route's `request_headers` or `response_headers`: `remove` (any case), then `set` (replaces every value), then
/// `add` (one more value). Values were read with `${NAME}` already replaced.
struct HeaderEdits: Sendable {
    private let remove: Set<String>
    private let set: [(name: String, value: String)]
    private let add: [(name: String, value: String)]
    let isEmpty: Bool

    init(_ config: HeaderTransform) {
        // Framing belongs to the gateway: a route's edits never change how a message is delimited.
        let framing: Set<String> = ["content-length", "transfer-encoding", "connection"]
        remove = Set(config.remove).subtracting(framing)
        set = config.set.filter { !framing.contains($0.name.lowercased()) }.map { ($0.name, $0.value.value) }
        add = config.add.filter { !framing.contains($0.name.lowercased()) }.map { ($0.name, $0.value.value) }
        isEmpty = config.isEmpty
    }

    /// Lower-cased names of the headers these edits decide.
    var names: Set<String> { remove.union(set.map { $0.name.lowercased() }).union(add.map { $0.name.lowercased() }) }

    func apply(to headers: inout HTTPHeaders) {
        for name in remove { headers.remove(name: name) }
        for (name, value) in set { headers.replaceOrAdd(name: name, value: value) }
        for (name, value) in add { headers.add(name: name, value: value) }
    }

    func apply(to headers: inout [(name: String, value: String)]) {
        if !remove.isEmpty { headers.removeAll { remove.contains($0.name.lowercased()) } }
        for (name, value) in set {
            headers.removeAll { $0.name.caseInsensitiveEquals(name) }
            headers.append((name, value))
        }
        for (name, value) in add { headers.append((name, value)) }
    }
}

/// A route's `allow_ips` and `deny_ips`, checked on the client address (after `trusted_proxies`).
struct IPRules: Sendable {
    private let allow: [CIDR]
    private let deny: [CIDR]

    init?(allow: [CIDR], deny: [CIDR]) {
        guard !allow.isEmpty || !deny.isEmpty else { return nil }
        self.allow = allow
        self.deny = deny
    }

    /// Whether the address may use the route: not denied, and allowed when an allow list exists. An address that
    /// cannot be read is refused.
    func admits(_ address: String) -> Bool {
        guard let bytes = IPAddressText.parse(address) else { return false }
        if deny.contains(where: { $0.contains(bytes) }) { return false }
        return allow.isEmpty || allow.contains(where: { $0.contains(bytes) })
    }
}

extension HTTPHeaders {
    /// Adds a token to `Vary` (in the existing field when there is one), unless it is there already or `Vary: *`.
    mutating func addVary(_ token: String) {
        let existing = self["Vary"]
        guard !existing.isEmpty else {
            add(name: "Vary", value: token)
            return
        }
        for value in existing {
            for item in value.split(separator: ",") {
                let item = item.trimmedSpaces
                if item == "*" || String(item).caseInsensitiveEquals(token) { return }
            }
        }
        replaceOrAdd(name: "Vary", value: existing.joined(separator: ", ") + ", " + token)
    }
}
