import CoreMetrics
import Foundation
import GatehouseConfig
import NIOCore
import NIOHTTP1
import UpstreamClient

/// The phases that decide before anything goes to the cache or upstream, in their order.
enum DecidingPhase: Int {
    case accept, route, admit, authenticate, rateLimit

    func run(_ context: inout RequestContext, _ environment: PhaseEnvironment) throws(GatewayError) -> PhaseStep {
        switch self {
        case .accept: try AcceptPhase.run(&context, environment)
        case .route: try RoutePhase.run(&context, environment)
        case .admit: try AdmitPhase.run(&context)
        case .authenticate: try AuthenticatePhase.run(&context, environment)
        case .rateLimit: try RateLimitPhase.run(&context, environment)
        }
    }
}

/// What the deciding phases may use besides the request's context.
struct PhaseEnvironment {
    let runtime: Runtime
    let core: GatewayCore
    let eventLoop: EventLoop
}

/// What a deciding phase decided, when it did not answer (a phase answers by throwing a ``GatewayError``).
enum PhaseStep {
    /// The next phase runs now.
    case next
    /// The phase waits for an answer from elsewhere (Redis, an issuer's keys). Once it is in, the update records it
    /// in the context, or throws the answer to the client; then the next phase runs.
    case wait(EventLoopFuture<ContextUpdate>)
    /// The phase answers the request itself, and not with an error (a CORS preflight).
    case answer(DirectAnswer)
}

/// How a waiting phase's answer changes the request's context.
typealias ContextUpdate = @Sendable (inout RequestContext) throws -> Void

/// accept: checks what the HTTP codec cannot (Host, head size, declared body size).
enum AcceptPhase {
    static func run(_ context: inout RequestContext, _ environment: PhaseEnvironment) throws(GatewayError) -> PhaseStep
    {
        let head = context.head
        let limits = environment.runtime.config.server.limits
        var headBytes = head.method.rawValue.utf8.count + head.uri.utf8.count + 12
        for (name, value) in head.headers { headBytes += name.utf8.count + value.utf8.count + 4 }
        if headBytes > limits.maxHeaderBytes { throw .headersTooLarge(limit: limits.maxHeaderBytes) }

        let hosts = head.headers["Host"]
        if hosts.count > 1 { throw .badRequest("The request has more than one Host header.") }
        if hosts.isEmpty, head.version.minor >= 1 { throw .badRequest("The request has no Host header.") }
        if let host = hosts.first, !Self.isValidHost(host) { throw .badRequest("The request's Host is invalid.") }
        context.hostHeader = hosts.first ?? ""
        context.host = Self.hostName(context.hostHeader)
        if environment.runtime.config.server.headersWithUnderscores == .reject,
            head.headers.contains(where: { $0.name.utf8.contains(UInt8(ascii: "_")) })
        {
            throw .badRequest("The request has a header whose name contains an underscore.")
        }

        let lengths = head.headers["Content-Length"]
        if !lengths.isEmpty {
            if head.headers.contains(name: "Transfer-Encoding") {
                throw .badRequest("The request has both Content-Length and Transfer-Encoding.")
            }
            guard Set(lengths).count == 1, let length = Int(lengths[0]), length >= 0 else {
                throw .badRequest("The request's Content-Length is invalid.")
            }
            if length > limits.maxBodyBytes { throw .bodyTooLarge(limit: limits.maxBodyBytes) }
        }
        return .next
    }

