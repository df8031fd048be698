import CCurl
public import NIOCore
import Synchronization

/// Where a tunnel is made to: a connection only (`CURLOPT_CONNECT_ONLY`), TLS included, then raw bytes.
public struct TunnelRequest: Sendable {
    /// `http://` or `https://` with host and port; only the connection is made.
    public var url: String
    public var connectTimeoutMilliseconds: Int
    public var verifyTLS: Bool
    public var caFile: String?

    public init(url: String, connectTimeoutMilliseconds: Int, verifyTLS: Bool = true, caFile: String? = nil) {
        self.url = url
        self.connectTimeoutMilliseconds = connectTimeoutMilliseconds
        self.verifyTLS = verifyTLS
        self.caFile = caFile
    }
}

/// Receives a tunnel's events, always on its ``eventLoop``.
public protocol UpstreamTunnelDelegate: AnyObject, Sendable {
    var eventLoop: EventLoop { get }
    /// The connection is made (and TLS is up): bytes may flow.
    func tunnelConnected(_ tunnel: UpstreamTunnel)
    /// Bytes from the upstream, in order.
    func tunnel(_ tunnel: UpstreamTunnel, received bytes: [ByteBuffer])
    /// The queued bytes to the upstream fell below the low-water mark: the client may be read again.
    func tunnelWantsMore(_ tunnel: UpstreamTunnel)
    /// The tunnel is closed: the upstream closed it (`error` nil) or it failed. Called once, last.
    func tunnelClosed(_ tunnel: UpstreamTunnel, error: UpstreamError?)
}

/// A byte pipe to an upstream made through libcurl (`CURLOPT_CONNECT_ONLY`, then `curl_easy_send` and
/// `curl_easy_recv`), for protocols that leave HTTP after a handshake, such as WebSocket. Its worker watches the
/// socket with the same epoll as its transfers; the handle never leaves the worker thread.
public final class UpstreamTunnel: @unchecked Sendable {
    /// Queued bytes to the upstream beyond which the caller should stop reading its client.
    public static let sendHighWater = 256 * 1024
    static let sendLowWater = 64 * 1024

    struct Shared {
        var outbound = CircularBuffer<ByteBuffer>()
        var outboundBytes = 0
        var callerThrottled = false
        var receivePaused = false
        var closing = false
    }

    let request: TunnelRequest
    let delegate: UpstreamTunnelDelegate
    let shared = Mutex(Shared())
    unowned let worker: UpstreamWorker

    // Worker-thread state.
    var handle: UnsafeMutableRawPointer?
    var socket: Int32 = -1
    var connected = false
    var closed = false

    init(request: TunnelRequest, delegate: UpstreamTunnelDelegate, worker: UpstreamWorker) {
        self.request = request
        self.delegate = delegate
        self.worker = worker
    }

    /// Queues bytes for the upstream. Returns false when the caller should stop reading its client until
    /// ``UpstreamTunnelDelegate/tunnelWantsMore(_:)``.
    @discardableResult
    public func send(_ buffer: ByteBuffer) -> Bool {
        let keepReading = shared.withLock { state -> Bool in
            state.outbound.append(buffer)
            state.outboundBytes += buffer.readableBytes
            if state.outboundBytes > Self.sendHighWater { state.callerThrottled = true }
            return !state.callerThrottled
        }
        worker.submit(.tunnelWake(self))
        return keepReading
    }

    /// Stops or resumes reading the upstream (the client cannot take more right now).
    public func setReceivePaused(_ paused: Bool) {
        let changed = shared.withLock { state -> Bool in
            defer { state.receivePaused = paused }
            return state.receivePaused != paused
        }
        if changed { worker.submit(.tunnelWake(self)) }
    }

    /// Closes the tunnel once the bytes queued so far are sent; the delegate gets ``tunnelClosed``.
    public func close() {
        shared.withLock { $0.closing = true }
        worker.submit(.tunnelWake(self))
    }

    // MARK: worker thread

    /// Sends what is queued; true when all of it went out, false when the socket is full (wait for EPOLLOUT).
    func flushOutbound() -> Result<Bool, UpstreamError> {
        guard let handle else { return .success(true) }
        while true {
            guard var chunk = shared.withLock({ $0.outbound.first }) else { return .success(true) }
            var sent = 0
            let code = chunk.withUnsafeReadableBytes { raw -> CURLcode in
                guard let base = raw.baseAddress else { return CURLE_OK }
                return curl_easy_send(handle, base, raw.count, &sent)
            }
            if code == CURLE_AGAIN { return .success(false) }
            if code != CURLE_OK {
                return .failure(UpstreamError(kind: .reset, detail: String(cString: curl_easy_strerror(code))))
            }
            chunk.moveReaderIndex(forwardBy: sent)
            let wantsMore = shared.withLock { state -> Bool in
                if chunk.readableBytes == 0 {
                    state.outbound.removeFirst()
                } else {
                    state.outbound[state.outbound.startIndex] = chunk
                }
                state.outboundBytes -= sent
                guard state.callerThrottled, state.outboundBytes < Self.sendLowWater else { return false }
                state.callerThrottled = false
                return true
            }
            if wantsMore {
                let delegate = self.delegate
                delegate.eventLoop.execute { delegate.tunnelWantsMore(self) }
            }
        }
    }

    /// Reads what the socket has, up to `limit` bytes this round. `.success(nil)`: the upstream closed.
    func receive(limit: Int) -> Result<[ByteBuffer]?, UpstreamError> {
        guard let handle else { return .success([]) }
        var chunks: [ByteBuffer] = []
        var total = 0
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        while total < limit {
            var count = 0
            let code = buffer.withUnsafeMutableBytes { raw in
                curl_easy_recv(handle, raw.baseAddress, raw.count, &count)
            }
            if code == CURLE_AGAIN { break }
            if code != CURLE_OK {
                return .failure(UpstreamError(kind: .reset, detail: String(cString: curl_easy_strerror(code))))
            }
            if count == 0 { return chunks.isEmpty ? .success(nil) : .success(chunks) }
            chunks.append(ByteBuffer(bytes: buffer[0..<count]))
            total += count
        }
        return .success(chunks)
    }

    /// Hands received bytes to the delegate.
    func deliver(_ chunks: [ByteBuffer]) {
        let delegate = self.delegate
        delegate.eventLoop.execute { delegate.tunnel(self, received: chunks) }
    }
}
