import Foundation
import Yams

/// `routes`.
extension ConfigBuilder {
    func route(
        _ node: Node, _ path: String, upstreams: Set<String>, policies: Set<String>, auth: AuthConfig
    ) -> RouteConfig? {
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "id", "match", "upstream", "rewrite", "auth", "auth_methods", "rate_limit", "cache", "timeout",
                    "respond", "forward_authorization", "websocket",
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
        if let v = f.bool("websocket") {
            route.websocket = v
            if v, route.upstream == nil { f.fail("websocket", "a WebSocket route needs an upstream to tunnel to") }
        }
        return route
    }

    func routeMatch(_ node: Node, _ path: String) -> RouteMatch? {
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

    func cache(_ node: Node, _ path: String) -> RouteCache? {
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

    func respond(_ node: Node, _ path: String) -> DirectResponse? {
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