    /// Whether a Host header is `host[:port]` (RFC 9110 §7.2): a registered name or IPv4 address made of
    /// unreserved, sub-delim and %-escaped characters, or an IPv6 literal in brackets; the port all digits.
    /// Anything else (`@`, `/`, spaces) could make the name the upstream sees differ from the one routed and cached.
    static func isValidHost(_ header: String) -> Bool {
        var header = header
        return header.withUTF8 { bytes in
            if bytes.first == UInt8(ascii: "[") {
                guard let close = bytes.firstIndex(of: UInt8(ascii: "]")), close > 1,
                    bytes[1..<close].allSatisfy({ isHexDigit($0) || $0 == UInt8(ascii: ":") || $0 == UInt8(ascii: ".") }
                    )
                else { return false }
                if close == bytes.count - 1 { return true }
                return bytes[close + 1] == UInt8(ascii: ":") && isPort(bytes[(close + 2)...])
            }
            var end = bytes.count
            if let colon = bytes.lastIndex(of: UInt8(ascii: ":")) {
                guard isPort(bytes[(colon + 1)...]) else { return false }
                end = colon
            }
            return bytes[..<end].allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"):
                    return true
                default:
                    return "-._~!$&'()*+,;=%".utf8.contains(byte)
                }
            }
        }
    }

    private static func isHexDigit(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "a")...UInt8(ascii: "f"),
            UInt8(ascii: "A")...UInt8(ascii: "F"):
            true
        default: false
        }
    }

    /// A port: at most five digits (none at all is allowed, as in `host:`).
    private static func isPort(_ bytes: Slice<UnsafeBufferPointer<UInt8>>) -> Bool {
        bytes.count <= 5 && bytes.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
    }

    /// The host part of a valid Host header, lower-cased, without port or trailing dot.
    static func hostName(_ header: String) -> String {
        var header = header
        return header.withUTF8 { bytes in
            var end = bytes.count
            if bytes.first == UInt8(ascii: "[") {
                if let close = bytes.firstIndex(of: UInt8(ascii: "]")) { end = close + 1 }
            } else if let colon = bytes.lastIndex(of: UInt8(ascii: ":")) {
                end = colon
            }
            if end > 0, bytes[end - 1] == UInt8(ascii: ".") { end -= 1 }
            return String(unsafeUninitializedCapacity: end) { out in
                for index in 0..<end {
                    let byte = bytes[index]
                    out[index] = byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte + 32 : byte
                }
                return end
            }
        }
    }

    /// The client address behind a trusted proxy: the right-most address of X-Forwarded-For that is not
    /// itself a trusted proxy.
    static func clientIP(behindProxy peer: String, headers: HTTPHeaders, trusted: [CIDR]) -> String {
        let hops = headers["X-Forwarded-For"].flatMap { $0.split(separator: ",") }.map { String($0.trimmedSpaces) }
        for hop in hops.reversed() {
            guard let bytes = IPAddressText.parse(hop) else { return peer }
            if !trusted.contains(where: { $0.contains(bytes) }) { return hop }
        }
        return hops.first ?? peer
    }
}

/// route: normalises the path and finds the route.
enum RoutePhase {
    /// What the gateway answers CONNECT with: the methods a route may take.
    static let methodsForConnect = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    static func run(_ context: inout RequestContext, _ environment: PhaseEnvironment) throws(GatewayError) -> PhaseStep
    {
        let runtime = environment.runtime
        // The gateway is no tunnel: CONNECT never reaches a route or an upstream.
        if context.head.method == .CONNECT {
            var refusal = GatewayError.methodNotAllowed(allow: methodsForConnect)
            refusal.detail = "The gateway is no tunnel: CONNECT is not accepted."
            throw refusal
        }
        var target = Substring(context.head.uri)
        // Absolute-form ("GET http://other.host/x"): only the path and query count; the host never picks a target.
        if !target.hasPrefix("/") {
            guard let scheme = target.range(of: "://") else {
                throw .badRequest("The request target must be a path.")
            }
            let afterAuthority = target[scheme.upperBound...]
            target = afterAuthority.firstIndex(where: { $0 == "/" || $0 == "?" }).map { afterAuthority[$0...] } ?? "/"
            if target.hasPrefix("?") { target = "/" + target }
        }
        if let question = target.firstIndex(of: "?") {
            context.query = target[target.index(after: question)...]
            target = target[..<question]
        }
        if let hash = target.firstIndex(of: "#") { target = target[..<hash] }
        guard let path = PathNormalizer.normalize(target) else { throw .badRequest("The request path is malformed.") }
        context.path = path
        // A CORS preflight asks about the method the browser means to send: it finds that method's route, if that
        // route answers CORS; otherwise the OPTIONS request is routed as itself.
        var match = runtime.table.match(host: context.host, path: path, method: context.head.method.wireName)
        if CORSPolicy.isPreflight(context.head),
            let requested = context.head.headers.first(name: "Access-Control-Request-Method"),
            case .found(let index, _) = runtime.table.match(host: context.host, path: path, method: requested),
            runtime.routes[index].cors != nil
        {
            match = runtime.table.match(host: context.host, path: path, method: requested)
        }
        switch match {
        case .notFound:
            throw .notFound()
        case .methodNotAllowed(let allow):
            throw .methodNotAllowed(allow: allow)
        case .found(let index, let parameters):
            context.route = runtime.routes[index]
            context.parameters = parameters
        }
        return .next
    }
}

