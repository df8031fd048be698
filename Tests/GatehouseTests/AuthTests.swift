import Crypto
import DemoUpstream
import Foundation
import GatehouseConfig
import Testing
import _CryptoExtras

@testable import Gatehouse
@testable import RedisClient

/// Tokens made here, signed the way an issuer would (or a forger).
enum Mint {
    static func base64URL(_ bytes: some Sequence<UInt8>) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    static func json(_ object: [String: Any]) -> String {
        base64URL((try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data())
    }

    static func claims(
        iss: String = "https://issuer.test", sub: String = "alice", aud: Any = "gatehouse", exp: TimeInterval = 300,
        nbf: TimeInterval? = nil
    ) -> [String: Any] {
        let now = Date().timeIntervalSince1970
        var claims: [String: Any] = ["iss": iss, "sub": sub, "aud": aud, "exp": Int(now + exp), "iat": Int(now)]
        if let nbf { claims["nbf"] = Int(now + nbf) }
        return claims
    }

    static func hs256(_ claims: [String: Any], secret: [UInt8], alg: String = "HS256", kid: String? = nil) -> String {
        var header: [String: Any] = ["alg": alg, "typ": "JWT"]
        if let kid { header["kid"] = kid }
        let input = json(header) + "." + json(claims)
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
        return input + "." + base64URL(mac)
    }

    static func rs256(_ claims: [String: Any], key: _RSA.Signing.PrivateKey, kid: String) throws -> String {
        let input = json(["alg": "RS256", "typ": "JWT", "kid": kid]) + "." + json(claims)
        let signature = try key.signature(for: SHA256.hash(data: Array(input.utf8)), padding: .insecurePKCS1v1_5)
        return input + "." + base64URL(signature.rawRepresentation)
    }

    static func es256(_ claims: [String: Any], key: P256.Signing.PrivateKey, kid: String) throws -> String {
        let input = json(["alg": "ES256", "typ": "JWT", "kid": kid]) + "." + json(claims)
        let signature = try key.signature(for: Array(input.utf8))
        return input + "." + base64URL(signature.rawRepresentation)
    }

    static func withCritical(_ claims: [String: Any], secret: [UInt8]) -> String {
        let input = json(["alg": "HS256", "typ": "JWT", "crit": ["exp"]]) + "." + json(claims)
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
        return input + "." + base64URL(mac)
    }

    static func unsigned(_ claims: [String: Any]) -> String {
        json(["alg": "none", "typ": "JWT"]) + "." + json(claims) + "."
    }

    static func jwk(rsa key: _RSA.Signing.PrivateKey, kid: String) throws -> String {
        let primitives = try key.publicKey.getKeyPrimitives()
        return "{\"kty\":\"RSA\",\"kid\":\"\(kid)\",\"use\":\"sig\",\"n\":\"\(base64URL(primitives.modulus))\","
            + "\"e\":\"\(base64URL(primitives.publicExponent))\"}"
    }

    static func jwk(ec key: P256.Signing.PrivateKey, kid: String) -> String {
        let point = Array(key.publicKey.x963Representation.dropFirst())
        return "{\"kty\":\"EC\",\"kid\":\"\(kid)\",\"crv\":\"P-256\",\"x\":\"\(base64URL(point[0..<32]))\","
            + "\"y\":\"\(base64URL(point[32..<64]))\"}"
    }

    static func jwks(_ keys: [String]) -> String { "{\"keys\":[\(keys.joined(separator: ","))]}" }
}

/// Authentication end to end: real gateway, real upstream (which echoes what it received), real Redis.
@Suite struct AuthTests {
    static let secret = "an HMAC secret for the tests, long enough"
    static let configKey = "config-key-of-acme"

