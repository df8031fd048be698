import Foundation
import GatehouseConfig
import NIOHTTP1

/// RFC 9111 §4.4: what a successful unsafe request removes from the cache: the stored responses of its own path,
/// and those of the `Location` and `Content-Location` it got back when they name the same origin.
enum CacheInvalidation {
    /// Whether a request invalidates once it succeeds: every method but the safe GET, HEAD, OPTIONS and TRACE,
    /// unknown ones included; a gRPC call is not a write to a cached resource.
    static func applies(to context: RequestContext) -> Bool {
        guard !context.isGRPC else { return false }
        switch context.head.method {
        case .GET, .HEAD, .OPTIONS, .TRACE: return false
        default: return true
        }
    }

    /// The caching routes and paths to purge, given the response's header fields; each pair once.
    static func targets(
        _ context: RequestContext, response: [(name: String, value: String)], runtime: Runtime
    ) -> [(route: String, path: String)] {
        var paths = [context.path]
        // Each is a single-value field: its first line counts, however many the upstream sends.
        for name in ["Location", "Content-Location"] {
            if let value = response.first(where: { $0.name.caseInsensitiveEquals(name) })?.value,
                let path = sameOriginPath(value, context), !paths.contains(path)
            {
                paths.append(path)
            }
        }
        return paths.compactMap { path in
            guard case .found(let index, _) = runtime.table.match(host: context.host, path: path, method: "GET"),
                runtime.routes[index].config.cache != nil
            else { return nil }
            return (runtime.routes[index].config.id, path)
        }
    }

    /// The normalised path a URI reference names on the request's own origin (scheme and authority as the client
    /// used them); nil for another origin or a reference that is not a path.
    static func sameOriginPath(_ reference: String, _ context: RequestContext) -> String? {
        var rest = Substring(reference.trimmedSpaces)
        if let end = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) { rest = rest[..<end] }
        let origin = ForwardPhase.forwardedOrigin(context)
        let scheme = origin.proto.lowercased()
        // `host:80` for http and `host:443` for https name the same origin as `host`.
        func withoutDefaultPort(_ authority: Substring) -> Substring {
            let port = scheme == "https" ? ":443" : ":80"
            return authority.hasSuffix(port) ? authority.dropLast(port.count) : authority
        }
        let authority = withoutDefaultPort(Substring((origin.host ?? context.hostHeader).lowercased()))
        if let schemeEnd = rest.range(of: "://") {
            guard rest[..<schemeEnd.lowerBound].lowercased() == scheme else { return nil }
            rest = rest[schemeEnd.upperBound...]
        } else if rest.hasPrefix("//") {
            rest = rest.dropFirst(2)
        } else if rest.hasPrefix("/") {
            return PathNormalizer.normalize(rest)
        } else {
            // Relative to the request's path: its last segment is replaced. A colon in the first segment makes it
            // another scheme (`mailto:x`).
            guard !rest.prefix(while: { $0 != "/" }).contains(":") else { return nil }
            let base = context.path[...(context.path.lastIndex(of: "/") ?? context.path.startIndex)]
            return PathNormalizer.normalize(Substring(base + rest))
        }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        guard withoutDefaultPort(Substring(rest[..<slash].lowercased())) == authority else { return nil }
        return PathNormalizer.normalize(slash < rest.endIndex ? rest[slash...] : "/")
    }
}
