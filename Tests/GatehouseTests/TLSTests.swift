import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing
import UpstreamClient

/// TLS termination at the gateway, checked with libcurl verifying the gateway's certificate.
@Suite struct TLSTests {
    /// Makes a self-signed certificate for `localhost`; returns (cert, key) paths.
    static func makeCertificate() async throws -> (String, String) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let cert = directory.appendingPathComponent("cert.pem").path
        let key = directory.appendingPathComponent("key.pem").path
        let (status, _, error) = try await ChildProcess.run(
            "/usr/bin/openssl",
            [
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert,
            ])
        #expect(status == 0, "openssl: \(error)")
        return (cert, key)
    }

    @Test func terminatesTLSAndForwardsAsHTTPS() async throws {
        let (cert, key) = try await Self.makeCertificate()
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port, server: "  tls: { cert: \"\(cert)\", key: \"\(key)\" }",
                routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(yaml) { h in
            let client = UpstreamClient(threads: 1)
            defer { client.shutdown() }
            let result = try await client.fetch(
                UpstreamRequest(
                    url: "https://localhost:\(h.port)/secure?q=1", method: "GET", headers: [], bodyLength: nil,
                    connectTimeoutMilliseconds: 2000, timeoutMilliseconds: 5000, verifyTLS: true, caFile: cert))
            #expect(result.status == 200)
            let echo = (try JSONSerialization.jsonObject(with: Data(result.body))) as? [String: Any]
            let headers = echo?["headers"] as? [String: String]
            #expect(headers?["x-forwarded-proto"] == "https")
            #expect(echo?["path"] as? String == "/secure")

            // Without the CA the certificate must be refused.
            await #expect(throws: UpstreamError.self) {
                _ = try await client.fetch(
                    UpstreamRequest(
                        url: "https://localhost:\(h.port)/secure", method: "GET", headers: [], bodyLength: nil,
                        connectTimeoutMilliseconds: 2000, timeoutMilliseconds: 5000, verifyTLS: true,
                        caFile: "/dev/null"))
            }
        }
    }
}

extension TLSTests {
    /// A gateway whose upstream is reached over TLS: verified against `ca_file` by default, refused without it.
    @Test func httpsUpstreamsAreVerified() async throws {
        let (cert, key) = try await Self.makeCertificate()
        // The TLS "origin" is itself a gateway terminating TLS in front of the demo upstream.
        let originYAML = { (port: Int) in
            Harness.config(
                upstreamPort: port, server: "  tls: { cert: \"\(cert)\", key: \"\(key)\" }",
                routes: "  - { id: demo, match: { path_prefix: \"/\" }, upstream: demo }")
        }
        try await Harness.run(originYAML) { origin in
            let front = { (_: Int) in
                """
                server: { listen: "127.0.0.1:0", threads: 1, access_log: "off" }
                admin: { listen: "127.0.0.1:0", hosts: [test.local] }
                redis: { url: "memory://" }
                upstreams:
                  trusted: { targets: [{ url: "https://localhost:\(origin.port)" }], tls: { ca_file: "\(cert)" } }
                  untrusted: { targets: [{ url: "https://localhost:\(origin.port)" }] }
                routes:
                  - { id: trusted, match: { path_prefix: "/trusted/" }, upstream: trusted, rewrite: { strip_prefix: "/trusted" } }
                  - { id: untrusted, match: { path_prefix: "/untrusted/" }, upstream: untrusted }
                """
            }
            try await Harness.run(front) { h in
                let verified = try await request(port: h.port, "/trusted/hello")
                #expect(verified.status == 200)
                #expect(verified.json["path"] as? String == "/hello")
                let refused = try await request(port: h.port, "/untrusted/hello")
                #expect(refused.status == 502)
                #expect((refused.json["detail"] as? String)?.contains("TLS") == true)
            }
        }
    }

    /// An upstream that offers HTTP/2 through ALPN is spoken to in HTTP/2; the client still gets HTTP/1.1.
    @Test func http2IsUsedWhenTheUpstreamOffersIt() async throws {
        let (cert, key) = try await Self.makeCertificate()
        let origin = try await HTTP2Origin.start(cert: cert, key: key)
        let port = origin.localAddress?.port ?? 0
        let front = { (_: Int) in
            """
            server: { listen: "127.0.0.1:0", threads: 1, access_log: "off" }
            admin: { listen: "127.0.0.1:0", hosts: [test.local] }
            redis: { url: "memory://" }
            upstreams:
              h2: { targets: [{ url: "https://localhost:\(port)" }], tls: { ca_file: "\(cert)" }, connect_timeout: 5s }
            routes:
              - { id: h2, match: { path_prefix: "/" }, upstream: h2 }
            """
        }
        try await Harness.run(front) { h in
            for _ in 0..<3 {
                let answer = try await request(port: h.port, "/version")
                #expect(answer.status == 200)
                #expect(answer.text == "HTTP/2.0")
            }
        }
        try await origin.close()
    }
}

/// A whole response fetched through ``UpstreamClient``.
struct FetchedResponse: Sendable {
    var status = 0
    var headers: [(name: String, value: String)] = []
    var body: [UInt8] = []
}

extension UpstreamClient {
    /// Runs one exchange to the end and returns the whole response.
    func fetch(_ request: UpstreamRequest, body: [UInt8]? = nil) async throws -> FetchedResponse {
        let collector = Collector()
        return try await withCheckedThrowingContinuation { continuation in
            collector.continuation.withLock { $0 = continuation }
            let transfer = start(request, delegate: collector)
            if let body {
                transfer.sendBody(ByteBuffer(bytes: body))
                transfer.endBody()
            }
        }
    }

    private final class Collector: UpstreamTransferDelegate {
        let eventLoop: EventLoop = MultiThreadedEventLoopGroup.singleton.next()
        let continuation = Mutex<CheckedContinuation<FetchedResponse, Error>?>(nil)
        let response = Mutex(FetchedResponse())

        func upstreamTransfer(_ transfer: UpstreamTransfer, received events: UpstreamEvents) {
            response.withLock { response in
                if let head = events.head {
                    response.status = head.status
                    response.headers = head.headers
                }
                for chunk in events.body { response.body += chunk.readableBytesView }
            }
            guard let completion = events.completion else { return }
            let continuation = self.continuation.withLock { value in
                defer { value = nil }
                return value
            }
            if let error = completion.error {
                continuation?.resume(throwing: error)
            } else {
                continuation?.resume(returning: response.withLock { $0 })
            }
        }

        func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer) {}
    }
}
