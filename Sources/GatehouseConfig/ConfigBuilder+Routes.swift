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
                    "respond", "forward_authorization", "websocket", "allow_ips", "deny_ips", "cors",
                    "request_headers", "response_headers", "compression",
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
                f.fail("auth_methods", "expected api_key, jwt or client_cert, found \"\(name)\"")
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
        route.allowIPs = networks(f, "allow_ips")
        route.denyIPs = networks(f, "deny_ips")
        if let node = f["cors"] { route.cors = cors(node, f.path("cors")) }
        if let node = f["request_headers"] {
            route.requestHeaders = headerTransform(node, f.path("request_headers"))
        }
        if let node = f["response_headers"] {
            route.responseHeaders = headerTransform(node, f.path("response_headers"))
        }
        if let node = f["compression"] { route.compression = compression(node, f.path("compression")) }
        return route
    }

    /// A list of addresses and CIDR networks.
    func networks(_ f: Fields, _ key: String) -> [CIDR] {
        (f.strings(key) ?? []).enumerated().compactMap { index, text in
            if let cidr = CIDR.parse(text) { return cidr }
            reader.fail(f[key], "\(f.path(key))[\(index)]", "expected an address or CIDR, found \"\(text)\"")
            return nil
        }
    }

    func cors(_ node: Node, _ path: String) -> CORSConfig? {
        guard
            let f = reader.fields(
                node, path,
                allowed: [
                    "allow_origins", "allow_methods", "allow_headers", "expose_headers", "allow_credentials", "max_age",
                ])
        else { return nil }
        var cors = CORSConfig()
        if let origins = f.strings("allow_origins") {
            for origin in origins where origin != "*" && (origin.contains("*") || !origin.contains("://")) {
                f.fail("allow_origins", "expected \"*\" or scheme://host[:port], found \"\(origin)\"")
            }
            if origins.contains("*"), origins.count > 1 {
                f.fail("allow_origins", "\"*\" stands alone: it already allows every origin")
            }
            cors.allowOrigins = origins.map { $0.lowercased() }
        } else {
            reader.fail(node, f.path("allow_origins"), "required: the origins that may call the route")
        }
        if let methods = f.strings("allow_methods") {
            for method in methods where !Self.isToken(method) {
                f.fail("allow_methods", "\"\(method)\" is not a method name")
            }
            cors.allowMethods = methods.map { $0.uppercased() }
        }
        for key in ["allow_headers", "expose_headers"] {
            for name in f.strings(key) ?? [] where !Self.isToken(name) {
                f.fail(key, "\"\(name)\" is not a header name")
            }
        }
        cors.allowHeaders = f.strings("allow_headers") ?? []
        cors.exposeHeaders = f.strings("expose_headers") ?? []
        if let v = f.bool("allow_credentials") { cors.allowCredentials = v }
        cors.maxAge = f.duration("max_age")
        if cors.allowCredentials, cors.allowOrigins == ["*"] {
            f.fail(
                "allow_credentials",
                "allow_origins [\"*\"] with allow_credentials: true is refused by browsers (Fetch standard); "
                    + "name the origins")
        }
        return cors
    }

    func headerTransform(_ node: Node, _ path: String) -> HeaderTransform {
        var transform = HeaderTransform()
        guard let f = reader.fields(node, path, allowed: ["set", "add", "remove"]) else { return transform }
        if let set = f["set"] { transform.set = headerValues(set, f.path("set")) }
        if let add = f["add"] { transform.add = headerValues(add, f.path("add")) }
        transform.remove = (f.strings("remove") ?? []).map { $0.lowercased() }
        for name in transform.remove where !Self.isToken(name) { f.fail("remove", "\"\(name)\" is not a header name") }
        return transform
    }

    func compression(_ node: Node, _ path: String) -> CompressionConfig? {
        guard let f = reader.fields(node, path, allowed: ["min_bytes", "types"]) else { return nil }
        var compression = CompressionConfig()
        if let v = f.size("min_bytes") { compression.minBytes = v }
        if let types = f.strings("types") {
            for type in types where type.split(separator: "/").count != 2 || type.hasPrefix("*") {
                f.fail("types", "expected a media type such as application/json or text/*, found \"\(type)\"")
            }
            compression.types = types.map { $0.lowercased() }
        }
        return compression
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
                    "max_object_bytes", "store_set_cookie", "local_ttl", "lock_timeout", "last_modified_factor",
                    "targeted_fields", "forward_targeted_fields",
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
        if let node = f["last_modified_factor"],
            let v = reader.double(node, f.path("last_modified_factor"), min: 0, max: 1)
        {
            cache.lastModifiedFactor = v
        }
        if let v = f.strings("targeted_fields") {
            for name in v where !Self.isToken(name) { f.fail("targeted_fields", "\"\(name)\" is not a header name") }
            let reserved = ["cache-control", "expires", "age", "vary", "pragma"]
            if let name = v.first(where: { reserved.contains($0.lowercased()) }) {
                f.fail("targeted_fields", "\"\(name)\" is not a targeted field (RFC 9213): it is read as itself")
            }
            cache.targetedFields = v
        }
        if let v = f.bool("forward_targeted_fields") { cache.forwardTargetedFields = v }
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
