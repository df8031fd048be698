public import NIOCore

/// What the gateway asks an upstream: an absolute URL built from a configured target, never from the client.
public struct UpstreamRequest: Sendable {
    public var url: String
    public var method: String
    /// Headers to send as they are (hop-by-hop headers already removed).
    public var headers: [(name: String, value: String)]
    /// The request body's length: nil for no body, -1 for a streamed body of unknown length (sent chunked).
    public var bodyLength: Int64?
    public var connectTimeoutMilliseconds: Int
    public var timeoutMilliseconds: Int
    public var verifyTLS: Bool
    public var caFile: String?
    public var httpVersion: UpstreamHTTPVersion

    public init(
        url: String, method: String, headers: [(name: String, value: String)], bodyLength: Int64?,
        connectTimeoutMilliseconds: Int, timeoutMilliseconds: Int, verifyTLS: Bool = true, caFile: String? = nil,
        httpVersion: UpstreamHTTPVersion = .auto
    ) {
        self.url = url
        self.method = method
        self.headers = headers
        self.bodyLength = bodyLength
        self.connectTimeoutMilliseconds = connectTimeoutMilliseconds
        self.timeoutMilliseconds = timeoutMilliseconds
        self.verifyTLS = verifyTLS
        self.caFile = caFile
        self.httpVersion = httpVersion
    }
}

extension UpstreamRequest {
    /// Whether the exchange may run over HTTP/2 (by ALPN over TLS, or h2c when asked for).
    public var mayUseHTTP2: Bool {
        switch httpVersion {
        case .http1: false
        case .http2: true
        case .auto: url.hasPrefix("https:")
        }
    }
}

/// The HTTP version spoken to an upstream.
public enum UpstreamHTTPVersion: Sendable {
    /// HTTP/2 when TLS's ALPN offers it, else HTTP/1.1; HTTP/1.1 on `http://`.
    case auto
    case http1
    /// HTTP/2 by ALPN over TLS; on `http://`, h2c with prior knowledge.
    case http2
}

/// The status line and headers of an upstream's final (non-1xx) answer.
public struct UpstreamResponseHead: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]

    public init(status: Int, headers: [(name: String, value: String)]) {
        self.status = status
        self.headers = headers
    }
}

/// Why an upstream exchange failed.
public struct UpstreamError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kinds of failure the gateway maps to answers.
    public enum Kind: Sendable, Hashable {
        /// The connection could not be made (refused, unreachable, DNS).
        case connect
        /// The connection was not made within the connect timeout.
        case connectTimeout
        /// The whole exchange took longer than its timeout.
        case timeout
        /// The connection broke or the upstream sent nothing or garbage.
        case reset
        /// TLS handshake or verification failed.
        case tls
        /// The gateway cancelled the exchange.
        case cancelled
        /// The request body could not be sent (the client went away).
        case requestBody
        case other
    }

    public let kind: Kind
    /// libcurl's message for the failure.
    public let detail: String

    public init(kind: Kind, detail: String) {
        self.kind = kind
        self.detail = detail
    }

    public var description: String { "\(kind): \(detail)" }
}

/// How an exchange ended, with timing measured by libcurl.
public struct UpstreamCompletion: Sendable {
    public var error: UpstreamError?
    /// Total time of the exchange in microseconds.
    public var totalMicroseconds: Int64
}

/// Everything that happened to one transfer since it last reported, delivered in one hand-off.
public struct UpstreamEvents: Sendable {
    /// Interim answers before the head (102 Processing, 103 Early Hints; never 100 or 101), at most
    /// ``UpstreamTransfer/maxInterimHeads`` per transfer.
    public var interim: [UpstreamResponseHead] = []
    public var head: UpstreamResponseHead?
    public var body: [ByteBuffer] = []
    /// The answer's trailer fields (gRPC's `grpc-status`), with its completion.
    public var trailers: [(name: String, value: String)] = []
    public var completion: UpstreamCompletion?
}

/// Receives a transfer's events, always on its ``eventLoop``.
///
/// A worker hands the events of all transfers that share an event loop over in one task per round, so the
/// cost of waking the loop is shared by every transfer it serves.
public protocol UpstreamTransferDelegate: AnyObject, Sendable {
    /// The event loop the delegate's methods are called on.
    var eventLoop: EventLoop { get }
    /// The response head, body chunks and completion since the last call, in order.
    func upstreamTransfer(_ transfer: UpstreamTransfer, received events: UpstreamEvents)
    /// The queued request body fell below the low-water mark: the client may be read again.
    func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer)
}