/// admit: the route's IP rules (403), then a CORS preflight, which the gateway answers itself (204) before
/// authentication and without the upstream (SPEC §7.2).
enum AdmitPhase {
    static func run(_ context: inout RequestContext) throws(GatewayError) -> PhaseStep {
        guard let route = context.route else { return .next }
        if let rules = route.ipRules, !rules.admits(context.clientIP) {
            throw GatewayError(
                status: .forbidden, detail: "The client address may not use this route.", origin: .client)
        }
        if let cors = route.cors, CORSPolicy.isPreflight(context.head) {
            return .answer(cors.preflight(context.head.headers))
        }
        return .next
    }
}

/// authenticate: API key or JWT -> caller, as the route's `auth` and `auth_methods` say (``Authenticator``).
/// Returns nil when decided here (the caller, if any, is in the context), or the answer still to come.
enum AuthenticatePhase {
    static func run(_ context: inout RequestContext, _ environment: PhaseEnvironment) throws(GatewayError) -> PhaseStep
    {
        // Authorization is a singleton field: with two, the gateway and the upstream could each read another one.
        if context.head.headers.lazy.filter({ $0.name.caseInsensitiveEquals("Authorization") }).count > 1 {
            throw Authenticator.unauthorized(
                "The request has more than one Authorization header.", error: "invalid_request")
        }
        guard let route = context.route, route.config.auth != .none,
            let pending = try environment.core.authenticator.authenticate(
                &context, route: route, runtime: environment.runtime, eventLoop: environment.eventLoop)
        else { return .next }
        return .wait(
            pending.map { caller -> ContextUpdate in { $0.caller = caller } }.recover { error -> ContextUpdate in
                let answer =
                    error as? GatewayError
                    ?? GatewayError(
                        status: .serviceUnavailable, detail: "Authentication failed: \(error)", origin: .gateway)
                return { _ in throw answer }
            })
    }
}

/// rate limit: every policy that applies (the consumer's own, then the route's), checked together.
enum RateLimitPhase {
    static func run(_ context: inout RequestContext, _ environment: PhaseEnvironment) throws(GatewayError) -> PhaseStep
    {
        let runtime = environment.runtime
        guard let route = context.route else { return .next }
        var names: [String] = []
        if let caller = context.caller, caller.issuer == nil, let own = runtime.consumerRateLimits[caller.id] {
            names.append(own)
        }
        for name in route.config.rateLimit where !names.contains(name) { names.append(name) }
        let checks = names.compactMap { name -> RateLimitCheck? in
            guard let rule = runtime.rateLimitRules[name] else { return nil }
            let policy = rule.policy
            let identity: String
            switch policy.by {
            case .consumer: identity = context.callerKey
            case .ip: identity = "ip:" + context.clientIP
            case .route: identity = "r:" + route.config.id
            case .header(let header):
                // Without the header, a caller counts by its address, never in one bucket shared by all such callers.
                identity = context.head.headers.first(name: header).map { "h:" + $0 } ?? "ip:" + context.clientIP
            }
            return RateLimitCheck(rule: rule, key: RateLimiter.key(policy, identity: identity))
        }
        guard !checks.isEmpty else { return .next }
        switch environment.core.rateLimiter.check(checks, on: environment.eventLoop) {
        case .now(let outcome):
            try apply(outcome, &context)
            return .next
        case .later(let outcome):
            // The limiter answers from its local fallback when Redis fails; a failure here lets the request on.
            return .wait(
                outcome.map { outcome -> ContextUpdate in { context in try apply(outcome, &context) } }.recover { _ in
                    { _ in }
                })
        }
    }

    /// Keeps the headers for the answer; refuses with 429 (or 503 when a `deny` policy could not be checked).
    static func apply(_ outcome: RateLimitOutcome, _ context: inout RequestContext) throws(GatewayError) {
        context.rateLimitHeaders = outcome.headers
        let refused = outcome.members.filter { !$0.allowed }
        guard !refused.isEmpty else { return }
        let retry = String(RateLimitOutcome.seconds(refused.map(\.retryMilliseconds).max() ?? 1000))
        let names = refused.map { "\"\($0.policy.name)\"" }.joined(separator: ", ")
        if outcome.degraded, refused.allSatisfy({ $0.policy.onRedisError == .deny }) {
            throw GatewayError(
                status: .serviceUnavailable,
                detail: "The rate limit \(names) cannot be checked while Redis is away, and its policy denies.",
                origin: .redis, headers: [("Retry-After", retry)])
        }
        throw GatewayError(
            status: .tooManyRequests, detail: "Over the rate limit \(names).", origin: .client,
            headers: [("Retry-After", retry)])
    }
}

