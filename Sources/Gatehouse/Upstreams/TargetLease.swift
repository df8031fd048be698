import CoreMetrics
import GatehouseConfig
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization
import UpstreamClient

/// What an attempt says about its target.
enum AttemptOutcome: Sendable {
    /// An answer that is not a failure status.
    case success
    /// No connection, a reset, a timeout, a TLS failure, or a 502, 503 or 504.
    case failure
    /// Cancelled by the gateway or the client: says nothing about the target.
    case neutral

    /// The outcome a response status stands for.
    static func of(status: Int) -> AttemptOutcome {
        status == 502 || status == 503 || status == 504 ? .failure : .success
    }
}

/// A target's `Retry-After` pause as instances tell one another through the shared store: its length, not its
/// end, so that clocks need not agree (pub/sub delivers at once or not at all).
struct TargetPause: Sendable, Equatable {
    let upstream: String
    /// The target's URL as configured.
    let target: String
    /// The status answered while paused: 429 or 503.
    let status: Int
    /// 1 to ``UpstreamPool/maxPause`` seconds, in milliseconds.
    let milliseconds: Int64

    /// `upstream`, target, status and length, one per line.
    var encoded: String { "\(upstream)\n\(target)\n\(status)\n\(milliseconds)" }

    init(upstream: String, target: String, status: Int, milliseconds: Int64) {
        self.upstream = upstream
        self.target = target
        self.status = status
        self.milliseconds = milliseconds
    }

    /// Nil for anything but what ``encoded`` makes, within its bounds: the channel is open to any Redis client.
    init?(encoded: String) {
        let lines = encoded.split(separator: "\n", omittingEmptySubsequences: false)
        guard lines.count == 4, let status = Int(lines[2]), status == 429 || status == 503,
            let milliseconds = Int64(lines[3]), (1...Int64(UpstreamPool.maxPause) * 1000).contains(milliseconds)
        else { return nil }
        self.init(upstream: String(lines[0]), target: String(lines[1]), status: status, milliseconds: milliseconds)
    }
}

/// One request's claim on a target: counts it in flight until ``end()`` and reports its outcome once.
/// Released by itself if dropped.
final class TargetLease: Sendable {
    let pool: UpstreamPool
    let index: Int
    private let probe: Bool
    private let recorded = Atomic<Bool>(false)
    private let ended = Atomic<Bool>(false)

    init(pool: UpstreamPool, index: Int, probe: Bool) {
        self.pool = pool
        self.index = index
        self.probe = probe
    }

    var url: String { pool.urls[index] }

    /// Reports the attempt's outcome; later reports are ignored.
    func record(_ outcome: AttemptOutcome) {
        guard !recorded.exchange(true, ordering: .relaxed) else { return }
        pool.record(outcome, target: index, probe: probe)
    }

    /// The target answered 429 or 503 with `Retry-After`: pauses it here, and returns the pause to announce to
    /// the other instances when it is news (see ``UpstreamPool/pause(target:status:milliseconds:)``).
    func pause(status: Int, seconds: Int) -> TargetPause? {
        let milliseconds = Int64(min(max(seconds, 1), UpstreamPool.maxPause)) * 1000
        guard pool.pause(target: index, status: status, milliseconds: milliseconds) else { return nil }
        return TargetPause(upstream: pool.config.name, target: url, status: status, milliseconds: milliseconds)
    }

    /// The attempt is over; it no longer counts in flight.
    func end() {
        guard !ended.exchange(true, ordering: .relaxed) else { return }
        pool.end(target: index)
    }

    deinit {
        record(.neutral)
        end()
    }
}
