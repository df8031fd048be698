import GatehouseConfig
import Testing

@testable import Gatehouse

/// Route choice (SPEC §2), path normalisation and rewrites.
@Suite struct RoutingTests {
    func table(_ routes: String) throws -> (RouteTable, [RouteConfig]) {
        let yaml = """
            upstreams:
              u: { targets: [{ url: "http://127.0.0.1:1" }] }
            routes:
            \(routes)
            """
        let config = try ConfigLoader.parse(yaml: yaml, environment: [:])
        return (RouteTable(config.routes), config.routes)
    }

    func routeID(_ t: (RouteTable, [RouteConfig]), _ path: String, host: String = "x", method: String = "GET")
        -> String?
    {
        guard let normalised = PathNormalizer.normalize(Substring(path)) else { return "malformed" }
        if case .found(let index, _) = t.0.match(host: host, path: normalised, method: method) { return t.1[index].id }
        return nil
    }

    @Test func exactBeatsTemplateBeatsLongestPrefix() throws {
        let t = try table(
            """
              - { id: prefix-short, match: { path_prefix: "/v1/" }, upstream: u }
              - { id: prefix-long, match: { path_prefix: "/v1/users/" }, upstream: u }
              - { id: template, match: { path: "/v1/users/{id}" }, upstream: u }
              - { id: exact, match: { path: "/v1/users/me" }, upstream: u }
              - { id: template-deep, match: { path: "/v1/users/{id}/posts/{post}" }, upstream: u }
            """)
        #expect(routeID(t, "/v1/users/me") == "exact")
        #expect(routeID(t, "/v1/users/42") == "template")
        #expect(routeID(t, "/v1/users/42/posts/9") == "template-deep")
        #expect(routeID(t, "/v1/users/42/other") == "prefix-long")
        #expect(routeID(t, "/v1/orders") == "prefix-short")
        #expect(routeID(t, "/v2") == nil)
    }

    @Test func tiesGoToTheFirstInTheFile() throws {
        let t = try table(
            """
              - { id: first, match: { path: "/a/{x}" }, upstream: u }
              - { id: second, match: { path: "/a/{y}" }, upstream: u }
              - { id: p1, match: { path_prefix: "/b" }, upstream: u }
              - { id: p2, match: { path_prefix: "/b" }, upstream: u }
            """)
        #expect(routeID(t, "/a/1") == "first")
        let templates = try table(
            """
              - { id: general, match: { path: "/a/{x}/c" }, upstream: u }
              - { id: specific, match: { path: "/a/b/{y}" }, upstream: u }
            """)
        #expect(routeID(templates, "/a/b/c") == "general")
        #expect(routeID(templates, "/a/b/d") == "specific")
        #expect(routeID(t, "/b/c") == "p1")
    }

    @Test func hostsFromSpecificToAny() throws {
        let t = try table(
            """
              - { id: any, match: { path_prefix: "/" }, upstream: u }
              - { id: wild, match: { host: "*.example.com", path_prefix: "/" }, upstream: u }
              - { id: deep-wild, match: { host: "*.eu.example.com", path_prefix: "/" }, upstream: u }
              - { id: api, match: { host: "api.example.com", path_prefix: "/" }, upstream: u }
              - { id: api-users, match: { host: "api.example.com", path: "/users" }, upstream: u }
            """)
        #expect(routeID(t, "/users", host: "api.example.com") == "api-users")
        #expect(routeID(t, "/x", host: "api.example.com") == "api")
        #expect(routeID(t, "/x", host: "shop.example.com") == "wild")
        #expect(routeID(t, "/x", host: "a.eu.example.com") == "deep-wild")
        #expect(routeID(t, "/x", host: "example.com") == "any")
        #expect(routeID(t, "/x", host: "evil-example.com") == "any")
    }

