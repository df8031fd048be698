import Foundation
import GatehouseConfig
import NIOCore
import NIOHTTP1
import UpstreamClient

/// The upstream attempts of one exchange, as a value that takes events and says what to do next.
///
/// It counts the attempts and the targets they used, holds the route's timeout that all attempts share, keeps
/// the request body while the request may have to be sent again, and decides after each answer or failure
/// whether it goes to the client or the request goes out again: a retry (`retries`), or one resend with a fresh
/// OAuth2 token after a 401. It does no I/O and reads no clock: every event that needs the time carries `now`
/// (monotonic nanoseconds), so it is tested without sockets or sleeps.
struct UpstreamAttempts {
    /// What the route and its upstream allow.
    struct Policy {
        var retries: RetryPolicy?
        /// The route's timeout, shared by every attempt.
        var timeoutMilliseconds: Int
        /// The upstream takes OAuth2 tokens: a 401 to a token is answered by one resend with a fresh token.
        var oauth2: Bool
        /// RFC 9110 §9.2.2: repeating the request has the effect of one request. Only such requests are retried.
        var idempotent: Bool
    }

    /// What follows an upstream answer or failure.
    enum Next: Equatable {
        /// The answer (or the failure) goes to the client.
        case deliver
        /// Send the request again; to another target than those tried when `preferOther` and one is available.
        /// The retry budget was already charged.
        case retry(preferOther: Bool)
        /// Send the request again, once, after the OAuth2 token it carried was replaced.
        case resendWithFreshToken
    }

    /// Request bodies up to this size are kept while they may have to be sent again.
    static let replayLimit = 1 << 20

    let policy: Policy
    /// Whether this request may be sent again at all; only then is its body kept.
    let mayResend: Bool
    /// Attempts started so far, the first included.
    private(set) var count = 0
    /// The targets (indexes in the upstream's pool) the attempts used, in order.
    private(set) var triedTargets: [Int] = []
    /// The request as last sent upstream, kept for a resend.
    private(set) var request: UpstreamRequest?
    /// The request body sent so far, while it stays within ``replayLimit``.
    private(set) var replay: [ByteBuffer] = []
    private var replayBytes = 0
    private var firstStart: UInt64 = 0
    private var tokenRefreshed = false

    init(policy: Policy) {
        self.policy = policy
        mayResend = policy.oauth2 || ((policy.retries?.attempts ?? 1) > 1 && policy.idempotent)
    }

    init(route: CompiledRoute?, method: HTTPMethod, timeoutMilliseconds: Int) {
        let pool = route?.pool
        self.init(
            policy: Policy(
                retries: pool?.config.retries, timeoutMilliseconds: timeoutMilliseconds,
                oauth2: pool?.oauth2 != nil, idempotent: Self.isIdempotent(method)))
    }

    /// RFC 9110 §9.2.2: the methods whose repetition has the effect of one request.
    static func isIdempotent(_ method: HTTPMethod) -> Bool {
        switch method {
        case .GET, .HEAD, .OPTIONS, .PUT, .DELETE, .TRACE: true
        default: false
        }
    }

    // MARK: events

    /// An attempt starts (before it has what it needs, such as a token) on the target `target`.
    mutating func started(target: Int?, now: UInt64) {
        count += 1
        if count == 1 { firstStart = now }
        if let target { triedTargets.append(target) }
    }

    /// What is left of the route's timeout since the first attempt started, in milliseconds (negative when past).
    func remainingMilliseconds(now: UInt64) -> Int {
        policy.timeoutMilliseconds - Int((now &- firstStart) / 1_000_000)
    }

    /// The request goes out as `request`; it is kept while the request may be sent again.
    mutating func sending(_ request: UpstreamRequest) {
        if mayResend { self.request = request }
    }

    /// Request body goes upstream; a copy is kept while the request may be sent again and the body is small.
    mutating func sendingBody(_ buffer: ByteBuffer) {
        guard mayResend else { return }
        replayBytes += buffer.readableBytes
        if replayBytes <= Self.replayLimit {
            replay.append(buffer)
        } else {
            replay.removeAll()
        }
    }

    /// Whether the request can go out again now: nothing reached the client yet, and all its body so far is kept.
    func canResend(responseStarted: Bool) -> Bool {
        mayResend && !responseStarted && request != nil && replayBytes <= Self.replayLimit
    }

    /// The upstream answered `status`. `carriesToken`: the attempt sent an OAuth2 token. `budget` takes one retry
    /// from the upstream's retry budget (asked only when the policy allows a retry).
    mutating func answered(
        status: Int, responseStarted: Bool, carriesToken: Bool, budget: () -> Bool
    ) -> Next {
        guard !responseStarted else { return .deliver }
        if status == 401, carriesToken, policy.oauth2, !tokenRefreshed, canResend(responseStarted: false) {
            tokenRefreshed = true
            return .resendWithFreshToken
        }
        return retry(after: .status(status), preferOther: true, responseStarted: false, budget: budget)
    }

    /// A fresh token was asked for after a 401 and cannot be had now (one was refreshed moments ago): the 401 is
    /// handled as any other status.
    mutating func noFreshToken(status: Int, budget: () -> Bool) -> Next {
        retry(after: .status(status), preferOther: true, responseStarted: false, budget: budget)
    }

    /// The attempt failed without an answer. Only a failure that allows it is retried (one where the upstream
    /// cannot have received the request), and only before anything reached the client.
    mutating func failed(_ failure: GatewayError, responseStarted: Bool, budget: () -> Bool) -> Next {
        guard failure.retryAllowed else { return .deliver }
        return retry(after: .connectFailure, preferOther: true, responseStarted: responseStarted, budget: budget)
    }

    private mutating func retry(
        after condition: RetryPolicy.Condition, preferOther: Bool, responseStarted: Bool, budget: () -> Bool
    ) -> Next {
        guard let retries = policy.retries, retries.on.contains(condition), count < retries.attempts,
            policy.idempotent, canResend(responseStarted: responseStarted), budget()
        else { return .deliver }
        return .retry(preferOther: preferOther)
    }
}

/// `pause_on_retry_after`: what a 429 or 503 with `Retry-After` pauses, as a value the exchange carries out.
enum RetryAfterPauseDecision: Equatable {
    /// The target, for every caller on every instance.
    case target(status: Int, seconds: Int)
    /// Only this caller, on this instance.
    case caller(status: Int, seconds: Int)

    /// The pause an upstream answer asks for under `mode`, if any; `nowMilliseconds` (Unix time) reads a date.
    static func of(
        status: Int, headers: [(name: String, value: String)], mode: RetryAfterPause,
        nowMilliseconds: @autoclosure () -> Int64
    ) -> RetryAfterPauseDecision? {
        guard status == 429 || status == 503, mode != .off,
            let value = headers.first(where: { $0.name.caseInsensitiveEquals("Retry-After") })?.value,
            let seconds = retryAfterSeconds(value, nowMilliseconds: nowMilliseconds())
        else { return nil }
        switch mode {
        case .upstream: return .target(status: status, seconds: seconds)
        case .consumer: return .caller(status: status, seconds: seconds)
        case .off: return nil
        }
    }

    /// `Retry-After` as seconds from now: delay-seconds or an HTTP date.
    static func retryAfterSeconds(_ value: String, nowMilliseconds: Int64) -> Int? {
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if let seconds = Int(trimmed) { return seconds >= 0 ? seconds : nil }
        guard let date = HTTPDate.parse(trimmed) else { return nil }
        return Int(max(0, date - nowMilliseconds / 1000))
    }
}
