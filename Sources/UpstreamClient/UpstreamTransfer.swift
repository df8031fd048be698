import CCurl
import NIOCore
import Synchronization

/// One request/response exchange with an upstream, driven by an ``UpstreamWorker``.
///
/// The gateway feeds the request body with ``sendBody(_:)`` and ``endBody()``, applies response
/// backpressure with ``setResponsePaused(_:)``, and may ``cancel()``. Everything else happens on the worker thread.
public final class UpstreamTransfer: @unchecked Sendable {
    /// Request-body bytes queued beyond which the caller should stop reading its client.
    public static let requestBodyHighWater = 256 * 1024
    static let requestBodyLowWater = 64 * 1024

    /// State shared between the caller's thread and the worker thread.
    struct Shared {
        var body = CircularBuffer<ByteBuffer>()
        var bodyBytes = 0
        var bodyEnded = false
        var bodyFailed = false
        /// curl's read callback returned PAUSE and waits for data.
        var readPaused = false
        /// The caller was told to stop reading and waits for `upstreamTransferWantsRequestBody`.
        var callerThrottled = false
        var responsePaused = false
    }

    let request: UpstreamRequest
    let delegate: UpstreamTransferDelegate
    let shared = Mutex(Shared())
    unowned let worker: UpstreamWorker

    // Worker-thread state.
    var handle: UnsafeMutableRawPointer?
    var headerList: UnsafeMutablePointer<curl_slist>?
    var pendingHead: (status: Int, headers: [(name: String, value: String)])?
    var events = UpstreamEvents()
    var hasEvents = false
    var writePaused = false
    var finished = false

    init(request: UpstreamRequest, delegate: UpstreamTransferDelegate, worker: UpstreamWorker) {
        self.request = request
        self.delegate = delegate
        self.worker = worker
    }

    /// Queues request-body bytes. Returns false when the caller should stop reading its client
    /// until ``UpstreamTransferDelegate/upstreamTransferWantsRequestBody(_:)``.
    @discardableResult
    public func sendBody(_ buffer: ByteBuffer) -> Bool {
        let (wake, keepReading) = shared.withLock { state -> (Bool, Bool) in
            state.body.append(buffer)
            state.bodyBytes += buffer.readableBytes
            let wake = state.readPaused
            state.readPaused = false
            if state.bodyBytes > Self.requestBodyHighWater {
                state.callerThrottled = true
                return (wake, false)
            }
            return (wake, true)
        }
        if wake { worker.submit(.unpause(self)) }
        return keepReading
    }

    /// Marks the end of the request body.
    public func endBody() {
        let wake = shared.withLock { state -> Bool in
            state.bodyEnded = true
            defer { state.readPaused = false }
            return state.readPaused
        }
        if wake { worker.submit(.unpause(self)) }
    }

    /// Pauses or resumes reading the upstream's response (the client cannot take more right now).
    public func setResponsePaused(_ paused: Bool) {
        let changed = shared.withLock { state -> Bool in
            defer { state.responsePaused = paused }
            return state.responsePaused != paused
        }
        if changed, !paused { worker.submit(.unpause(self)) }
    }

    /// Stops the exchange; the delegate gets a completion with a `.cancelled` error unless it already finished.
    public func cancel() {
        shared.withLock { $0.bodyFailed = true }
        worker.submit(.cancel(self))
    }

    // MARK: worker thread

    /// curl's read callback: copies queued body bytes into curl's buffer.
    func readBody(into destination: UnsafeMutablePointer<CChar>, capacity: Int) -> Int {
        var wantsMore = false
        let result = shared.withLock { state -> Int in
            if state.bodyFailed { return Int(GH_CURL_READFUNC_ABORT) }
            var written = 0
            while written < capacity, var chunk = state.body.first {
                let count = min(capacity - written, chunk.readableBytes)
                chunk.withUnsafeReadableBytes { raw in
                    guard let base = raw.baseAddress else { return }
                    UnsafeMutableRawPointer(destination + written).copyMemory(from: base, byteCount: count)
                }
                chunk.moveReaderIndex(forwardBy: count)
                written += count
                if chunk.readableBytes == 0 {
                    state.body.removeFirst()
                } else {
                    state.body[state.body.startIndex] = chunk
                }
            }
            state.bodyBytes -= written
            if state.callerThrottled, state.bodyBytes < Self.requestBodyLowWater {
                state.callerThrottled = false
                wantsMore = true
            }
            if written == 0 {
                if state.bodyEnded { return 0 }
                state.readPaused = true
                return Int(GH_CURL_READFUNC_PAUSE)
            }
            return written
        }
        if wantsMore { delegate.upstreamTransferWantsRequestBody(self) }
        return result
    }

    /// curl's write callback: queues a body chunk, or pauses while the client is slow.
    func writeBody(_ source: UnsafeMutablePointer<CChar>, count: Int) -> Int {
        if shared.withLock({ $0.responsePaused }) {
            writePaused = true
            return Int(GH_CURL_WRITEFUNC_PAUSE)
        }
        let buffer = ByteBuffer(bytes: UnsafeRawBufferPointer(start: source, count: count))
        events.body.append(buffer)
        hasEvents = true
        worker.markReady(self)
        return count
    }

    /// curl's header callback: one header line at a time, ending with an empty line.
    func headerLine(_ source: UnsafeMutablePointer<CChar>, count: Int) -> Int {
        // Strip the line ending as bytes: in Swift "\r\n" is a single Character.
        var length = count
        while length > 0, source[length - 1] == 0x0A || source[length - 1] == 0x0D { length -= 1 }
        let line = Substring(decoding: UnsafeRawBufferPointer(start: source, count: length), as: UTF8.self)
        if line.hasPrefix("HTTP/") {
            let parts = line.split(separator: " ", maxSplits: 2)
            let status = parts.count > 1 ? Int(parts[1]) ?? 0 : 0
            pendingHead = (status, [])
        } else if line.isEmpty {
            if let head = pendingHead, head.status >= 200 {
                events.head = UpstreamResponseHead(status: head.status, headers: head.headers)
                hasEvents = true
                worker.markReady(self)
            }
            pendingHead = nil
        } else if let colon = line.firstIndex(of: ":"), pendingHead != nil {
            let name = line[..<colon].trimmingSpaces
            let value = line[line.index(after: colon)...].trimmingSpaces
            pendingHead?.headers.append((String(name), String(value)))
        } else if let first = line.first, first == " " || first == "\t", let count = pendingHead?.headers.count,
            count > 0
        {
            // Obsolete line folding: join to the previous value.
            pendingHead?.headers[count - 1].value += " " + line.trimmingSpaces
        }
        return count
    }

    /// Hands everything gathered since the last flush to the delegate.
    func flushEvents() {
        guard hasEvents else { return }
        let batch = events
        events = UpstreamEvents()
        hasEvents = false
        delegate.upstreamTransfer(self, received: batch)
    }

    func complete(_ completion: UpstreamCompletion) {
        guard !finished else { return }
        finished = true
        events.completion = completion
        hasEvents = true
        flushEvents()
    }
}

extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }
}
