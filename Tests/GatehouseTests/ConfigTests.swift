import Foundation
import GatehouseConfig
import Testing

/// Config loading: every kind of error names file, line and key path; `${ENV}`, durations and sizes.
@Suite struct ConfigTests {
    static let minimal = """
        upstreams:
          users:
            targets: [{ url: "http://127.0.0.1:9001" }]
        routes:
          - id: users
            match: { path: "/v1/users/{id}" }
            upstream: users
        """

    func errors(_ yaml: String, environment: [String: String] = [:]) -> [String] {
        do {
            _ = try ConfigLoader.parse(yaml: yaml, file: "g.yaml", environment: environment)
            return []
        } catch let errors as ConfigErrors {
            return errors.issues.map(\.description)
        } catch {
            return ["unexpected \(error)"]
        }
    }

    @Test func minimalConfigLoadsWithDefaults() throws {
        let config = try ConfigLoader.parse(yaml: Self.minimal, environment: [:])
        #expect(config.server.listen.port == 8080)
        #expect(config.server.limits.maxBodyBytes == 10 * 1024 * 1024)
        #expect(config.server.limits.headerTimeout.milliseconds == 10_000)
        #expect(config.routes[0].upstream == "users")
        #expect(config.upstreams[0].timeout.milliseconds == 30_000)
    }

