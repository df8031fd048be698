import Foundation
import GatehouseConfig
import Testing

@testable import Gatehouse

/// TLS at the edge (SPEC §7): certificates by SNI, reloaded without a restart, `min_version`, and client
/// certificates as credentials over HTTP/1.1 and HTTP/2. Certificates are made by openssl in the test and checked
/// with `openssl s_client` and curl.
@Suite struct EdgeTLSTests {
    /// A folder of certificates made for one test.
    struct Certificates {
        let directory: String

        init() throws {
            directory =
                FileManager.default.temporaryDirectory.appendingPathComponent("gh-edge-\(UUID().uuidString)")
                .path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }

        func path(_ name: String) -> String { directory + "/" + name }

        func openssl(_ arguments: [String]) async throws {
            let (status, _, error) = try await ChildProcess.run("/usr/bin/openssl", arguments)
            #expect(status == 0, "openssl \(arguments.first ?? ""): \(error)")
        }

        /// A self-signed certificate `name`.pem / `name`.key with subject CN=`name` and the given DNS names.
        func selfSigned(_ name: String, dns: [String]) async throws {
            var arguments = [
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                "-subj", "/CN=\(name)", "-keyout", path(name + ".key"), "-out", path(name + ".pem"),
            ]
            if !dns.isEmpty {
                arguments += ["-addext", "subjectAltName=" + dns.map { "DNS:" + $0 }.joined(separator: ",")]
            }
            try await openssl(arguments)
        }

        /// A client certificate `name`.pem / `name`.key signed by the CA `ca` (made with ``selfSigned(_:dns:)``).
        func signed(_ name: String, by ca: String) async throws {
            try await openssl([
                "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
                "/CN=\(name)", "-keyout", path(name + ".key"), "-out", path(name + ".csr"),
            ])
            try await openssl([
                "x509", "-req", "-in", path(name + ".csr"), "-CA", path(ca + ".pem"), "-CAkey", path(ca + ".key"),
                "-CAcreateserial", "-days", "1", "-out", path(name + ".pem"),
            ])
        }

        /// `sha256:<hex>` of a certificate's DER, as openssl prints it.
        func fingerprint(_ name: String) async throws -> String {
            let (_, out, _) = try await ChildProcess.run(
                "/usr/bin/openssl", ["x509", "-in", path(name + ".pem"), "-noout", "-fingerprint", "-sha256"])
            let hex = out.split(separator: "=").last.map(String.init) ?? ""
            return "sha256:"
                + hex.replacingOccurrences(of: ":", with: "").trimmingCharacters(in: .whitespacesAndNewlines)
                .lowercased()
        }
    }

    /// The subject of the certificate the gateway presents for `serverName` (nil: no SNI), by `openssl s_client`.
    static func presented(_ port: Int, serverName: String?, extra: [String] = []) async throws -> (Int32, String) {
        let (status, out) = try await handshake(port, serverName: serverName, extra: extra)
        let subject = out.split(separator: "\n").first { $0.hasPrefix("subject=") } ?? ""
        return (status, subject.replacingOccurrences(of: " ", with: "") + (status == 0 ? "" : out))
    }

    /// What `openssl s_client` prints for a handshake with the gateway.
    static func handshake(_ port: Int, serverName: String?, extra: [String] = []) async throws -> (Int32, String) {
        var arguments = ["s_client", "-connect", "127.0.0.1:\(port)"]
        arguments += serverName.map { ["-servername", $0] } ?? ["-noservername"]
        let (status, out, error) = try await ChildProcess.run(
            "/bin/sh", ["-c", "/usr/bin/openssl " + (arguments + extra).joined(separator: " ") + " </dev/null"])
        return (status, out + error)
    }

    static func curl(_ arguments: [String]) async throws -> (Int32, String) {
        let (status, out, error) = try await ChildProcess.run(
            "/usr/bin/curl", ["-sS", "--max-time", "10"] + arguments)
        return (status, out + error)
    }

