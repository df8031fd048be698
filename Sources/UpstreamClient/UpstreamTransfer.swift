import CCurl
public import NIOCore
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
    var headerLines: CurlHeaderLines?
    var pendingHead: (status: Int, headers: [(name: String, value: String)])?
    var events = UpstreamEvents()
    var hasEvents = false
    var finished = false
    /// Listed in the worker's hand-over for this round.
    var queuedForHandOver = false
    /// The final (non-1xx) head was handed over; later header lines are trailers.
    var headDelivered = false
    /// Trailer fields received after the body.
    var trailers: [(name: String, value: String)] = []
    /// Trailer fields kept at most (more are dropped).
    static let maxTrailers = 64
    /// Interim (1xx) heads handed over so far; more than ``maxInterimHeads`` are dropped.
    var interimHeads = 0
    public static let maxInterimHeads = 8

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
        if wantsMore {
            let delegate = self.delegate
            delegate.eventLoop.execute { delegate.upstreamTransferWantsRequestBody(self) }
        }
        return result
    }

    /// curl's write callback: queues a body chunk, or pauses while the client is slow.
    func writeBody(_ source: UnsafeMutablePointer<CChar>, count: Int) -> Int {
        if shared.withLock({ $0.responsePaused }) {
            return Int(GH_CURL_WRITEFUNC_PAUSE)
        }
        let buffer = ByteBuffer(bytes: UnsafeRawBufferPointer(start: source, count: count))
        events.body.append(buffer)
        hasEvents = true
        worker.markReady(self)
        return count
    }

    /// curl's header callback: one header line at a time, ending with an empty line. Parsed as bytes.
    func headerLine(_ source: UnsafeMutablePointer<CChar>, count: Int) -> Int {
        let bytes = UnsafeRawBufferPointer(start: source, count: count)
        var end = count
        while end > 0, bytes[end - 1] == 0x0A || bytes[end - 1] == 0x0D { end -= 1 }
        // After the final head, header lines are trailers: kept when well-formed, handed over with the completion.
        if headDelivered {
            var colon = 0
            while colon < end, bytes[colon] != UInt8(ascii: ":") { colon += 1 }
            if colon > 0, colon < end, Self.isToken(bytes, 0, colon), Self.isFieldValue(bytes, colon + 1, end),
                trailers.count < Self.maxTrailers
            {
                trailers.append(
                    (
                        String(decoding: bytes[0..<colon], as: UTF8.self),
                        String(decoding: Self.trimmed(bytes, colon + 1, end), as: UTF8.self)
                    ))
            }
            return count
        }
        if end == 0 {
            if let head = pendingHead, head.status >= 200 || head.status == 0 {
                headDelivered = true
                events.head = UpstreamResponseHead(status: head.status, headers: head.headers)
                hasEvents = true
                worker.markReady(self)
            } else if let head = pendingHead, head.status > 101, interimHeads < Self.maxInterimHeads {
                interimHeads += 1
                events.interim.append(UpstreamResponseHead(status: head.status, headers: head.headers))
                hasEvents = true
                worker.markReady(self)
            }
            pendingHead = nil
            return count
        }
        if pendingHead == nil {
            // The first line of a header block is the status line, "HTTP/1.1 200 OK" or "HTTP/2 200":
            // exactly three digits after the first space. Anything else leaves status 0, which the gateway
            // treats as a broken upstream.
            var index = 0
            while index < end, bytes[index] != UInt8(ascii: " ") { index += 1 }
            var status = 0
            var digits = 0
            index += 1
            while index < end, digits < 4, bytes[index] >= UInt8(ascii: "0"), bytes[index] <= UInt8(ascii: "9") {
                status = status * 10 + Int(bytes[index] - UInt8(ascii: "0"))
                digits += 1
                index += 1
            }
            if digits != 3 || status < 100 { status = 0 }
            pendingHead = (status, [])
            pendingHead?.headers.reserveCapacity(12)
            return count
        }
        if bytes[0] == UInt8(ascii: " ") || bytes[0] == UInt8(ascii: "\t") {
            // Obsolete line folding: join to the previous value, checked like any value (a folded NUL or CR
            // must not reach the client either); a fold with nothing to join makes the answer invalid.
            guard Self.isFieldValue(bytes, 0, end), let last = pendingHead?.headers.count, last > 0 else {
                pendingHead?.status = 0
                return count
            }
            let more = Self.trimmed(bytes, 0, end)
            pendingHead?.headers[last - 1].value += " " + String(decoding: more, as: UTF8.self)
            return count
        }
        var colon = 0
        while colon < end, bytes[colon] != UInt8(ascii: ":") { colon += 1 }
        // A line without a colon, a name that is not a token or a value with control characters makes the
        // whole answer invalid (status 0): it is never relayed, so no header can split the client's response.
        guard colon > 0, colon < end, Self.isToken(bytes, 0, colon), Self.isFieldValue(bytes, colon + 1, end) else {
            pendingHead?.status = 0
            return count
        }
        let name = String(decoding: bytes[0..<colon], as: UTF8.self)
        let value = String(decoding: Self.trimmed(bytes, colon + 1, end), as: UTF8.self)
        pendingHead?.headers.append((name, value))
        return count
    }

    private static func isToken(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int) -> Bool {
        for index in start..<end {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"):
                continue
            case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"),
                UInt8(ascii: "'"), UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."),
                UInt8(ascii: "^"), UInt8(ascii: "_"), UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
                continue
            default:
                return false
            }
        }
        return true
    }

    /// Visible characters, spaces, tabs and obs-text (RFC 9110 field-value); no CR, LF, NUL or other controls.
    private static func isFieldValue(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int) -> Bool {
        for index in start..<end {
            let byte = bytes[index]
            if byte < 0x20, byte != 0x09 { return false }
            if byte == 0x7F { return false }
        }
        return true
    }

    private static func trimmed(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int)
        -> UnsafeRawBufferPointer.SubSequence
    {
        var start = start
        var end = end
        while start < end, bytes[start] == UInt8(ascii: " ") || bytes[start] == UInt8(ascii: "\t") { start += 1 }
        while end > start, bytes[end - 1] == UInt8(ascii: " ") || bytes[end - 1] == UInt8(ascii: "\t") { end -= 1 }
        return bytes[start..<end]
    }

    /// Takes everything gathered since the last hand-over.
    func takeEvents() -> UpstreamEvents {
        let batch = events
        events = UpstreamEvents()
        hasEvents = false
        return batch
    }

    /// Records how the exchange ended; the worker hands it over with the other events of this round.
    func complete(_ completion: UpstreamCompletion) {
        guard !finished else { return }
        finished = true
        events.trailers = trailers
        trailers = []
        events.completion = completion
        hasEvents = true
        worker.markReady(self)
    }
}