/// cache lookup: whether the request may be answered from the cache, and under which key. The lookup itself
/// is asynchronous (the handler runs it); requests the cache cannot serve get their `Cache-Status` here.
enum CacheLookupPhase {
    static func run(_ context: inout RequestContext, runtime: Runtime, cache: ResponseCache) throws(GatewayError)
        -> CacheExchange?
    {
        let head = context.head
        // gRPC is never cached.
        guard !context.isGRPC, let route = context.route, let config = route.config.cache,
            let metrics = route.cacheMetrics
        else { return nil }
        func bypass(_ detail: String) throws(GatewayError) -> CacheExchange? {
            context.cacheStatus = "gatehouse; fwd=bypass; detail=" + detail
            metrics.bypassed.increment()
            // `only-if-cached` (RFC 9111 §5.2.1.7): a request this cache cannot answer gets 504, not the upstream.
            if CachePolicy.requestControl(head.headers).onlyIfCached { throw .onlyIfCached() }
            return nil
        }
        guard head.method == .GET || head.method == .HEAD else {
            context.cacheStatus = "gatehouse; fwd=method"
            return nil
        }
        if head.headers.contains(name: "Transfer-Encoding")
            || (head.headers.first(name: "Content-Length") ?? "0") != "0"
        {
            return try bypass("request-body")
        }
        var authenticated =
            head.headers.contains(name: "Authorization")
            || head.headers.contains(name: runtime.config.auth.apiKey.header)
        if let parameter = runtime.apiKeyQueryParameter, let query = context.query,
            ForwardPhase.stripParameter(parameter, from: query) != query
        {
            authenticated = true
        }
        let perConsumer = !config.shared && context.caller != nil
        // Without a consumer to key by, an authenticated request may only share entries on a `shared` route.
        if authenticated, !config.shared, !perConsumer { return try bypass("authorization") }
        if cache.store.problem != nil { return try bypass("redis-unavailable") }
        let origin = ForwardPhase.forwardedOrigin(context)
        let key = CacheKey(
            route: route.config.id, scheme: origin.proto.lowercased(), host: origin.host?.lowercased() ?? "",
            path: context.path,
            query: context.query, droppingParameter: runtime.apiKeyQueryParameter, keyHeaders: config.keyHeaders,
            headers: head.headers, consumer: perConsumer ? context.caller?.key : nil)
        let exchange = CacheExchange(cache: cache, key: key, config: config, metrics: metrics, request: head)
        exchange.facts.authenticated = authenticated
        exchange.facts.keyedPerConsumer = perConsumer
        // Headers whose forwarded value is not the client's: a response that varies on one cannot be keyed.
        exchange.facts.gatewayHeaders = route.gatewayHeaders
        if head.headers.contains(name: "Connection") {
            exchange.facts.gatewayHeaders.formUnion(ForwardPhase.connectionTokens(head.headers))
        }
        return exchange
    }
}

/// pick target: chooses the upstream server; a caller the upstream told to wait is answered here meanwhile.
enum PickTargetPhase {
    static func run(_ context: inout RequestContext) throws(GatewayError) {
        guard let pool = context.route?.pool else {
            throw GatewayError(
                status: .serviceUnavailable, detail: "No upstream target is available.", origin: .gateway)
        }
        if pool.config.pauseOnRetryAfter == .consumer,
            let refusal = pool.callerPauses.refusal(for: context.callerKey, upstream: pool.config.name)
        {
            throw refusal
        }
        switch pool.pick(hashKey: pool.hashHeader.flatMap { context.head.headers.first(name: $0) }) {
        case .success(let lease):
            context.targetURL = lease.url
            context.lease = lease
        case .failure(let error):
            throw error
        }
    }
}