    @Test func theShippedConfigsAreValid() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        // Relative paths inside the configs (jwks_file) resolve against the package root, where `swift test` runs.
        _ = try ConfigLoader.load(path: root.appendingPathComponent("config/gatehouse.yaml").path, environment: [:])
        let reference = try ConfigLoader.load(
            path: root.appendingPathComponent("config/examples/reference.yaml").path,
            environment: ["GATEHOUSE_ADMIN_TOKEN": "t", "JWT_SECRET": "s", "PARTNER_TOKEN": "p"])
        #expect(reference.upstreams[0].requestHeaders.set[0].value.value == "Bearer p")
        let thirdParty = try ConfigLoader.load(
            path: root.appendingPathComponent("config/examples/third-party.yaml").path,
            environment: ["PARTNER_CLIENT_SECRET": "s", "MAPS_API_KEY": "k"])
        #expect(thirdParty.upstream(named: "partner")?.oauth2?.clientSecret.value == "s")
        #expect(thirdParty.upstream(named: "orders")?.passiveHealth.failures == 3)
        let streams = try ConfigLoader.load(
            path: root.appendingPathComponent("config/examples/grpc-websocket.yaml").path, environment: [:])
        #expect(streams.upstream(named: "search")?.protocol == .http2)
        #expect(streams.routes.first { $0.id == "chat" }?.websocket == true)
        #expect(streams.server.limits.websocketIdleTimeout.milliseconds == 120_000)
        let caching = try ConfigLoader.load(
            path: root.appendingPathComponent("config/examples/caching.yaml").path, environment: [:])
        #expect(caching.routes.first { $0.id == "products" }?.cache?.lastModifiedFactor == 0.1)
        #expect(reference.routes.first?.cache?.targetedFields == ["CDN-Cache-Control"])
    }

    @Test func cacheKeysAreChecked() {
        func cache(_ keys: String) -> [String] {
            errors(Self.minimal + "\n    cache: { \(keys) }")
        }
        #expect(cache("last_modified_factor: 2").contains { $0.contains("routes[0].cache.last_modified_factor") })
        #expect(cache("targeted_fields: [Cache-Control]").contains { $0.contains("routes[0].cache.targeted_fields") })
        #expect(cache("targeted_fields: [\"Bad Name\"]").contains { $0.contains("not a header name") })
        #expect(cache("forward_targeted_fields: maybe").contains { $0.contains("forward_targeted_fields") })
        #expect(
            cache("last_modified_factor: 0.05, targeted_fields: [Gatehouse-CC], forward_targeted_fields: true").isEmpty)
    }

    @Test func streamingKeysAreChecked() {
        let badProtocol = errors(
            Self.minimal.replacingOccurrences(of: "    targets:", with: "    protocol: h3\n    targets:"))
        #expect(badProtocol.contains { $0.contains("protocol") }, "\(badProtocol)")
        let direct = errors(
            Self.minimal + "\n  - { id: d, match: { path: /d }, respond: { status: 200 }, websocket: true }")
        #expect(direct.contains { $0.contains("websocket") }, "\(direct)")
    }

    @Test func upstreamResilienceKeysAreChecked() {
        func upstream(_ lines: String) -> [String] {
            errors(Self.minimal.replacingOccurrences(of: "    targets:", with: lines + "\n    targets:"))
        }
        let missing = upstream("    oauth2: { client_id: x }")
        #expect(missing.contains { $0.contains("oauth2.token_url") })
        #expect(missing.contains { $0.contains("oauth2.client_secret") })
        let wrong = upstream("    oauth2: { token_url: \"ftp://x\", client_id: a, client_secret: b, client_auth: jwt }")
        #expect(wrong.contains { $0.contains("oauth2.token_url: expected an http") })
        #expect(
            upstream("    passive_health: { eject_for: 10s, max_eject_for: 1s }").contains {
                $0.contains("max_eject_for")
            })
        #expect(upstream("    retries: { attempts: 2, budget: 2 }").contains { $0.contains("retries.budget") })
        #expect(upstream("    passive_health: { failures: 0 }").isEmpty)
    }

    @Test func unknownKeyIsAnErrorWithLineAndSuggestion() {
        let found = errors(Self.minimal + "\n    timeuot: 5s")
        #expect(found == ["g.yaml:8: routes[0].timeuot: unknown key \"timeuot\"; did you mean \"timeout\"?"])
    }

    @Test func unknownUpstreamIsNamedWithItsLine() {
        let yaml = Self.minimal.replacingOccurrences(of: "upstream: users", with: "upstream: userz")
        #expect(errors(yaml) == ["g.yaml:7: routes[0].upstream: unknown upstream \"userz\""])
    }

    @Test func environmentInterpolation() throws {
        let yaml = Self.minimal + "\nadmin:\n  token: \"tok-${ADMIN_SECRET}\""
        let config = try ConfigLoader.parse(yaml: yaml, environment: ["ADMIN_SECRET": "abc"])
        #expect(config.admin.token?.value == "tok-abc")
        #expect(errors(yaml) == ["g.yaml:9: admin.token: environment variable ADMIN_SECRET is not set"])
    }

    @Test func durationsAndSizes() throws {
        let yaml =
            Self.minimal + "\nserver:\n  limits: { max_body_bytes: 64KiB, header_timeout: 250ms, idle_timeout: 5m }"
        let config = try ConfigLoader.parse(yaml: yaml, environment: [:])
        #expect(config.server.limits.maxBodyBytes == 65536)
        #expect(config.server.limits.headerTimeout.milliseconds == 250)
        #expect(config.server.limits.idleTimeout.milliseconds == 300_000)
        let bad = Self.minimal + "\nserver:\n  limits: { max_body_bytes: lots, header_timeout: 10 }"
        let found = errors(bad)
        #expect(found.count == 2)
        #expect(found.contains { $0.contains("server.limits.max_body_bytes: expected a size") })
        #expect(found.contains { $0.contains("server.limits.header_timeout: expected a duration") })
    }

    @Test func wrongTypesAndMissingRequiredKeys() {
        let yaml = """
            upstreams:
              users: { targets: "http://x" }
            routes:
              - match: { path: "/a" }
                upstream: users
              - id: b
                upstream: users
            """
        let found = errors(yaml)
        #expect(found.contains("g.yaml:2: upstreams.users.targets: expected a list, found \"http://x\""))
        #expect(found.contains("g.yaml:4: routes[0].id: required"))
        #expect(found.contains("g.yaml:6: routes[1].match: required"))
    }

    @Test func everyErrorIsReportedAtOnceInLineOrder() {
        let yaml = """
            server: { listen: "nope", threads: many }
            redis: { url: "http://wrong" }
            rate_limits:
              gold: { requests: 0, per: 1m, by: planet }
            consumers:
              - { id: acme, api_keys: ["plaintext-key"], rate_limit: silver }
            auth:
              jwt:
                - { issuer: "https://i", algorithms: [none, HS256] }
            upstreams:
              u: { targets: [{ url: "ftp://x" }], balance: fastest }
            routes:
              - { id: r, match: { path: "/a/{id" }, upstream: u, auth: maybe }
              - { id: r, match: { path: "/b", path_prefix: "/b" }, respond: { status: 200 }, upstream: u }
            admin: { listen: "0.0.0.0:9901" }
            """
        let found = errors(yaml)
        let lines = found.compactMap { Int($0.split(separator: ":")[1]) }
        #expect(lines == lines.sorted())
        for fragment in [
            "server.listen: expected host:port", "server.threads: expected auto", "redis.url: expected redis[s]://",
            "rate_limits.gold.requests: must be at least 1", "rate_limits.gold.by: expected consumer",
            "consumers[0].api_keys[0]: expected sha256:", "consumers[0].rate_limit: unknown rate limit policy",
            "\"none\" is never accepted", "auth.jwt[0].secret: required for HS algorithms",
            "upstreams.u.targets[0].url: expected http://", "upstreams.u.balance: expected round_robin",
            "routes[0].match.path: a parameter must be a whole segment", "routes[0].auth: expected one of",
            "routes[1].id: route id \"r\" is used twice", "routes[1].match.path_prefix: give path or path_prefix",
            "routes[1].respond: give upstream or respond", "admin.token: required when admin.listen",
        ] {
            #expect(found.contains { $0.contains(fragment) }, "missing: \(fragment)")
        }
    }

    @Test func redisURLs() {
        for good in [
            "memory://", "redis://127.0.0.1:6379/0", "redis://:pw@h", "redis://u:p@h:1/15", "unix:///run/r.sock",
        ] {
            #expect(errors(Self.minimal + "\nredis: { url: \"\(good)\" }").isEmpty, "\(good)")
        }
        for bad in ["http://h", "redis://", "redis://h/db", "memory://x", "unix://"] {
            #expect(errors(Self.minimal + "\nredis: { url: \"\(bad)\" }").count == 1, "\(bad)")
        }
    }

    @Test func redisEndpoints() {
        func network(_ url: String) -> RedisServers? {
            if case .network(let servers) = RedisEndpoint.parse(url) { return servers }
            return nil
        }
        let single = network("redis://user:pw@10.0.0.1:6380/3")
        #expect(single?.hosts == [.init(host: "10.0.0.1", port: 6380)] && single?.database == 3)
        #expect(single?.username == "user" && single?.password == "pw" && single?.tls == false)
        let secret = network("rediss://:s%40cret@localhost")
        #expect(secret?.password == "s@cret" && secret?.username == nil && secret?.tls == true)
        #expect(secret?.hosts == [.init(host: "localhost", port: 6379)])
        let sentinel = network("redis-sentinel://app:pw@s1:26380,s2,[::1]:26381/2#main")
        #expect(sentinel?.topology == .sentinel(master: "main"))
        #expect(
            sentinel?.hosts == [
                .init(host: "s1", port: 26380), .init(host: "s2", port: 26379), .init(host: "::1", port: 26381),
            ])
        #expect(sentinel?.database == 2 && sentinel?.username == "app")
        #expect(network("rediss-sentinel://s1#m")?.tls == true)
        #expect(network("redis-cluster://a:7000,b:7001")?.topology == .cluster)
        for bad in ["redis-sentinel://s1", "redis://a,b", "redis://h:99999", "redis-cluster://a/1", "redis://h#m"] {
            #expect(RedisEndpoint.parse(bad) == nil, "\(bad)")
        }
        #expect(
            RedisEndpoint.parse("unix:///run/redis.sock?db=2")
                == .unix(path: "/run/redis.sock", database: 2, password: nil))
        #expect(RedisEndpoint.parse("memory://") == .memory)
    }

    @Test func noContentAnswersHaveNoBody() {
        let yaml = "routes:\n  - { id: r, match: { path: \"/r\" }, respond: { status: 204, body: \"x\" } }"
        #expect(errors(yaml) == ["g.yaml:2: routes[0].respond.body: a 204 answer has no body"])
    }

    @Test func invalidYAMLNamesTheLine() {
        let found = errors("routes:\n  - id: a\n    match: [unclosed\n")
        #expect(found.count == 1)
        #expect(found.first?.hasPrefix("g.yaml:") == true)
        #expect(found.first?.contains("invalid YAML") == true)
    }

    @Test func rewriteMayOnlyUseKnownParameters() {
        let yaml = Self.minimal + "\n    rewrite: { path: \"/u/{user}\" }"
        #expect(errors(yaml) == ["g.yaml:8: routes[0].rewrite.path: parameter {user} is not in the route's match.path"])
    }

    @Test func secretsAreRedactedWhenEncoded() throws {
        let yaml =
            Self.minimal + """

                admin: { token: "admin-secret" }
                redis: { url: "redis://:pw@127.0.0.1:6379/0" }
                """
        let config = try ConfigLoader.parse(yaml: yaml, environment: [:])
        let json = String(decoding: try JSONEncoder().encode(config), as: UTF8.self)
        #expect(!json.contains("admin-secret"))
        #expect(!json.contains(":pw@"))
        #expect(json.contains("<redacted>"))
    }
}

