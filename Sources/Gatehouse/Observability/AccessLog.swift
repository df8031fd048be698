import Foundation
import Synchronization

/// Writes one JSON line per request from a background thread, so event loops never wait on the log's file.
final class AccessLog: Sendable {
    private struct State {
        var pending: [UInt8] = []
        var closed = false
    }

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

    /// Queues one line (without its newline).
    func write(_ line: String) {
        let first = state.withLock { state -> Bool in
            let wasEmpty = state.pending.isEmpty
            state.pending.append(contentsOf: line.utf8)
            state.pending.append(UInt8(ascii: "\n"))
            return wasEmpty
        }
        if first { signal.signal() }
    }

    /// Writes what is queued and stops the thread.
    func close() {
        state.withLock { $0.closed = true }
        signal.signal()
        done.wait()
    }

    private func run() {
        while true {
            signal.wait()
            let (bytes, closed) = state.withLock { state -> ([UInt8], Bool) in
                defer { state.pending.removeAll(keepingCapacity: true) }
                return (state.pending, state.closed)
            }
            var offset = 0
            while offset < bytes.count {
                let written = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
                if written <= 0 { break }
                offset += written
            }
            if closed { break }
        }
        if ownsFD { Glibc.close(fd) }
        done.signal()
    }
}
