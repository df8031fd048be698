import GatehouseConfig
import NIOHTTP1

/// Why a response was not stored: the `detail` of `Cache-Status` and the label of the skipped-stores metric.
enum CacheSkip: String, Error, Sendable, CaseIterable {
    case noStore = "no-store"
    case privateResponse = "private"
    case setCookie = "set-cookie"
    case authorization
    case status
    case varyAll = "vary-star"
    /// `Vary` names a header the gateway sets or removes, whose forwarded value the key cannot see.
    case varyGateway = "vary-gateway-header"
    case notReusable = "not-reusable"
    case tooLarge = "too-large"
    case incomplete

    /// Whether the reason lies in the resource's responses rather than in one request or one failure: such a
    /// key skips coalescing for a while (its next responses will most likely not be storable either).
    func startsPass(status: Int) -> Bool {
        switch self {
        case .noStore, .privateResponse, .setCookie, .varyAll, .varyGateway, .notReusable, .tooLarge: true
        case .status: status < 500 && status != 304
        case .authorization, .incomplete: false
        }
    }
}

/// RFC 9111 for a shared cache: whether a response may be stored, and for how long it is fresh.
enum CachePolicy {
    /// Statuses that may be stored with heuristic freshness (the route's `ttl`), RFC 9110 §15.1.
    static let heuristicallyCacheable: Set<Int> = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]
    /// Statuses this cache stores when the origin gives explicit freshness.
    static let understood: Set<Int> = heuristicallyCacheable.union([302, 307])

    /// What the request contributes to the decision.
    struct RequestFacts {
        /// `Authorization` or an API key was sent.
        var authenticated: Bool
        /// The entry is keyed by the consumer, so it is never shared with another caller.
        var keyedPerConsumer: Bool
        var noStore: Bool
        /// The request's values of the headers a `Vary` names.
        var headers: HTTPHeaders
        /// Lower-cased names of the request headers the gateway sets, replaces or removes on the way upstream.
        var gatewayHeaders: Set<String> = []
        /// When the request was sent upstream.
        var requestTime: Int64
    }

    /// What is stored for a response that may be.
    struct Storable {
        var freshness: CacheEntry.Freshness
        var initialAge: Int64
        var vary: [(name: String, value: String)]
    }

    static func evaluate(
        status: Int, headers: [(name: String, value: String)], request: RequestFacts, responseTime: Int64,
        route: RouteCache
    ) -> Result<Storable, CacheSkip> {
        let control = CacheControl(values(of: "Cache-Control", in: headers))
        if control.noStore || request.noStore { return .failure(.noStore) }
        if control.isPrivate { return .failure(.privateResponse) }
        if !route.storeSetCookie, headers.contains(where: { $0.name.caseInsensitiveEquals("Set-Cookie") }) {
            return .failure(.setCookie)
        }
        if request.authenticated, !request.keyedPerConsumer {
            // RFC 9111 §3.5: shared only when the response says it may be.
            let allowed = route.shared && (control.isPublic || control.sharedMaxAge != nil || control.mustRevalidate)
            if !allowed { return .failure(.authorization) }
        }
        guard understood.contains(status) else { return .failure(.status) }

        var varyNames: [String] = []
        for value in values(of: "Vary", in: headers) {
            for token in value.split(separator: ",") {
                let name = token.trimmedSpaces.lowercased()
                if name == "*" { return .failure(.varyAll) }
                if request.gatewayHeaders.contains(name) { return .failure(.varyGateway) }
                if !name.isEmpty, !varyNames.contains(name) { varyNames.append(name) }
            }
        }
        varyNames.sort()

        let date = header("Date", in: headers).flatMap(HTTPDate.parse).map { $0 * 1000 }
        // max_ttl caps the freshness the origin gives; the route's ttl, for answers that give none, stands as set.
        var lifetime: Int64
        if let seconds = control.sharedMaxAge ?? control.maxAge {
            lifetime = min(seconds * 1000, route.maxTTL.milliseconds)
        } else if let expires = header("Expires", in: headers) {
            // An invalid Expires, such as "0", means already expired.
            lifetime = min(
                HTTPDate.parse(expires).map { $0 * 1000 - (date ?? responseTime) } ?? 0, route.maxTTL.milliseconds)
        } else if heuristicallyCacheable.contains(status) {
            lifetime = route.ttl.milliseconds
        } else {
            return .failure(.status)
        }
        lifetime = max(0, lifetime)

        let ageValue =
            (header("Age", in: headers).flatMap { CacheControl.deltaSeconds(Substring($0).trimmedSpaces) } ?? 0) * 1000
        // Date has whole seconds: compared with the response time's second, so a response is not up to 999 ms
        // old the moment it arrives.
        let apparentAge = max(0, responseTime / 1000 * 1000 - (date ?? responseTime))
        let correctedAge = ageValue + max(0, responseTime - request.requestTime)
        // The route's stale windows apply unless the origin forbids stale use: must-revalidate, or s-maxage, which
        // carries proxy-revalidate (RFC 9111 §5.2.2.10). The origin's own windows are capped at max_ttl or the
        // route's window, whichever is larger, so storage stays bounded.
        let routeDefaults = !control.mustRevalidate && control.sharedMaxAge == nil
        func window(_ origin: Int64?, _ route: ConfigDuration, cap: Int64) -> Int64 {
            if control.mustRevalidate { return 0 }
            if let origin { return min(origin * 1000, cap) }
            return routeDefaults ? route.milliseconds : 0
        }
        let freshness = CacheEntry.Freshness(
            lifetime: lifetime,
            staleWhileRevalidate: window(
                control.staleWhileRevalidate, route.staleWhileRevalidate,
                cap: max(route.maxTTL.milliseconds, route.staleWhileRevalidate.milliseconds)),
            staleIfError: window(
                control.staleIfError, route.staleIfError,
                cap: max(route.maxTTL.milliseconds, route.staleIfError.milliseconds)),
            noCache: control.noCache, mustRevalidate: control.mustRevalidate)
        // An entry that can never be used without a full download is not worth storing.
        let usableWithoutOrigin =
            !control.noCache
            && (lifetime > 0 || freshness.staleWhileRevalidate > 0 || freshness.staleIfError > 0)
        let hasValidator = headers.contains {
            $0.name.caseInsensitiveEquals("ETag") || $0.name.caseInsensitiveEquals("Last-Modified")
        }
        if !usableWithoutOrigin, !hasValidator { return .failure(.notReusable) }
        let vary = varyNames.map { name in (name, request.headers[name].joined(separator: ", ")) }
        return .success(Storable(freshness: freshness, initialAge: max(apparentAge, correctedAge), vary: vary))
    }

    /// Request headers that keep a response out of the cache or change how stored ones may be used.
    static func requestControl(_ headers: HTTPHeaders) -> CacheControl {
        var control = CacheControl(headers["Cache-Control"])
        if !headers.contains(name: "Cache-Control"),
            headers["Pragma"].contains(where: { $0.lowercased().contains("no-cache") })
        {
            control.noCache = true
        }
        return control
    }

    /// Whether a client's conditional request is satisfied by an entry, so 304 can be answered (RFC 9110 §13.2.2).
    static func notModified(_ request: HTTPHeaders, entry: CacheEntry) -> Bool {
        guard entry.status == 200 else { return false }
        let matches = request["If-None-Match"]
        if !matches.isEmpty {
            guard let etag = entry.etag else { return false }
            let stored = weak(etag)
            for value in matches {
                for tag in value.split(separator: ",") {
                    let candidate = tag.trimmedSpaces
                    if candidate == "*" || weak(String(candidate)) == stored { return true }
                }
            }
            return false
        }
        guard let since = request.first(name: "If-Modified-Since").flatMap(HTTPDate.parse),
            let modified = entry.lastModified.flatMap(HTTPDate.parse)
        else { return false }
        return modified <= since
    }

    /// An entity tag without its weakness prefix, for weak comparison.
    private static func weak(_ tag: String) -> String { tag.hasPrefix("W/") ? String(tag.dropFirst(2)) : tag }

    static func header(_ name: String, in headers: [(name: String, value: String)]) -> String? {
        headers.first { $0.name.caseInsensitiveEquals(name) }?.value
    }

    static func values(of name: String, in headers: [(name: String, value: String)]) -> [String] {
        headers.compactMap { $0.name.caseInsensitiveEquals(name) ? $0.value : nil }
    }
}
