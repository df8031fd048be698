import Crypto
import GatehouseConfig
import NIOCore
import NIOSSL
import SwiftASN1
import Synchronization
import X509

/// The client listener's TLS (`server.tls`): its certificates, chosen by the name a client asks for (SNI), the CA
/// client certificates are verified against, and the lowest version accepted.
///
/// The files are read at start and again on every reload (SIGHUP, `POST /reload`): a renewed certificate is
/// served to the next connection without a restart, and open connections keep the one they started with. Files
/// that cannot be read leave the previous context in place, and the reload reports them.
final class EdgeTLS: Sendable {
    private let current: Mutex<NIOSSLContext>

    init(_ tls: ServerTLS, http2: Bool) throws {
        current = Mutex(try Self.makeContext(tls, http2: http2))
    }

    /// The context new connections use.
    var context: NIOSSLContext { current.withLock { $0 } }

    /// Reads the files again; on failure the context in use stays and the error is thrown.
    func reload(_ tls: ServerTLS, http2: Bool) throws {
        let context = try Self.makeContext(tls, http2: http2)
        current.withLock { $0 = context }
    }

    static func makeContext(_ tls: ServerTLS, http2: Bool) throws -> NIOSSLContext {
        let identities = try tls.certificates.map(Identity.init)
        guard let first = identities.first else { throw EdgeTLSError.noCertificate }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: first.chain, privateKey: first.key)
        configuration.minimumTLSVersion = tls.minVersion == .v1_3 ? .tlsv13 : .tlsv12
        if http2 { configuration.applicationProtocols = ClientPipelines.alpnProtocols }
        if let ca = tls.clientCA {
            // Asked for, not required: a route that does not take client certificates serves clients without one,
            // and one that does answers 401 without it. A certificate that is sent must verify, or the handshake
            // fails.
            configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
            configuration.certificateVerification = .optionalVerification
            configuration.sendCANameList = true
        }
        if identities.count > 1 {
            let chooser = CertificateChooser(identities)
            configuration.sslContextCallback = { values, promise in
                promise.succeed(chooser.override(for: values.serverHostname))
            }
        }
        return try NIOSSLContext(configuration: configuration)
    }

    /// `sha256:<hex>` of a certificate's DER, the form `consumers[].client_certs` names it in.
    static func fingerprint(_ certificate: NIOSSLCertificate) -> String? {
        guard let der = try? certificate.toDERBytes() else { return nil }
        return "sha256:"
            + SHA256.hash(data: der).map { byte in
                let hex = String(byte, radix: 16)
                return byte < 16 ? "0" + hex : hex
            }.joined()
    }
}

/// What a certificate file pair could not be made into a context for.
enum EdgeTLSError: Error, CustomStringConvertible {
    case noCertificate

    var description: String { "server.tls names no certificate" }
}

/// One certificate chain with its key, and the names (from its SAN, else its CN) it answers for.
private struct Identity: Sendable {
    let chain: [NIOSSLCertificateSource]
    let key: NIOSSLPrivateKeySource
    /// Lower-cased DNS names; `*.example.com` for a wildcard.
    let names: [String]

    init(_ files: TLSFiles) throws {
        let certificates = try NIOSSLCertificate.fromPEMFile(files.cert)
        chain = certificates.map { .certificate($0) }
        key = .privateKey(try NIOSSLPrivateKey(file: files.key, format: .pem))
        var names: [String] = []
        if let leaf = certificates.first, let parsed = try? Certificate(derEncoded: leaf.toDERBytes()) {
            if let alternatives = try? parsed.extensions.subjectAlternativeNames {
                for case .dnsName(let name) in alternatives { names.append(name.lowercased()) }
            }
            if names.isEmpty {
                for attribute in parsed.subject.flatMap({ $0 }) where attribute.type == .RDNAttributeType.commonName {
                    names.append(String(describing: attribute.value).lowercased())
                }
            }
        }
        self.names = names
    }
}

/// Picks the certificate for the name a client asked for: an exact name first, then a `*.suffix` that covers it
/// (one label deep, as RFC 6125 wildcards go), else the first certificate.
private struct CertificateChooser: Sendable {
    private let exact: [String: Int]
    private let wildcard: [String: Int]
    private let identities: [Identity]

    init(_ identities: [Identity]) {
        var exact: [String: Int] = [:]
        var wildcard: [String: Int] = [:]
        for (index, identity) in identities.enumerated() {
            for name in identity.names {
                if name.hasPrefix("*.") {
                    if wildcard[String(name.dropFirst(2))] == nil { wildcard[String(name.dropFirst(2))] = index }
                } else if exact[name] == nil {
                    exact[name] = index
                }
            }
        }
        self.exact = exact
        self.wildcard = wildcard
        self.identities = identities
    }

    func override(for serverName: String?) -> NIOSSLContextConfigurationOverride {
        guard var name = serverName?.lowercased() else { return .noChanges }
        if name.hasSuffix(".") { name.removeLast() }
        var index = exact[name]
        if index == nil, let dot = name.firstIndex(of: ".") {
            index = wildcard[String(name[name.index(after: dot)...])]
        }
        guard let index, index > 0 else { return .noChanges }
        var override = NIOSSLContextConfigurationOverride()
        override.certificateChain = identities[index].chain
        override.privateKey = identities[index].key
        return override
    }
}