    /// Routes: /private (required), /maybe (optional), /jwt-only (required, jwt), /open (none).
    static func yaml(
        redis: String = "memory://", prefix: String = "gatehouse:", jwt: String, queryParam: Bool = false
    ) -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port, redis: redis, redisKeyPrefix: prefix,
                routes: """
                      - { id: private, match: { path_prefix: "/private" }, upstream: demo, auth: required }
                      - { id: maybe, match: { path_prefix: "/maybe" }, upstream: demo, auth: optional }
                      - id: jwtonly
                        match: { path_prefix: "/jwt-only" }
                        upstream: demo
                        auth: required
                        auth_methods: [jwt]
                      - { id: open, match: { path_prefix: "/" }, upstream: demo }
                    consumers:
                      - { id: acme, api_keys: ["sha256:\(KeyDigest(key: configKey).hex)"] }
                      - { id: partner-7 }
                    auth:
                      api_key: { header: X-API-Key\(queryParam ? ", query_param: api_key" : "") }
                      jwt:
                    \(jwt)
                    """)
        }
    }

    static let hmacIssuer = """
            - issuer: "https://issuer.test"
              audiences: [gatehouse]
              algorithms: [HS256]
              secret: "\(secret)"
              leeway: 30s
        """

    static func upstreamHeaders(_ response: RawResponse) -> [String: String] {
        response.json["headers"] as? [String: String] ?? [:]
    }

    @Test func apiKeysFromTheConfig() async throws {
        try await Harness.run(Self.yaml(jwt: Self.hmacIssuer, queryParam: true)) { h in
            let missing = try await request(port: h.port, "/private/x")
            #expect(missing.status == 401)
            #expect(missing.header("WWW-Authenticate") == "Bearer realm=\"gatehouse\"")
            #expect(missing.header("Content-Type") == "application/problem+json")

            let wrong = try await request(port: h.port, "/private/x", headers: [("X-API-Key", "nope")])
            #expect(wrong.status == 401)
            #expect(wrong.header("WWW-Authenticate")?.contains("error=\"invalid_token\"") == true)

            for headers in [[("X-API-Key", Self.configKey)], [("Authorization", "Bearer \(Self.configKey)")]] {
                let ok = try await request(
                    port: h.port, "/private/x", headers: headers + [("X-Consumer-ID", "mallory")])
                #expect(ok.status == 200)
                let seen = Self.upstreamHeaders(ok)
                #expect(seen["x-consumer-id"] == "acme", "set by the gateway, the client's removed")
                #expect(seen["x-api-key"] == nil, "the key is never forwarded")
                #expect(seen["authorization"] == nil, "nor the Authorization header that carried it")
            }
            let viaQuery = try await request(port: h.port, "/private/x?api_key=\(Self.configKey)&a=1")
            #expect(viaQuery.status == 200)
            #expect(viaQuery.json["query"] as? String == "a=1")

            // optional: anonymous without credentials, refused with bad ones.
            let anonymous = try await request(port: h.port, "/maybe", headers: [("X-Consumer-ID", "mallory")])
            #expect(anonymous.status == 200)
            #expect(Self.upstreamHeaders(anonymous)["x-consumer-id"] == nil)
            #expect(try await request(port: h.port, "/maybe", headers: [("X-API-Key", "bad")]).status == 401)
            // A route without auth strips X-Consumer-ID too.
            let open = try await request(port: h.port, "/open", headers: [("X-Consumer-ID", "mallory")])
            #expect(Self.upstreamHeaders(open)["x-consumer-id"] == nil)

            // Valid credentials of a method the route does not take: 403.
            let forbidden = try await request(port: h.port, "/jwt-only", headers: [("X-API-Key", Self.configKey)])
            #expect(forbidden.status == 401, "an API key is no credential on a JWT-only route")

            let metrics = try await request(port: h.adminPort, "/metrics").text
            #expect(metrics.contains("gatehouse_auth_total{method=\"api_key\",result=\"ok\"} 3"))
            #expect(!metrics.contains(Self.configKey))
        }
    }

    @Test func jwtClaimsAreChecked() async throws {
        try await Harness.run(Self.yaml(jwt: Self.hmacIssuer)) { h in
            let secret = Array(Self.secret.utf8)
            func status(_ token: String, _ path: String = "/private") async throws -> RawResponse {
                try await request(port: h.port, path, headers: [("Authorization", "Bearer \(token)")])
            }
            let good = try await status(Mint.hs256(Mint.claims(), secret: secret))
            #expect(good.status == 200)
            #expect(Self.upstreamHeaders(good)["x-consumer-id"] == "alice")
            #expect(try await status(Mint.hs256(Mint.claims(), secret: secret), "/jwt-only").status == 200)

            let cases: [(String, String)] = [
                (Mint.hs256(Mint.claims(exp: -120), secret: secret), "expired"),
                (Mint.hs256(Mint.claims(nbf: 600), secret: secret), "not valid yet"),
                (Mint.hs256(Mint.claims(iss: "https://other.test"), secret: secret), "issuer"),
                (Mint.hs256(Mint.claims(aud: "someone-else"), secret: secret), "audience"),
                (Mint.hs256(Mint.claims(), secret: Array("wrong secret".utf8)), "signature"),
                (Mint.unsigned(Mint.claims()), "algorithm"),
                (Mint.hs256(Mint.claims(), secret: secret, alg: "HS512"), "algorithm"),
                ("not.a.token", "well-formed"),
                (Mint.withCritical(Mint.claims(), secret: secret), "crit"),
            ]
            for (token, why) in cases {
                let refused = try await status(token)
                #expect(refused.status == 401, "\(why)")
                #expect(refused.header("WWW-Authenticate")?.contains("error=\"invalid_token\"") == true)
                #expect(refused.text.contains(why), "\(why): \(refused.text)")
            }
            // A kid in an HMAC token is ignored (the secret has none); the consumer claim must be a plain id.
            #expect(try await status(Mint.hs256(Mint.claims(), secret: secret, kid: "any")).status == 200)
            let smuggling = try await status(Mint.hs256(Mint.claims(sub: "x\r\nX-Admin: 1"), secret: secret))
            #expect(smuggling.status == 401)
            // The JWT forwarded upstream (the upstream may read it), the consumer set by the gateway.
            #expect(Self.upstreamHeaders(good)["authorization"]?.hasPrefix("Bearer ") == true)
            // Within the leeway (30 s), a just-expired token still passes; aud may be a list.
            #expect(try await status(Mint.hs256(Mint.claims(exp: -10), secret: secret)).status == 200)
            #expect(try await status(Mint.hs256(Mint.claims(aud: ["x", "gatehouse"]), secret: secret)).status == 200)
        }
    }

    @Test func publicKeyTokensAndNoAlgorithmConfusion() async throws {
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let ec = P256.Signing.PrivateKey()
        let jwksPath = FileManager.default.temporaryDirectory.appendingPathComponent("jwks-\(UUID()).json").path
        // A key of a type jwt-kit does not know is skipped, not fatal for the others (RFC 7517 §5).
        let unknownKey = "{\"kty\":\"oct\",\"kid\":\"o1\",\"k\":\"c2VjcmV0\"}"
        try Mint.jwks([unknownKey, try Mint.jwk(rsa: rsa, kid: "r1"), Mint.jwk(ec: ec, kid: "e1")])
            .write(toFile: jwksPath, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: jwksPath) }
        let issuer = """
                - issuer: "https://issuer.test"
                  audiences: [gatehouse]
                  algorithms: [RS256, ES256, HS256]
                  jwks_file: "\(jwksPath)"
                  secret: "\(Self.secret)"
            """
        try await Harness.run(Self.yaml(jwt: issuer)) { h in
            func send(_ token: String) async throws -> Int {
                try await request(port: h.port, "/private", headers: [("Authorization", "Bearer \(token)")]).status
            }
            #expect(try await send(Mint.rs256(Mint.claims(), key: rsa, kid: "r1")) == 200)
            #expect(try await send(Mint.es256(Mint.claims(), key: ec, kid: "e1")) == 200)
            // The RSA key under another algorithm's name, or a kid it does not have: refused.
            #expect(try await send(Mint.rs256(Mint.claims(), key: rsa, kid: "e1")) == 401)
            // The classic confusion: HS256 with the RSA public key as the HMAC secret. HS uses `secret` only.
            let publicPEM = Array(rsa.publicKey.pemRepresentation.utf8)
            #expect(try await send(Mint.hs256(Mint.claims(), secret: publicPEM, kid: "r1")) == 401)
            let publicDER = Array(rsa.publicKey.derRepresentation)
            #expect(try await send(Mint.hs256(Mint.claims(), secret: publicDER, kid: "r1")) == 401)
            // Another RSA key with a known kid: the signature fails.
            let stranger = try _RSA.Signing.PrivateKey(keySize: .bits2048)
            #expect(try await send(Mint.rs256(Mint.claims(), key: stranger, kid: "r1")) == 401)
        }
    }

    @Test func jwksFromAURLIsRefetchedOnANewKidButNotFlooded() async throws {
        let first = P256.Signing.PrivateKey()
        let second = P256.Signing.PrivateKey()
        let yaml = { (port: Int) -> String in
            Self.yaml(
                jwt: """
                        - issuer: "https://issuer.test"
                          algorithms: [ES256]
                          jwks_url: "http://127.0.0.1:\(port)/document"
                    """)(port)
        }
        // The JWKS is served by the test's upstream; it must be in place before the gateway preloads keys.
        let upstream = try await DemoUpstream.start()
        upstream.document = Mint.jwks([Mint.jwk(ec: first, kid: "k1")])
        try await Harness.run(yaml, upstream: upstream) { h in
            func send(_ token: String) async throws -> Int {
                try await request(port: h.port, "/private", headers: [("Authorization", "Bearer \(token)")]).status
            }
            let firstToken = try Mint.es256(Mint.claims(), key: first, kid: "k1")
            #expect(try await send(firstToken) == 200)
            let fetched = h.upstream.documentRequests
            #expect(fetched == 1)

            // The issuer rotates: a token with the new kid makes the gateway fetch the JWKS again, once.
            h.upstream.document = Mint.jwks([Mint.jwk(ec: first, kid: "k1"), Mint.jwk(ec: second, kid: "k2")])
            let secondToken = try Mint.es256(Mint.claims(), key: second, kid: "k2")
            #expect(try await send(secondToken) == 200)
            #expect(h.upstream.documentRequests == fetched + 1)

            // A flood of unknown kids fetches at most once per 5 s.
            for index in 0..<20 {
                let bogus = try Mint.es256(Mint.claims(), key: second, kid: "bogus\(index)")
                #expect(try await send(bogus) == 401)
            }
            #expect(h.upstream.documentRequests <= fetched + 2)
        }
        await upstream.stop()
    }

    @Test func keysIssuedAtRuntimeAreSharedAndRevokedEverywhere() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let yaml = Self.yaml(redis: url, prefix: "gh-auth-\(UUID().uuidString.prefix(8)):", jwt: Self.hmacIssuer)
        try await Harness.run(yaml) { a in
            try await Harness.run(yaml) { b in
                try await waitUntil { a.gateway.readinessProblem == nil && b.gateway.readinessProblem == nil }
                let issued = try await request(port: a.adminPort, "/consumers/partner-7/keys", method: "POST", body: "")
                #expect(issued.status == 201)
                #expect(
                    try await request(port: a.adminPort, "/consumers/nobody/keys", method: "POST", body: "").status
                        == 404, "keys belong to consumers of the config")
                #expect(try await request(port: a.adminPort, "/consumers/partner-7/keys").status == 405)
                let key = try #require(issued.json["key"] as? String)
                let digest = try #require(issued.json["sha256"] as? String)
                #expect(digest == "sha256:" + KeyDigest(key: key).hex)

                let onB = try await request(port: b.port, "/private", headers: [("X-API-Key", key)])
                #expect(onB.status == 200)
                #expect(Self.upstreamHeaders(onB)["x-consumer-id"] == "partner-7")

                let revoke = try await request(
                    port: a.adminPort, "/consumers/partner-7/keys/\(digest)", method: "DELETE")
                #expect(revoke.status == 200)
                #expect(
                    try await request(port: a.adminPort, "/consumers/other/keys/\(digest)", method: "DELETE").status
                        == 404)
                // b remembered the key for at most a second.
                try await Task.sleep(for: .milliseconds(1100))
                #expect(try await request(port: b.port, "/private", headers: [("X-API-Key", key)]).status == 401)
            }
        }
        _ = server
    }

    @Test func redisAwayKeepsConfigKeysAndJWTsAndRefusesUnknownRuntimeKeysWith503() async throws {
        let redis = try await RedisServerProcess()
        let yaml = Self.yaml(redis: "redis://127.0.0.1:\(redis.port)/0", jwt: Self.hmacIssuer)
        try await Harness.run(yaml) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            let issued = try await request(port: h.adminPort, "/consumers/acme/keys", method: "POST", body: "")
            let recent = try #require(issued.json["key"] as? String)
            let unseen = try #require(
                try await request(port: h.adminPort, "/consumers/acme/keys", method: "POST", body: "").json["key"]
                    as? String)
            #expect(try await request(port: h.port, "/private", headers: [("X-API-Key", recent)]).status == 200)

            await redis.kill()
            try await waitUntil { h.gateway.readinessProblem != nil }
            try await Task.sleep(for: .milliseconds(1100))
            #expect(try await request(port: h.port, "/private", headers: [("X-API-Key", Self.configKey)]).status == 200)
            let token = Mint.hs256(Mint.claims(), secret: Array(Self.secret.utf8))
            #expect(
                try await request(port: h.port, "/private", headers: [("Authorization", "Bearer \(token)")]).status
                    == 200)
            #expect(
                try await request(port: h.port, "/private", headers: [("X-API-Key", recent)]).status == 200,
                "seen valid a moment ago")
            let refused = try await request(port: h.port, "/private", headers: [("X-API-Key", unseen)])
            #expect(refused.status == 503)
            #expect(refused.text.contains("Redis"))
        }
        await redis.kill()
    }

    @Test func consumersNeverSeeEachOthersCachedEntries() async throws {
        let (url, server) = try await StoreTests.sharedRedisURL()
        let betaKey = "beta-key"
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port, redis: url, redisKeyPrefix: "gh-pc-\(UUID().uuidString.prefix(8)):",
                routes: """
                      - id: mine
                        match: { path_prefix: "/cache/" }
                        upstream: demo
                        auth: required
                        cache: { ttl: 30s }
                    consumers:
                      - { id: acme, api_keys: ["sha256:\(KeyDigest(key: Self.configKey).hex)"] }
                      - { id: beta, api_keys: ["sha256:\(KeyDigest(key: betaKey).hex)"] }
                    """)
        }
        try await Harness.run(yaml) { h in
            try await waitUntil { h.gateway.readinessProblem == nil }
            func get(_ key: String) async throws -> RawResponse {
                try await request(port: h.port, "/cache/mine?cc=max-age%3D60", headers: [("X-API-Key", key)])
            }
            let acme = try await get(Self.configKey)
            #expect(acme.header("Cache-Status") == "gatehouse; fwd=miss; stored")
            try await Task.sleep(for: .milliseconds(100))
            #expect(try await get(Self.configKey).header("Cache-Status")?.contains("hit") == true)
            let beta = try await get(betaKey)
            #expect(beta.header("Cache-Status") == "gatehouse; fwd=miss; stored", "beta never gets acme's entry")
            #expect(beta.body != acme.body)
            try await Task.sleep(for: .milliseconds(100))
            let betaAgain = try await get(betaKey)
            #expect(betaAgain.header("Cache-Status")?.contains("hit") == true)
            #expect(betaAgain.body == beta.body)
            #expect(h.upstream.requestCount == 2)
            // Without credentials the route answers 401 and the cache is never consulted.
            let anonymous = try await request(port: h.port, "/cache/mine?cc=max-age%3D60")
            #expect(anonymous.status == 401)
        }
        _ = server
    }
}
