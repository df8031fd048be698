import NIOHTTP1
import Synchronization

/// `pause_on_retry_after: consumer`: the callers an upstream told to wait (429/503 with `Retry-After`), each until
/// its own pause ends. Only that caller is answered locally meanwhile; everyone else still reaches the upstream.
/// Per instance, and bounded: past ``limit`` callers, ended pauses go first, then the ones ending soonest.
final class CallerPauses: Sendable {
    private struct Pause {
        var until: UInt64
        var status: Int
    }

    static let limit = 10_000
    private let pauses = Mutex<[String: Pause]>([:])

    /// Pauses `caller` (a ``Caller/key`` or a client address) for `seconds`, capped at ``UpstreamPool/maxPause``.
    func pause(_ caller: String, status: Int, seconds: Int) {
        let now = UpstreamPool.now()
        let until = now + UInt64(min(max(seconds, 1), UpstreamPool.maxPause)) * 1_000_000_000
        pauses.withLock { pauses in
            if pauses[caller] == nil, pauses.count >= Self.limit {
                pauses = pauses.filter { $0.value.until > now }
                if pauses.count >= Self.limit {
                    for (key, _) in pauses.sorted(by: { $0.value.until < $1.value.until }).prefix(Self.limit / 10) {
                        pauses[key] = nil
                    }
                }
            }
            pauses[caller] = Pause(until: max(until, pauses[caller]?.until ?? 0), status: status)
        }
    }

    /// The answer for `caller` while its pause runs (the upstream's status and the remaining `Retry-After`).
    func refusal(for caller: String, upstream: String) -> GatewayError? {
        let now = UpstreamPool.now()
        guard let pause = pauses.withLock({ $0[caller] }), pause.until > now else { return nil }
        let seconds = (pause.until - now + 999_999_999) / 1_000_000_000
        return GatewayError(
            status: HTTPResponseStatus(statusCode: pause.status),
            detail: "The upstream \(upstream) asked this caller to wait; try again after \(seconds) s.",
            origin: .upstream, headers: [("Retry-After", String(seconds))])
    }
}
