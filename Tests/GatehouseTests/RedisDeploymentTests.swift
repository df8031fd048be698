import Foundation
import GatehouseConfig
import Logging
import NIOCore
import Testing

@testable import Gatehouse
@testable import RedisClient

/// The Redis that production runs, with real servers: TLS-only (with a CA the test makes, and one that wants client
/// certificates), an ACL user, and a master with a replica behind three sentinels, failed over under load.
@Suite(.serialized) struct RedisDeploymentTests {
    /// A CA, a server certificate it signed for the name redis.internal only (no address), and a client certificate
    /// it signed.
    struct Certificates {
        let directory: String
        var ca: String { directory + "/ca.pem" }
        var serverCert: String { directory + "/server.pem" }
        var serverKey: String { directory + "/server.key" }
        var clientCert: String { directory + "/client.pem" }
        var clientKey: String { directory + "/client.key" }

        static func make() async throws -> Certificates {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-redis-tls-\(UUID())").path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let made = Certificates(directory: directory)
            let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            try await openssl(
                ["req", "-x509"] + ec + [
                    "-days", "1", "-subj", "/CN=test CA", "-keyout", directory + "/ca.key", "-out", made.ca,
                ])
            for (name, san) in [
                ("server", "subjectAltName=DNS:redis.internal"), ("client", "extendedKeyUsage=clientAuth"),
            ] {
                try await openssl(
                    ["req"] + ec + [
                        "-subj", "/CN=\(name)", "-keyout", "\(directory)/\(name).key", "-out",
                        "\(directory)/\(name).csr",
                    ])
                try "\(san)\n".write(toFile: "\(directory)/\(name).ext", atomically: true, encoding: .utf8)
                try await openssl([
                    "x509", "-req", "-in", "\(directory)/\(name).csr", "-CA", made.ca, "-CAkey", directory + "/ca.key",
                    "-CAcreateserial", "-days", "1", "-extfile", "\(directory)/\(name).ext", "-out",
                    "\(directory)/\(name).pem",
                ])
            }
            return made
        }

        private static func openssl(_ arguments: [String]) async throws {
            let (status, _, error) = try await ChildProcess.run("/usr/bin/openssl", arguments)
            guard status == 0 else { throw RawError.closed("openssl \(arguments.first ?? ""): \(error)") }
        }

        /// `redis-server` arguments for a TLS-only server on `port`.
        func serverArguments(_ port: Int, clientCertificates: Bool) -> [String] {
            [
                "--port", "0", "--tls-port", String(port), "--tls-cert-file", serverCert, "--tls-key-file", serverKey,
                "--tls-ca-cert-file", ca, "--tls-auth-clients", clientCertificates ? "yes" : "no",
            ]
        }
    }

    /// A gateway on `url` whose `/limited` route counts in Redis (2 per minute); `extra` goes under `redis:`.
    static func yaml(_ url: String, _ extra: String = "", prefix: String = "gh-deploy:") -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port, redis: url, redisKeyPrefix: prefix, redisExtra: extra,
                routes: """
                      - { id: limited, match: { path_prefix: "/limited" }, upstream: demo, rate_limit: [two] }
                    rate_limits:
                      two: { requests: 2, per: 1m, by: ip, on_redis_error: allow }
                    """)
        }
    }

    /// The gateway reaches Redis (readiness) and counts there: the third request in a minute is refused.
    static func expectCountsInRedis(_ h: Harness) async throws {
        try await waitUntil(timeout: .seconds(10)) { h.gateway.readinessProblem == nil }
        var statuses: [Int] = []
        for _ in 0..<3 { statuses.append(try await request(port: h.port, "/limited/x").status) }
        #expect(statuses == [200, 200, 429])
    }

    @Test func tlsOnlyRedisWithTheTestsCA() async throws {
        let certificates = try await Certificates.make()
        let server = try await RedisServerProcess { certificates.serverArguments($0, clientCertificates: false) }
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let ca = "ca_file: \"\(certificates.ca)\""
        try await Harness.run(Self.yaml(url, "  tls: { \(ca), server_name: redis.internal }")) { h in
            try await Self.expectCountsInRedis(h)
        }
        // Verification is on by default: without the CA, the server's certificate is refused and Redis is away
        // (the route's on_redis_error: allow lets requests through meanwhile).
        try await Harness.run(Self.yaml(url, "  tls: { server_name: redis.internal }")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "a certificate from an unknown CA was accepted")
            #expect(try await request(port: h.port, "/limited/x").status == 200, "on_redis_error: allow")
        }
        // The name checked is the host connected to unless server_name says otherwise: 127.0.0.1 is not in the
        // certificate.
        try await Harness.run(Self.yaml(url, "  tls: { \(ca) }")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "a certificate for another name was accepted")
        }
        // verify: false takes any certificate.
        try await Harness.run(Self.yaml(url, "  tls: { verify: false }", prefix: "gh-deploy-any:")) { h in
            try await Self.expectCountsInRedis(h)
        }
        _ = server
    }

    @Test func tlsRedisThatWantsAClientCertificate() async throws {
        let certificates = try await Certificates.make()
        let server = try await RedisServerProcess { certificates.serverArguments($0, clientCertificates: true) }
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let ca = "ca_file: \"\(certificates.ca)\", server_name: redis.internal"
        let client = "cert: \"\(certificates.clientCert)\", key: \"\(certificates.clientKey)\""
        try await Harness.run(Self.yaml(url, "  tls: { \(ca), \(client) }")) { h in
            try await Self.expectCountsInRedis(h)
        }
        try await Harness.run(Self.yaml(url, "  tls: { \(ca) }")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "connected without a client certificate")
        }
        _ = server
    }

    @Test func anACLUserWithAPassword() async throws {
        let server = try await RedisServerProcess(arguments: [
            "--user", "default", "off", "--user", "gatehouse", "on", ">s3cret", "~*", "&*", "+@all",
        ])
        try await Harness.run(Self.yaml("redis://gatehouse:s3cret@127.0.0.1:\(server.port)/0")) { h in
            try await Self.expectCountsInRedis(h)
        }
        try await Harness.run(Self.yaml("redis://gatehouse:wrong@127.0.0.1:\(server.port)/0")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "a wrong password was accepted")
        }
        _ = server
    }
}