    @Test func certificatesAreChosenBySNIAndReloadedWithoutDroppingConnections() async throws {
        let certs = try Certificates()
        try await certs.selfSigned("a-cert", dns: ["a.test"])
        try await certs.selfSigned("b-cert", dns: ["*.b.test"])
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port,
                server: """
                      tls:
                        certificates:
                          - { cert: "\(certs.path("a-cert.pem"))", key: "\(certs.path("a-cert.key"))" }
                          - { cert: "\(certs.path("b-cert.pem"))", key: "\(certs.path("b-cert.key"))" }
                    """,
                routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(yaml) { h in
            #expect(try await Self.presented(h.port, serverName: "a.test").1.contains("CN=a-cert"))
            #expect(try await Self.presented(h.port, serverName: "api.b.test").1.contains("CN=b-cert"))
            // No SNI, or a name no certificate has: the first certificate.
            #expect(try await Self.presented(h.port, serverName: nil).1.contains("CN=a-cert"))
            #expect(try await Self.presented(h.port, serverName: "other.test").1.contains("CN=a-cert"))
            // curl checks the wildcard name against the certificate it gets.
            let (status, out) = try await Self.curl([
                "--cacert", certs.path("b-cert.pem"), "--resolve", "api.b.test:\(h.port):127.0.0.1",
                "https://api.b.test:\(h.port)/hello",
            ])
            #expect(status == 0, "\(out)")

            // A request under way over TLS while the certificate is renewed and reloaded: it completes.
            let slow = Task {
                try await Self.curl([
                    "-k", "-o", "/dev/null", "-w", "%{http_code}", "--resolve", "a.test:\(h.port):127.0.0.1",
                    "https://a.test:\(h.port)/delay/1500",
                ])
            }
            try await Task.sleep(for: .milliseconds(300))
            try await certs.openssl([
                "req", "-x509", "-key", certs.path("a-cert.key"), "-days", "1", "-subj", "/CN=a-renewed",
                "-addext", "subjectAltName=DNS:a.test", "-out", certs.path("a-cert.pem"),
            ])
            #expect(try await request(port: h.adminPort, "/reload", method: "POST").status == 200)
            #expect(try await Self.presented(h.port, serverName: "a.test").1.contains("CN=a-renewed"))
            let (slowStatus, code) = try await slow.value
            #expect(slowStatus == 0 && code == "200", "the request under way: \(code)")

            // Files that cannot be used fail the reload, and the certificate in use stays.
            try "not a certificate".write(toFile: certs.path("a-cert.pem"), atomically: true, encoding: .utf8)
            #expect(try await request(port: h.adminPort, "/reload", method: "POST").status == 400)
            #expect(try await Self.presented(h.port, serverName: "a.test").1.contains("CN=a-renewed"))
        }
    }

    @Test func minVersionRefusesOlderClients() async throws {
        let certs = try Certificates()
        try await certs.selfSigned("only13", dns: ["localhost"])
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port,
                server: """
                      tls:
                        certificates: [{ cert: "\(certs.path("only13.pem"))", key: "\(certs.path("only13.key"))" }]
                        min_version: "1.3"
                    """,
                routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(yaml) { h in
            let (old, _) = try await Self.presented(h.port, serverName: "localhost", extra: ["-tls1_2"])
            #expect(old != 0, "a TLS 1.2 client was accepted")
            let (new, out) = try await Self.handshake(h.port, serverName: "localhost", extra: ["-tls1_3"])
            #expect(new == 0 && out.contains("TLSv1.3"), "\(out)")
        }
    }