/// forward: builds what is sent upstream (SPEC §3).
enum ForwardPhase {
    /// Request headers that belong to one connection and are never forwarded, plus those the gateway sets itself
    /// (identity headers belong to the gateway, SPEC §7.1) and the URL overrides some servers obey.
    static let droppedRequestHeaders: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
        "proxy-authorization", "host", "content-length", "x-consumer-id", "x-consumer-issuer", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "x-request-id", "via", "expect", "forwarded", "x-real-ip",
        "x-original-url", "x-rewrite-url",
    ]

    static func upstreamRequest(for context: RequestContext, runtime: Runtime) -> UpstreamRequest {
        let head = context.head
        let route = context.route
        let upstream = route?.pool?.config
        let path = PathRewrite.apply(route?.config.rewrite, to: context.path, parameters: context.parameters)
        var url = (context.targetURL ?? "") + path
        if let query = context.query {
            let kept = runtime.apiKeyQueryParameter.map { stripParameter($0, from: query) } ?? query
            if !kept.isEmpty { url += "?" + kept }
        }

        let connectionNamed = connectionTokens(head.headers)
        // request_headers.remove and the client's API key, which is never forwarded.
        let removed = route?.pool?.droppedHeaders ?? []
        let dropUnderscores = runtime.config.server.headersWithUnderscores != .allow
        // An Authorization the gateway did not verify goes on only where the route says so; an API key never.
        let forwardAuthorization =
            !context.authorizationWasAPIKey
            && (context.authorizationVerified || route?.config.forwardAuthorization == true)
        var headers: [(name: String, value: String)] = []
        headers.reserveCapacity(head.headers.count + 6)
        var via: String?
        var forwardedFor: String?
        var forwardedProto: String?
        var forwardedHost: String?
        var forwarded: String?
        var cookie: String?
        for (name, value) in head.headers {
            let lower = name.lowercased()
            switch lower {
            case "cookie":
                // HTTP/2 clients send each cookie as its own field; HTTP/1.1 upstreams read one (RFC 9113 §8.2.3).
                cookie = cookie.map { $0 + "; " + value } ?? value
                continue
            case "via": via = via.map { $0 + ", " + value } ?? value
            case "x-forwarded-for": forwardedFor = forwardedFor.map { $0 + ", " + value } ?? value
            case "x-forwarded-proto": forwardedProto = value
            case "x-forwarded-host": forwardedHost = value
            case "forwarded": forwarded = forwarded.map { $0 + ", " + value } ?? value
            case "authorization" where !forwardAuthorization: continue
            default: break
            }
            if droppedRequestHeaders.contains(lower) || connectionNamed.contains(lower) || removed.contains(lower)
                || (dropUnderscores && lower.utf8.contains(UInt8(ascii: "_")))
                || (!context.peerTrusted && lower.hasPrefix("x-forwarded-"))
            {
                continue
            }
            headers.append((name, value))
        }
        if let cookie, !removed.contains("cookie") { headers.append(("Cookie", cookie)) }
        // gRPC servers want to know the client takes trailers; TE itself is hop-by-hop, so this hop says it again.
        if context.isGRPC { headers.append(("TE", "trailers")) }
        // From a peer outside trusted_proxies, the identity headers it sent are replaced, not extended.
        let peerTrusted = context.peerTrusted
        let peer = context.peerIP
        headers.append(
            ("X-Forwarded-For", peerTrusted && forwardedFor != nil ? "\(forwardedFor ?? ""), \(peer)" : peer))
        let origin = forwardedOrigin(context, proto: forwardedProto, host: forwardedHost)
        headers.append(("X-Forwarded-Proto", origin.proto))
        if let host = origin.host { headers.append(("X-Forwarded-Host", host)) }
        headers.append(("X-Real-IP", context.clientIP))
        let element = forwardedElement(peer: peer, host: context.hostHeader, proto: context.scheme)
        headers.append(("Forwarded", peerTrusted && forwarded != nil ? "\(forwarded ?? ""), \(element)" : element))
        headers.append(("X-Request-ID", context.requestID))
        headers.append(("Via", via.map { $0 + ", 1.1 gatehouse" } ?? "1.1 gatehouse"))
        if let caller = context.caller {
            headers.append(("X-Consumer-ID", caller.id))
            if let issuer = caller.issuer { headers.append(("X-Consumer-Issuer", issuer)) }
        }
        for header in upstream?.requestHeaders.set ?? [] {
            headers.removeAll { $0.name.lowercased() == header.name.lowercased() }
            headers.append((header.name, header.value.value))
        }
        route?.requestEdits?.apply(to: &headers)

        var bodyLength: Int64?
        if let length = head.headers.first(name: "Content-Length").flatMap(Int64.init) {
            bodyLength = length
        } else if head.headers.contains(name: "Transfer-Encoding") {
            bodyLength = -1
        }
        return UpstreamRequest(
            url: url, method: head.method.wireName, headers: headers, bodyLength: bodyLength,
            connectTimeoutMilliseconds: route?.connectTimeoutMilliseconds ?? 1000,
            timeoutMilliseconds: context.timeoutMilliseconds, verifyTLS: upstream?.tls.verify ?? true,
            caFile: upstream?.tls.caFile, httpVersion: upstream.map { httpVersion($0.protocol) } ?? .auto)
    }

    static func httpVersion(_ configured: UpstreamProtocol) -> UpstreamHTTPVersion {
        switch configured {
        case .auto: .auto
        case .http1: .http1
        case .http2: .http2
        }
    }

    /// The X-Forwarded-Proto and X-Forwarded-Host the upstream gets: the client's own values only from a trusted
    /// proxy (`proto` and `host` are the last ones it sent). The cache keys on these too, so an answer built
    /// from them is never served for another origin.
    static func forwardedOrigin(_ context: RequestContext, proto: String?, host: String?) -> (
        proto: String, host: String?
    ) {
        if context.peerTrusted, let host { return (proto ?? context.scheme, host) }
        let own = context.hostHeader.isEmpty ? nil : context.hostHeader
        return (context.peerTrusted ? proto ?? context.scheme : context.scheme, own)
    }

    static func forwardedOrigin(_ context: RequestContext) -> (proto: String, host: String?) {
        let headers = context.head.headers
        return forwardedOrigin(
            context, proto: headers.last(name: "X-Forwarded-Proto"), host: headers.last(name: "X-Forwarded-Host"))
    }

    /// This hop's RFC 7239 element: who connected, to which host, over which scheme (values quoted, as an address
    /// or a host with a port needs).
    static func forwardedElement(peer: String, host: String, proto: String) -> String {
        var element = ""
        element.reserveCapacity(peer.utf8.count + host.utf8.count + proto.utf8.count + 24)
        // (Bytes, not `String.contains(_:)`: with Foundation imported, that is NSString's search.)
        if peer.utf8.contains(UInt8(ascii: ":")) {
            element.append("for=\"[")
            element.append(peer)
            element.append("]\"")
        } else {
            element.append("for=")
            element.append(peer)
        }
        element.append(";proto=")
        element.append(proto)
        if !host.isEmpty {
            element.append(";host=\"")
            element.append(host)
            element.append("\"")
        }
        return element
    }

    /// The query without `name=...` pairs (the API key's query parameter).
    static func stripParameter(_ name: String, from query: Substring) -> Substring {
        guard query.contains(name) else { return query }
        let kept = query.split(separator: "&", omittingEmptySubsequences: false).filter { pair in
            let key = pair.split(separator: "=", maxSplits: 1).first ?? ""
            return key != name
        }
        return Substring(kept.joined(separator: "&"))
    }

    /// Lower-cased header names listed in `Connection` (they are hop-by-hop too).
    static func connectionTokens(_ headers: HTTPHeaders) -> Set<String> {
        var out: Set<String> = []
        for value in headers["Connection"] {
            for token in value.split(separator: ",") { out.insert(token.trimmedSpaces.lowercased()) }
        }
        return out
    }
}