extension ConfigTests {
    /// The edge keys (SPEC §7) refuse what cannot work, with the key path.
    @Test func edgeKeysAreChecked() {
        func route(_ extra: String) -> String {
            Self.minimal + "\n" + extra.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n")
        }
        #expect(errors(route("allow_ips: [\"10.0.0.0/33\"]")).contains { $0.contains("routes[0].allow_ips[0]") })
        #expect(errors(route("deny_ips: [\"not-an-address\"]")).contains { $0.contains("routes[0].deny_ips[0]") })
        #expect(
            errors(route("cors: { allow_methods: [GET] }")).contains { $0.contains("routes[0].cors.allow_origins") })
        #expect(
            errors(route("cors: { allow_origins: [\"app.example.com\"] }")).contains {
                $0.contains("scheme://host")
            })
        #expect(
            errors(route("response_headers: { set: { \"Bad Name\": x } }")).contains {
                $0.contains("not a valid header name")
            })
        #expect(errors(route("compression: { types: [json] }")).contains { $0.contains("routes[0].compression.types") })
        #expect(
            errors(route("auth: required\nauth_methods: [client_cert]")).contains {
                $0.contains("server.tls.client_ca")
            })
        #expect(
            errors(Self.minimal + "\ntracing: { otlp_endpoint: \"http://c:4318\", sample_ratio: 2 }").contains {
                $0.contains("tracing.sample_ratio")
            })
        #expect(
            errors(Self.minimal + "\ntracing: { sample_ratio: 1 }").contains { $0.contains("tracing.otlp_endpoint") })
        #expect(
            errors(
                Self.minimal.replacingOccurrences(
                    of: "upstreams:", with: "server:\n  tls: { min_version: \"1.1\" }\nupstreams:")
            )
            .contains { $0.contains("server.tls") })
        #expect(
            errors(
                "consumers:\n  - { id: a, client_certs: [\"ab:cd\"] }\n" + Self.minimal
            ).contains { $0.contains("consumers[0].client_certs[0]") })
        // And what is valid loads.
        #expect(
            errors(
                route(
                    """
                    allow_ips: ["10.0.0.0/8", "2001:db8::/32"]
                    cors: { allow_origins: ["*"], max_age: 10m }
                    request_headers: { set: { X-A: "1" }, add: { X-B: "2" }, remove: [X-C] }
                    compression: { min_bytes: 2KiB }
                    """)
            ).isEmpty)
    }
}