    @Test func clientCertificatesIdentifyConsumersOverHTTP1AndHTTP2() async throws {
        let certs = try Certificates()
        try await certs.selfSigned("server", dns: ["localhost"])
        try await certs.selfSigned("client-ca", dns: [])
        try await certs.signed("acme-client", by: "client-ca")
        try await certs.signed("unknown-client", by: "client-ca")
        try await certs.selfSigned("rogue", dns: [])
        let acme = try await certs.fingerprint("acme-client")
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port,
                server: """
                      tls:
                        certificates: [{ cert: "\(certs.path("server.pem"))", key: "\(certs.path("server.key"))" }]
                        client_ca: "\(certs.path("client-ca.pem"))"
                    """,
                routes: """
                      - { id: mtls, match: { path_prefix: "/mtls" }, upstream: demo, auth: required,
                          auth_methods: [client_cert] }
                      - { id: open, match: { path_prefix: "/open" }, upstream: demo }
                      - { id: either, match: { path_prefix: "/either" }, upstream: demo, auth: required,
                          auth_methods: [client_cert, api_key] }
                    """
            ).replacingOccurrences(
                of: "upstreams:",
                with: """
                    consumers:
                      - { id: acme, client_certs: ["\(acme)"], api_keys: ["sha256:\(KeyDigest(key: "k").hex)"] }
                    upstreams:
                    """)
        }
        try await Harness.run(yaml) { h in
            let base = ["--cacert", certs.path("server.pem"), "-w", "\\n%{http_code} %{http_version}"]
            func call(_ path: String, as client: String?, _ extra: [String] = []) async throws -> (Int32, String) {
                let identity = client.map { ["--cert", certs.path($0 + ".pem"), "--key", certs.path($0 + ".key")] }
                return try await Self.curl(base + (identity ?? []) + extra + ["https://localhost:\(h.port)\(path)"])
            }
            for version in ["--http1.1", "--http2"] {
                let (status, out) = try await call("/mtls/who", as: "acme-client", [version])
                #expect(status == 0, "\(out)")
                #expect(out.hasSuffix(version == "--http2" ? "200 2" : "200 1.1"), "\(out)")
                #expect(out.contains("\"x-consumer-id\":\"acme\""), "\(out)")
            }
            // Without a certificate: no credentials for this route (an API key is not one of its methods).
            #expect(try await call("/mtls/who", as: nil).1.hasSuffix("401 2"))
            #expect(try await call("/mtls/who", as: nil, ["-H", "X-API-Key: k"]).1.hasSuffix("401 2"))
            // A certificate the CA signed but no consumer names.
            #expect(try await call("/mtls/who", as: "unknown-client").1.hasSuffix("401 2"))
            // Where an API key is accepted too, a certificate no consumer names does not stand in its way.
            let either = try await call("/either/who", as: "unknown-client", ["-H", "X-API-Key: k"])
            #expect(either.1.hasSuffix("200 2") && either.1.contains("\"x-consumer-id\":\"acme\""), "\(either.1)")
            // Routes that take no certificates serve clients without one.
            #expect(try await call("/open/x", as: nil).1.hasSuffix("200 2"))
            // A certificate the CA did not sign fails the handshake.
            let (rogue, _) = try await call("/open/x", as: "rogue")
            #expect(rogue != 0)
        }
    }
}

extension EdgeTLSTests {
    /// config/examples/edge.yaml loads, once the certificate files it names exist.
    @Test func theEdgeExampleIsValid() async throws {
        let certs = try Certificates()
        for name in ["api", "wildcard", "partners-ca"] { try await certs.selfSigned(name, dns: ["\(name).test"]) }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("config/examples/edge.yaml"), encoding: .utf8)
        let path = certs.path("edge.yaml")
        try text.replacingOccurrences(of: "certs/", with: certs.directory + "/")
            .write(toFile: path, atomically: true, encoding: .utf8)
        let config = try ConfigLoader.load(path: path, environment: ["TENANT": "blue"])
        #expect(config.server.tls?.certificates.count == 2)
        #expect(config.routes.first { $0.id == "billing" }?.authMethods == [.clientCert])
        #expect(config.tracing?.sampleRatio == 0.05)
    }
}