extension HTTPHeaders {
    /// The last value of a field (the one nearest to this hop), without building the list of all of them.
    func last(name: String) -> String? {
        var found: String?
        for (field, value) in self where field.caseInsensitiveEquals(name) { found = value }
        return found
    }
}

/// respond: the one builder of the heads the client gets, for upstream answers, cache hits, direct answers and
/// errors alike. Each adds what is its own, then ``finish(_:status:_:)`` what every answer carries.
enum RespondPhase {
    static let droppedResponseHeaders: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
        "proxy-authenticate", "x-request-id", "cache-status",
    ]

    static func head(for upstream: UpstreamResponseHead, _ context: RequestContext) -> HTTPResponseHead {
        var headers = headers(for: upstream, context)
        return finish(&headers, status: HTTPResponseStatus(statusCode: upstream.status), context)
    }

    /// An upstream answer's own headers as the client gets them, before ``finish(_:status:_:)``: what a cache entry
    /// stores.
    static func headers(for upstream: UpstreamResponseHead, _ context: RequestContext) -> HTTPHeaders {
        var connectionNamed: Set<String> = []
        for (name, value) in upstream.headers where name.caseInsensitiveEquals("Connection") {
            for token in value.split(separator: ",") { connectionNamed.insert(token.trimmedSpaces.lowercased()) }
        }
        var headers = HTTPHeaders()
        headers.reserveCapacity(upstream.headers.count + 3)
        var via: String?
        var length: String?
        var conflictingLengths = false
        var chunked = false
        for (name, value) in upstream.headers {
            let lower = name.lowercased()
            switch lower {
            case "via":
                via = via.map { $0 + ", " + value } ?? value
                continue
            case "content-length":
                if let length, length != value { conflictingLengths = true }
                length = value
                continue
            case "transfer-encoding":
                chunked = true
            default:
                break
            }
            if droppedResponseHeaders.contains(lower) || (!connectionNamed.isEmpty && connectionNamed.contains(lower)) {
                continue
            }
            headers.add(name: name, value: value)
        }
        // libcurl de-chunks the body: with Transfer-Encoding, or with conflicting lengths, no Content-Length
        // is sent on and the body is framed afresh (chunked to an HTTP/1.1 client; to HTTP/1.0 by closing);
        // otherwise the one length passes. An answer to HEAD, a 1xx, 204 or 304 has no body to frame.
        if !chunked, !conflictingLengths, let length, Int(length) != nil {
            headers.add(name: "Content-Length", value: length)
        } else if context.head.method != .HEAD, upstream.status >= 200, upstream.status != 204,
            upstream.status != 304, context.head.version.minor >= 1
        {
            headers.add(name: "Transfer-Encoding", value: "chunked")
        }
        headers.add(name: "Via", value: via.map { $0 + ", 1.1 gatehouse" } ?? "1.1 gatehouse")
        return headers
    }

    /// A stored entry's answer: 304 when the client's own conditional matched it (``CachePolicy/notModified``), 206
    /// with `part` of the body, else the whole response (the caller sends the body unless the status is 204 or 304), before
    /// ``finish(_:status:_:)``. `context.cacheStatus` says how it was found.
    static func headers(
        for entry: CacheEntry, notModified: Bool, part: ClosedRange<Int>?, _ context: RequestContext
    ) -> (HTTPHeaders, HTTPResponseStatus) {
        var headers = HTTPHeaders()
        headers.reserveCapacity(entry.headers.count + 6)
        for (name, value) in entry.headers where !notModified || keptOnNotModified(name) {
            headers.add(name: name, value: value)
        }
        let age = max(0, CacheExchange.seconds(entry.age(now: HTTPDate.nowMilliseconds())))
        headers.add(name: "Age", value: String(age))
        if let part, !notModified {
            let length = entry.body.readableBytes
            headers.add(name: "Content-Range", value: "bytes \(part.lowerBound)-\(part.upperBound)/\(length)")
            headers.add(name: "Content-Length", value: String(part.count))
            return (headers, .partialContent)
        }
        let status = notModified ? 304 : entry.status
        if status != 204, status != 304 { headers.add(name: "Content-Length", value: String(entry.body.readableBytes)) }
        return (headers, HTTPResponseStatus(statusCode: status))
    }

    /// Headers a 304 from the cache carries (RFC 9110 §15.4.5).
    private static func keptOnNotModified(_ name: String) -> Bool {
        switch name.lowercased() {
        case "etag", "cache-control", "content-location", "date", "expires", "vary", "last-modified", "via": true
        default: false
        }
    }

    /// RFC 9213 targeted fields are this cache's instructions, not the client's (unless a CDN in front reads them).
    private static func removeTargetedFields(_ headers: inout HTTPHeaders, _ context: RequestContext) {
        guard let cache = context.route?.config.cache, !cache.forwardTargetedFields else { return }
        for name in cache.targetedFields { headers.remove(name: name) }
    }

    /// An interim answer (103, 102): the upstream's fields as a final answer's are filtered, and the route's
    /// `response_headers` edits.
    static func head(forInterim interim: UpstreamResponseHead, _ context: RequestContext) -> HTTPResponseHead {
        var headers = headers(for: interim, context)
        headers.remove(name: "Content-Length")
        removeTargetedFields(&headers, context)
        context.route?.responseEdits?.apply(to: &headers)
        return HTTPResponseHead(
            version: context.head.version, status: HTTPResponseStatus(statusCode: interim.status), headers: headers)
    }

    /// A `respond` route's answer.
    static func head(for direct: DirectAnswer, _ context: RequestContext) -> HTTPResponseHead {
        var headers = direct.headers
        return finish(&headers, status: direct.status, context)
    }

    /// A problem+json answer of `bodyLength` bytes (``ProblemResponse`` renders the body).
    static func head(for error: GatewayError, bodyLength: Int, _ context: RequestContext) -> HTTPResponseHead {
        var headers = HTTPHeaders()
        headers.reserveCapacity(6 + error.headers.count)
        headers.add(name: "Content-Type", value: "application/problem+json")
        headers.add(name: "Content-Length", value: String(bodyLength))
        for (name, value) in error.headers { headers.add(name: name, value: value) }
        return finish(&headers, status: error.status, context)
    }

    /// A gRPC call's error: trailers-only (HTTP 200, `grpc-status`, `grpc-message`, SPEC §7.2), never a body.
    static func grpcHead(for error: GatewayError, _ context: RequestContext) -> HTTPResponseHead {
        var headers = HTTPHeaders()
        headers.reserveCapacity(5 + error.headers.count)
        headers.add(name: "Content-Type", value: "application/grpc")
        headers.add(name: "grpc-status", value: String(GRPC.status(for: error.status)))
        headers.add(name: "grpc-message", value: GRPC.encodeMessage(error.detail))
        for (name, value) in error.headers { headers.add(name: name, value: value) }
        return finish(&headers, status: .ok, context)
    }

    /// What every answer carries: its request id, the `Cache-Status` of a caching route, the rate limits, the
    /// route's CORS headers and `response_headers`, and `Connection: close` when the connection ends after it.
    static func finish(_ headers: inout HTTPHeaders, status: HTTPResponseStatus, _ context: RequestContext)
        -> HTTPResponseHead
    {
        if let cors = context.route?.cors, !CORSPolicy.isPreflight(context.head) {
            cors.apply(to: &headers, request: context.head.headers)
        }
        removeTargetedFields(&headers, context)
        headers.add(name: "X-Request-ID", value: context.requestID)
        if let cacheStatus = context.cacheStatus {
            headers.add(name: "Cache-Status", value: cacheStatus)
        } else if context.route?.config.cache != nil {
            headers.add(name: "Cache-Status", value: "gatehouse; fwd=bypass")
        }
        for (name, value) in context.rateLimitHeaders { headers.add(name: name, value: value) }
        // The route's edits come last, so they may change what the gateway adds too; framing is not theirs.
        context.route?.responseEdits?.apply(to: &headers)
        // HTTP/2 has no Connection header: a stream ends with its answer.
        if !context.keepAlive, context.head.version.major == 1 { headers.add(name: "Connection", value: "close") }
        return HTTPResponseHead(version: context.head.version, status: status, headers: headers)
    }
}