    @Test func methodsGive405WithAllowOrFallThrough() throws {
        let t = try table(
            """
              - { id: read, match: { path: "/items/{id}", methods: [GET] }, upstream: u }
              - { id: write, match: { path: "/items/{id}", methods: [PUT, DELETE] }, upstream: u }
              - { id: only-post, match: { path: "/orders", methods: [POST] }, upstream: u }
            """)
        #expect(routeID(t, "/items/1", method: "PUT") == "write")
        #expect(routeID(t, "/items/1", method: "HEAD") == "read")
        guard case .methodNotAllowed(let allow) = t.0.match(host: "x", path: "/orders", method: "GET") else {
            Issue.record("expected 405")
            return
        }
        #expect(allow == ["POST"])
    }

    @Test func parametersAreBound() throws {
        let t = try table("  - { id: t, match: { path: \"/u/{user}/p/{post}\" }, upstream: u }")
        guard case .found(_, let parameters) = t.0.match(host: "x", path: "/u/ann/p/7", method: "GET") else {
            Issue.record("expected a match")
            return
        }
        #expect(parameters.map(\.name) == ["user", "post"])
        #expect(parameters.map { String($0.value) } == ["ann", "7"])
    }

    @Test(arguments: [
        ("/a/b", "/a/b"), ("/a//b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/../../etc", "/etc"),
        ("/a/%2e%2e/b", "/b"), ("/a/%2E%2e/b", "/b"), ("/%7euser", "/~user"), ("/a%2fb", "/a%2Fb"), ("/a%2Fb/..", "/"),
        ("/a/b/", "/a/b/"), ("/a/b/.", "/a/b/"), ("/", "/"), ("/a%20b", "/a%20b"), ("/%41", "/A"),
    ])
    func normalisation(input: String, expected: String) {
        #expect(PathNormalizer.normalize(Substring(input)) == expected)
    }

    @Test func malformedPathsAreRejected() {
        #expect(PathNormalizer.normalize("/a%zz") == nil)
        #expect(PathNormalizer.normalize("/a%2") == nil)
        #expect(PathNormalizer.normalize("a/b") == nil)
    }

    @Test func traversalNeverReachesAnotherRoute() throws {
        let t = try table(
            """
              - { id: public, match: { path_prefix: "/v1/" }, upstream: u }
              - { id: admin, match: { path_prefix: "/admin/" }, upstream: u }
            """)
        for attack in ["/v1/../admin/x", "/v1/%2e%2e/admin/x", "/v1/%2E%2E/admin/x"] {
            let id = routeID(t, attack)
            let normalised = PathNormalizer.normalize(Substring(attack)) ?? ""
            // Whatever matched, it is the route the normalised path names, never a bypass.
            #expect(id == (normalised.hasPrefix("/admin/") ? "admin" : "public"), "\(attack) -> \(normalised)")
        }
        // Encoded slashes that an upstream might decode into a dot-segment are refused outright (400).
        for attack in ["/v1/..%2fadmin/x", "/v1/..%2F..%2Fadmin", "/v1/..%5Cadmin", "/v1/..\\admin", "/v1/.%2Fx"] {
            #expect(PathNormalizer.normalize(Substring(attack)) == nil, "\(attack)")
        }
        #expect(routeID(t, "/v1/group%2Fproject") == "public")
    }

    @Test func rewrites() {
        let strip = RouteRewrite(stripPrefix: "/v1", addPrefix: "/internal", path: nil)
        #expect(PathRewrite.apply(strip, to: "/v1/users/7", parameters: []) == "/internal/users/7")
        #expect(PathRewrite.apply(strip, to: "/v1", parameters: []) == "/internal/")
        #expect(PathRewrite.apply(strip, to: "/v10/x", parameters: []) == "/internal/v10/x")
        let template = RouteRewrite(stripPrefix: nil, addPrefix: nil, path: "/users/{id}/profile")
        #expect(PathRewrite.apply(template, to: "/v1/u/9", parameters: [("id", "9")]) == "/users/9/profile")
        #expect(PathRewrite.apply(nil, to: "/same", parameters: []) == "/same")
    }
}
