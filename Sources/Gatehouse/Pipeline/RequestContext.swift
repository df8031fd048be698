import GatehouseConfig
import NIOCore
import NIOHTTP1
import Synchronization

/// Everything known about one request as it walks the pipeline; one typed value, not a dictionary.
struct RequestContext {
    let requestID: String
    let head: HTTPRequestHead
    /// When the request head arrived (monotonic nanoseconds).
    let startNanoseconds: UInt64
    /// The client's address after `trusted_proxies`.
    var clientIP: String
    /// The address of the peer that opened the connection.
    let peerIP: String
    /// Whether the peer is one of `trusted_proxies`, so its X-Forwarded-* headers are believed.
    let peerTrusted: Bool
    /// `http` or `https`, as the client reached the gateway.
    let scheme: String
    /// `sha256:<hex>` of the certificate the client presented, verified against `server.tls.client_ca`.
    let clientCertificate: String?
    /// Host without port, lower-cased.
    var host: String = ""
    /// The Host header as the client sent it, for X-Forwarded-Host.
    var hostHeader: String = ""
    /// The normalised path.
    var path: String = ""
    var query: Substring?
    var route: CompiledRoute?
    var parameters: [(name: String, value: Substring)] = []
    var targetURL: String?
    /// The target the current upstream attempt uses.
    var lease: TargetLease?
    var status = 0
    var bytesIn = 0
    var bytesOut = 0
    var upstreamMicroseconds: Int64?
    /// Who the caller proved to be; set by authentication.
    var caller: Caller?
    /// Whose request this is, for state kept per caller (`by: consumer` limits, caller pauses): the caller, or
    /// without one its address.
    var callerKey: String { caller.map { "c:" + $0.key } ?? "ip:" + clientIP }
    /// `RateLimit-Policy` and `RateLimit` for every answer of a rate-limited route.
    var rateLimitHeaders: [(String, String)] = []
    /// The `Authorization` header carried an API key: it is not forwarded.
    var authorizationWasAPIKey = false
    /// The `Authorization` header carried the JWT the gateway verified: it may go upstream.
    var authorizationVerified = false
    /// The `Cache-Status` of the answer on a caching route; also written to the access log.
    var cacheStatus: String?
    /// The caching routes and paths whose entries a successful unsafe request removes (RFC 9111 §4.4), known once
    /// its answer's head arrived.
    var invalidates: [(route: String, path: String)] = []
    var error: GatewayError?
    /// Whether the connection may serve another request after this one.
    var keepAlive: Bool
    /// A gRPC call (``GRPC``): errors are gRPC statuses, nothing is cached.
    let isGRPC: Bool
    /// The call's `grpc-timeout`, which wins over a longer route timeout.
    let grpcTimeoutMilliseconds: Int?

    /// Whether the request declares a body: a Content-Length other than 0, or Transfer-Encoding.
    var declaresBody: Bool {
        if head.headers.contains(name: "Transfer-Encoding") { return true }
        return head.headers.first(name: "Content-Length").map { $0 != "0" } ?? false
    }

    /// The time the upstream attempts share: the route's, or a gRPC call's shorter deadline.
    var timeoutMilliseconds: Int {
        let route = route?.timeoutMilliseconds ?? 30_000
        return grpcTimeoutMilliseconds.map { min($0, route) } ?? route
    }

    init(requestID: String, head: HTTPRequestHead, connection: ConnectionInfo, trusted: [CIDR]) {
        self.requestID = requestID
        self.head = head
        peerIP = connection.peerIP
        scheme = connection.scheme
        clientCertificate = connection.clientCertificate
        peerTrusted = connection.peerBytes.map { bytes in trusted.contains { $0.contains(bytes) } } ?? false
        clientIP =
            peerTrusted
            ? AcceptPhase.clientIP(behindProxy: connection.peerIP, headers: head.headers, trusted: trusted)
            : connection.peerIP
        startNanoseconds = NIODeadline.now().uptimeNanoseconds
        // An HTTP/2 stream "keeps alive" in that an answer that ends before the request waits for the request's
        // end instead of resetting the stream.
        keepAlive = head.version.major == 2 || (head.isKeepAlive && head.version == .http1_1)
        isGRPC = head.method == .POST && GRPC.isCall(head.headers)
        grpcTimeoutMilliseconds = isGRPC ? GRPC.timeoutMilliseconds(head.headers) : nil
    }
}

/// Request ids: a random per-process prefix and a counter; unique, cheap, and sortable within a process.
enum RequestID {
    /// This process's random part: 8 hex digits.
    private static let prefix = UInt64(UInt32.random(in: 0...UInt32.max))
    private static let counter = Atomic<UInt64>(0)

    /// `pppppppp-cccccccccccc`: the process's part, then a counter (12 hex digits, wrapping), in one allocation.
    static func make() -> String {
        let value = counter.wrappingAdd(1, ordering: .relaxed).newValue
        return String(unsafeUninitializedCapacity: 21) { bytes in
            func hex(_ number: UInt64, digits: Int, at start: Int) {
                for index in 0..<digits {
                    let nibble = UInt8((number >> UInt64(4 * (digits - 1 - index))) & 0xF)
                    bytes[start + index] = nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10
                }
            }
            hex(prefix, digits: 8, at: 0)
            bytes[8] = UInt8(ascii: "-")
            hex(value, digits: 12, at: 9)
            return 21
        }
    }

    /// Accepts a client-sent id of 1 to 128 visible, harmless characters.
    static func isAcceptable(_ id: String) -> Bool {
        (1...128).contains(id.utf8.count)
            && id.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                    || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
                    || byte == UInt8(ascii: ":")
            }
    }
}

/// What is known about a client connection once, when it opens (the certificate once the handshake is done).
struct ConnectionInfo: Sendable {
    let peerIP: String
    let peerBytes: [UInt8]?
    let scheme: String
    /// The client certificate's `sha256:<hex>`, verified by the TLS handshake.
    var clientCertificate: String?

    init(remote: SocketAddress?, tls: Bool) {
        self.init(peerIP: remote?.ipAddress ?? "unknown", tls: tls)
    }

    init(peerIP: String, tls: Bool) {
        self.peerIP = peerIP
        peerBytes = IPAddressText.parse(peerIP)
        scheme = tls ? "https" : "http"
    }
}

extension HTTPMethod {
    /// The method as it is written on the wire: NIO spells `M-SEARCH` as `MSEARCH`.
    var wireName: String { self == .MSEARCH ? "M-SEARCH" : rawValue }
}

extension Substring {
    /// Without leading and trailing spaces and tabs.
    var trimmedSpaces: Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }
}

extension String {
    /// Without leading and trailing spaces and tabs.
    var trimmedSpaces: Substring { Substring(self).trimmedSpaces }

    /// ASCII case-insensitive equality, without allocating.
    func caseInsensitiveEquals(_ other: String) -> Bool {
        guard utf8.count == other.utf8.count else { return false }
        for (a, b) in zip(utf8, other.utf8) where a != b {
            let lowerA = (a >= 65 && a <= 90) ? a + 32 : a
            let lowerB = (b >= 65 && b <= 90) ? b + 32 : b
            if lowerA != lowerB { return false }
        }
        return true
    }
}