/// log: one JSON access-log line and the request metrics; runs for every request, errors included.
enum LogPhase {
    static func run(_ context: inout RequestContext, gateway: GatewayCore) {
        let elapsed = Int64(NIODeadline.now().uptimeNanoseconds &- context.startNanoseconds)
        context.route?.metrics.record(status: context.status, nanoseconds: elapsed)
        if context.route == nil { gateway.unroutedMetrics.record(status: context.status, nanoseconds: elapsed) }
        guard let log = gateway.accessLog else { return }
        var line = AccessLogLine()
        line.append("{\"time\":")
        line.appendTimeNow()
        line.append(",\"request_id\":")
        line.appendString(context.requestID)
        line.append(",\"client\":")
        line.appendString(context.clientIP)
        line.append(",\"route\":")
        line.appendString(orNull: context.route?.config.id)
        line.append(",\"method\":")
        line.appendString(context.head.method.wireName)
        line.append(",\"path\":")
        // The path only: a query may carry the API key's query parameter, which is never written down.
        if context.path.isEmpty {
            line.appendString(Self.pathOnly(context.head.uri))
        } else {
            line.appendString(context.path)
        }
        line.append(",\"status\":")
        line.appendInteger(context.status)
        line.append(",\"bytes_in\":")
        line.appendInteger(context.bytesIn)
        line.append(",\"bytes_out\":")
        line.appendInteger(context.bytesOut)
        line.append(",\"duration_ms\":")
        line.appendMilliseconds(microseconds: elapsed / 1000)
        line.append(",\"upstream_ms\":")
        if let upstream = context.upstreamMicroseconds {
            line.appendMilliseconds(microseconds: upstream)
        } else {
            line.append("null")
        }
        line.append(",\"consumer\":")
        line.appendString(orNull: context.caller?.id)
        if let issuer = context.caller?.issuer {
            line.append(",\"consumer_issuer\":")
            line.appendString(issuer)
        }
        line.append(",\"cache\":")
        line.appendString(orNull: context.cacheStatus)
        if let error = context.error {
            line.append(",\"error\":")
            line.appendString(error.origin.rawValue + ": " + error.detail)
        }
        line.append("}")
        log.write(line)
    }

    /// A request target without its query (or fragment).
    static func pathOnly(_ uri: String) -> Substring {
        let target = Substring(uri)
        return target.firstIndex(where: { $0 == "?" || $0 == "#" }).map { target[..<$0] } ?? target
    }
}
