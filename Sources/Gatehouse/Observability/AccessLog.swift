import CoreFoundation
import Foundation
import Synchronization

/// Writes one JSON line per request from a background thread, so event loops never wait on the log's file.
///
/// Lines are appended to a buffer under a lock (a copy, no wake-up); the thread writes the buffer every
/// ``flushInterval``, or at once when it holds ``flushBytes``, like nginx's `access_log ... buffer= flush=`.
final class AccessLog: Sendable {
    private struct State {
        var pending: [UInt8] = []
        var closed = false
        var dropped = 0
    }

    /// Lines dropped because the destination took nothing for too long.
    var dropped: Int { state.withLock { $0.dropped } }

    /// How long a line may wait before it is written.
    static let flushInterval = DispatchTimeInterval.milliseconds(100)
    /// How much may wait before the thread is woken to write it.
    static let flushBytes = 64 * 1024
    /// How much may wait at most: while the file or pipe takes nothing, lines past this are dropped (and counted
    /// in ``dropped``) rather than held without bound.
    static let maximumPendingBytes = 16 * 1024 * 1024

    private let state = Mutex(State())
    private let signal = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)
    private let fd: Int32
    private let ownsFD: Bool

    /// `stdout`, `off` (nil), or a file path opened for appending.
    static func open(_ destination: String) -> AccessLog? {
        switch destination {
        case "off": return nil
        case "stdout": return AccessLog(fd: STDOUT_FILENO, ownsFD: false)
        default:
            let fd = Glibc.open(destination, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
            return fd >= 0 ? AccessLog(fd: fd, ownsFD: true) : nil
        }
    }

    private init(fd: Int32, ownsFD: Bool) {
        self.fd = fd
        self.ownsFD = ownsFD
        let thread = Thread { [self] in run() }
        thread.name = "gatehouse-access-log"
        thread.start()
    }

    /// Queues one line; the newline is added here.
    func write(_ line: AccessLogLine) {
        let full = state.withLock { state -> Bool in
            guard state.pending.count + line.bytes.count < Self.maximumPendingBytes else {
                state.dropped += 1
                return false
            }
            let wasBelow = state.pending.count < Self.flushBytes
            state.pending.append(contentsOf: line.bytes)
            state.pending.append(UInt8(ascii: "\n"))
            return wasBelow && state.pending.count >= Self.flushBytes
        }
        if full { signal.signal() }
    }

    /// Writes what is queued and stops the thread.
    func close() {
        state.withLock { $0.closed = true }
        signal.signal()
        done.wait()
    }

    private func run() {
        var bytes: [UInt8] = []
        while true {
            _ = signal.wait(timeout: .now() + Self.flushInterval)
            let closed = state.withLock { state -> Bool in
                swap(&bytes, &state.pending)
                return state.closed
            }
            var offset = 0
            while offset < bytes.count {
                let written = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
                if written < 0, errno == EINTR || errno == EAGAIN {
                    // Interrupted, or a non-blocking pipe that is full: try again shortly.
                    if errno == EAGAIN { usleep(1000) }
                    continue
                }
                if written <= 0 { break }
                offset += written
            }
            // The buffer goes back as the next one to fill, its capacity kept.
            bytes.removeAll(keepingCapacity: true)
            if closed { break }
        }
        if ownsFD { Glibc.close(fd) }
        done.signal()
    }
}

/// One access-log line built as bytes: JSON strings escaped, numbers and the timestamp written digit by digit,
/// with no intermediate strings.
struct AccessLogLine {
    private(set) var bytes: [UInt8] = []

    init() { bytes.reserveCapacity(384) }

    mutating func append(_ text: StaticString) {
        text.withUTF8Buffer { bytes.append(contentsOf: $0) }
    }

    /// A JSON string: quotes, backslashes and control characters escaped.
    mutating func appendString(_ value: some StringProtocol) {
        bytes.append(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"):
                bytes.append(UInt8(ascii: "\\"))
                bytes.append(byte)
            case UInt8(ascii: "\n"): append("\\n")
            case UInt8(ascii: "\r"): append("\\r")
            case UInt8(ascii: "\t"): append("\\t")
            case 0..<0x20:
                append("\\u00")
                appendHexDigit(byte >> 4)
                appendHexDigit(byte & 0xF)
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }

    /// A JSON string, or `null`.
    mutating func appendString(orNull value: (some StringProtocol)?) {
        if let value { appendString(value) } else { append("null") }
    }

    mutating func appendInteger(_ value: some BinaryInteger) {
        if value < 0 { bytes.append(UInt8(ascii: "-")) }
        appendDigits(UInt64(value.magnitude), width: 1)
    }

    /// Microseconds as milliseconds with three decimals: `12.345`.
    mutating func appendMilliseconds(microseconds: Int64) {
        let value = UInt64(max(0, microseconds))
        appendDigits(value / 1000, width: 1)
        bytes.append(UInt8(ascii: "."))
        appendDigits(value % 1000, width: 3)
    }

    /// The wall-clock time in UTC, `2026-11-29T03:46:08.123Z`, as a JSON string.
    mutating func appendTimeNow() {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        var seconds = spec.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        bytes.append(UInt8(ascii: "\""))
        appendDigits(UInt64(max(0, parts.tm_year + 1900)), width: 4)
        bytes.append(UInt8(ascii: "-"))
        appendDigits(UInt64(max(0, parts.tm_mon + 1)), width: 2)
        bytes.append(UInt8(ascii: "-"))
        appendDigits(UInt64(max(0, parts.tm_mday)), width: 2)
        bytes.append(UInt8(ascii: "T"))
        appendDigits(UInt64(max(0, parts.tm_hour)), width: 2)
        bytes.append(UInt8(ascii: ":"))
        appendDigits(UInt64(max(0, parts.tm_min)), width: 2)
        bytes.append(UInt8(ascii: ":"))
        appendDigits(UInt64(max(0, parts.tm_sec)), width: 2)
        bytes.append(UInt8(ascii: "."))
        appendDigits(UInt64(max(0, spec.tv_nsec / 1_000_000)), width: 3)
        append("Z\"")
    }

    /// Decimal digits, zero-padded to `width`.
    private mutating func appendDigits(_ value: UInt64, width: Int) {
        var count = 1
        var probe = value
        while probe >= 10 {
            probe /= 10
            count += 1
        }
        count = max(count, width)
        bytes.append(contentsOf: repeatElement(UInt8(ascii: "0"), count: count))
        var rest = value
        var index = bytes.count - 1
        while rest > 0 {
            bytes[index] = UInt8(ascii: "0") + UInt8(rest % 10)
            rest /= 10
            index -= 1
        }
    }

    private mutating func appendHexDigit(_ nibble: UInt8) {
        bytes.append(nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10)
    }
}
