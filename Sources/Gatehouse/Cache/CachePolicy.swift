import GatehouseConfig
import NIOCore
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
    /// Statuses that may be stored without explicit freshness (RFC 9110 §15.1), as may any with `public`; any other
    /// final status may be stored when the response gives explicit freshness (`max-age`, `s-maxage`, `Expires`).
    static let heuristicallyCacheable: Set<Int> = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]
    /// Statuses whose caching semantics this cache knows, for `must-understand`.
    static let understood = heuristicallyCacheable.union([302, 303, 307, 400, 403, 500, 502, 503, 504])

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

    /// The directives this cache follows for a response: those of the route's first targeted field the response
    /// carries with a valid value (RFC 9213), else `Cache-Control`. `targeted` says which.
    static func responseControl(_ headers: [(name: String, value: String)], route: RouteCache) -> (
        control: CacheControl, targeted: Bool
    ) {
        for field in route.targetedFields {
            let lines = values(of: field, in: headers)
            if !lines.isEmpty, let control = CacheControl(targeted: lines.joined(separator: ", ")) {
                return (control, true)
            }
        }
        return (CacheControl(values(of: "Cache-Control", in: headers)), false)
    }

    static func evaluate(
        status: Int, headers: [(name: String, value: String)], request: RequestFacts, responseTime: Int64,
        route: RouteCache
    ) -> Result<Storable, CacheSkip> {
        let (control, targeted) = responseControl(headers, route: route)
        if control.mustUnderstand {
            // RFC 9111 §5.2.2.3: a status this cache knows the meaning of is stored despite no-store; another never.
            guard understood.contains(status) else { return .failure(.status) }
            if request.noStore { return .failure(.noStore) }
        } else if control.noStore || request.noStore {
            return .failure(.noStore)
        }
        if control.isPrivate { return .failure(.privateResponse) }
        if !route.storeSetCookie, headers.contains(where: { $0.name.caseInsensitiveEquals("Set-Cookie") }) {
            return .failure(.setCookie)
        }
        if request.authenticated, !request.keyedPerConsumer {
            // RFC 9111 §3.5: shared only when the response says it may be.
            let allowed = route.shared && (control.isPublic || control.sharedMaxAge != nil || control.mustRevalidate)
            if !allowed { return .failure(.authorization) }
        }
        // Final answers only; a 206 is a part and a 304 has no body of its own: neither is stored whole.
        guard (200...599).contains(status), status != 206, status != 304 else { return .failure(.status) }

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
        guard
            let lifetime = lifetime(
                status: status, control: control, targeted: targeted, headers: headers,
                date: date ?? responseTime, route: route)
        else { return .failure(.status) }

        let ageValue = (CacheControl.age(values(of: "Age", in: headers)) ?? 0) * 1000
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
            noCache: control.noCache, mustRevalidate: control.mustRevalidate,
            sharedMaxAge: control.sharedMaxAge != nil)
        // An entry that can never be used without a full download is not worth storing.
        let usableWithoutOrigin =
            !control.noCache
            && (lifetime > 0 || freshness.staleWhileRevalidate > 0 || freshness.staleIfError > 0)
        let hasValidator = headers.contains {
            $0.name.caseInsensitiveEquals("ETag") || $0.name.caseInsensitiveEquals("Last-Modified")
        }
        if !usableWithoutOrigin, !hasValidator { return .failure(.notReusable) }
        let vary = varyNames.map { name in (name, CacheKey.headerValue(request.headers, name)) }
        return .success(Storable(freshness: freshness, initialAge: max(apparentAge, correctedAge), vary: vary))
    }

    /// The freshness lifetime in milliseconds (RFC 9111 §4.2.1), capped by `max_ttl`: `s-maxage`, `max-age`,
    /// `Expires` (ignored under a targeted field; invalid or repeated means expired), else heuristic: a share of
    /// the time since `Last-Modified`, else the route's `ttl`. Nil when the status may not be stored without
    /// explicit freshness.
    private static func lifetime(
        status: Int, control: CacheControl, targeted: Bool, headers: [(name: String, value: String)], date: Int64,
        route: RouteCache
    ) -> Int64? {
        let cap = route.maxTTL.milliseconds
        if let seconds = control.sharedMaxAge ?? control.maxAge { return min(seconds * 1000, cap) }
        if !targeted {
            let expires = values(of: "Expires", in: headers)
            if !expires.isEmpty {
                guard expires.count == 1, let time = HTTPDate.parse(expires[0]) else { return 0 }
                return max(0, min(time * 1000 - date, cap))
            }
        }
        guard heuristicallyCacheable.contains(status) || control.isPublic else { return nil }
        if route.lastModifiedFactor > 0, let modified = header("Last-Modified", in: headers).flatMap(HTTPDate.parse) {
            let since = max(0, date - modified * 1000)
            return min(Int64(Double(since) * route.lastModifiedFactor), cap)
        }
        return route.ttl.milliseconds
    }

    /// The request's cache directives; `Pragma: no-cache` counts as `no-cache` when there is no `Cache-Control`.
    static func requestControl(_ headers: HTTPHeaders) -> CacheControl {
        var control = CacheControl(headers["Cache-Control"])
        if !headers.contains(name: "Cache-Control"),
            headers["Pragma"].contains(where: { $0.lowercased().contains("no-cache") })
        {
            control.noCache = true
        }
        return control
    }

    /// Whether a client's conditional request is satisfied by an entry, so 304 can be answered (RFC 9110 §13.2.2):
    /// `If-None-Match` by weak comparison, else `If-Modified-Since`.
    static func notModified(_ request: HTTPHeaders, entry: CacheEntry) -> Bool {
        guard entry.status == 200 else { return false }
        let matches = request["If-None-Match"]
        if !matches.isEmpty {
            // `*` matches any stored response, with an entity tag or without.
            let lists = matches.map(EntityTag.list)
            if lists.contains(where: { $0 == nil }) { return true }
            guard let stored = entry.etag.map({ EntityTag(Substring($0)) }) else { return false }
            return lists.contains { $0?.contains { $0.weaklyMatches(stored) } == true }
        }
        // Without Last-Modified, the response's Date, else when it was received (RFC 9111 §4.3.2).
        guard let since = request.first(name: "If-Modified-Since").flatMap(HTTPDate.parse),
            let modified = entry.lastModified.flatMap(HTTPDate.parse) ?? entry.header("Date").flatMap(HTTPDate.parse)
                ?? Optional(entry.responseTime / 1000)
        else { return false }
        return modified <= since
    }

    /// The part of a stored complete response a `Range` request gets (RFC 9110 §14.2, §13.1.5): nil for the whole
    /// response (no or an unusable `Range`, a failed `If-Range`, a status other than 200).
    static func range(_ request: HTTPRequestHead, entry: CacheEntry) -> RangeAnswer? {
        guard request.method == .GET, entry.status == 200, let value = request.headers.first(name: "Range"),
            let range = ByteRange(value)
        else { return nil }
        if let condition = request.headers.first(name: "If-Range").map({ $0.trimmedSpaces }) {
            if condition.hasPrefix("\"") || condition.hasPrefix("W/") {
                guard let etag = entry.etag, EntityTag(condition).stronglyMatches(EntityTag(Substring(etag))) else {
                    return nil
                }
            } else {
                // A date validates only as the exact Last-Modified of the stored response, and only when that is
                // strong: at least a second before the response's Date (RFC 9110 §13.1.5, §8.8.2.2).
                guard let modified = entry.lastModified.flatMap(HTTPDate.parse),
                    HTTPDate.parse(String(condition)) == modified,
                    let date = entry.header("Date").flatMap(HTTPDate.parse), modified <= date - 1
                else { return nil }
            }
        }
        let length = entry.body.readableBytes
        guard let bounds = range.bounds(length: length) else { return .unsatisfiable(length: length) }
        return .part(bounds)
    }

    /// What a `Range` request gets from a stored response.
    enum RangeAnswer: Equatable {
        /// 206 with these bytes.
        case part(ClosedRange<Int>)
        /// 416: no byte of the range exists.
        case unsatisfiable(length: Int)
    }

    static func header(_ name: String, in headers: [(name: String, value: String)]) -> String? {
        headers.first { $0.name.caseInsensitiveEquals(name) }?.value
    }

    static func values(of name: String, in headers: [(name: String, value: String)]) -> [String] {
        headers.compactMap { $0.name.caseInsensitiveEquals(name) ? $0.value : nil }
    }
}
