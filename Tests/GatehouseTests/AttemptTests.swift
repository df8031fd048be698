import GatehouseConfig
import NIOCore
import Testing
import UpstreamClient

@testable import Gatehouse

/// The attempt logic of an exchange (retries, OAuth2 resends, the shared timeout, Retry-After pauses) as values:
/// no sockets, no sleeps, the clock is an argument.
@Suite struct AttemptTests {
    static let second: UInt64 = 1_000_000_000

    static func attempts(
        retries: RetryPolicy? = nil, timeout: Int = 1000, oauth2: Bool = false, idempotent: Bool = true
    ) -> UpstreamAttempts {
        var attempts = UpstreamAttempts(
            policy: .init(retries: retries, timeoutMilliseconds: timeout, oauth2: oauth2, idempotent: idempotent))
        attempts.started(target: 0, now: 5 * second)
        attempts.sending(
            UpstreamRequest(
                url: "http://a/x", method: "GET", headers: [], bodyLength: nil,
                connectTimeoutMilliseconds: 100, timeoutMilliseconds: 1000))
        return attempts
    }

    static let refused = GatewayError(upstream: UpstreamError(kind: .connect, detail: "refused"))

    static func retries(_ attempts: Int, on: [RetryPolicy.Condition] = [.connectFailure, .status(503)])
        -> RetryPolicy
    {
        RetryPolicy(attempts: attempts, on: on)
    }

    @Test func withoutRetriesEverythingIsDelivered() {
        var attempts = Self.attempts()
        #expect(!attempts.mayResend)
        #expect(attempts.answered(status: 503, responseStarted: false, carriesToken: false) { true } == .deliver)
        #expect(attempts.failed(Self.refused, responseStarted: false) { true } == .deliver)
    }

    @Test func retriesStopAtTheirCountAndOnlyOnTheirConditions() {
        var attempts = Self.attempts(retries: Self.retries(3))
        #expect(attempts.mayResend)
        #expect(attempts.answered(status: 500, responseStarted: false, carriesToken: false) { true } == .deliver)
        #expect(
            attempts.failed(GatewayError(upstream: UpstreamError(kind: .timeout, detail: "")), responseStarted: false) {
                true
            } == .deliver, "it may have been received")
        #expect(
            attempts.answered(status: 503, responseStarted: false, carriesToken: false) { true }
                == .retry(preferOther: true))
        attempts.started(target: 1, now: 5 * Self.second)
        #expect(attempts.failed(Self.refused, responseStarted: false) { true } == .retry(preferOther: true))
        attempts.started(target: 0, now: 5 * Self.second)
        #expect(attempts.count == 3)
        #expect(attempts.triedTargets == [0, 1, 0])
        #expect(attempts.failed(Self.refused, responseStarted: false) { true } == .deliver, "three attempts in all")
    }

    @Test func theBudgetIsAskedOnlyWhenThePolicyAllowsARetry() {
        var attempts = Self.attempts(retries: Self.retries(2))
        var asked = 0
        #expect(
            attempts.answered(status: 200, responseStarted: false, carriesToken: false) {
                asked += 1; return true
            }
                == .deliver)
        #expect(asked == 0)
        #expect(
            attempts.answered(status: 503, responseStarted: false, carriesToken: false) {
                asked += 1; return false
            }
                == .deliver)
        #expect(asked == 1)
    }

    @Test func aPostIsNeverRetriedAndNothingIsResentOnceTheClientHasBytes() {
        var post = Self.attempts(retries: Self.retries(3), idempotent: false)
        #expect(!post.mayResend)
        #expect(post.failed(Self.refused, responseStarted: false) { true } == .deliver)
        var get = Self.attempts(retries: Self.retries(3))
        #expect(get.failed(Self.refused, responseStarted: true) { true } == .deliver)
        #expect(get.answered(status: 503, responseStarted: true, carriesToken: false) { true } == .deliver)
    }

    @Test func aBodyPastTheReplayLimitCannotBeResent() {
        var attempts = Self.attempts(retries: Self.retries(3))
        let chunk = ByteBuffer(repeating: 0x61, count: 512 * 1024)
        attempts.sendingBody(chunk)
        attempts.sendingBody(chunk)
        #expect(attempts.replay.count == 2)
        #expect(attempts.canResend(responseStarted: false))
        attempts.sendingBody(ByteBuffer(bytes: [0x62]))
        #expect(attempts.replay.isEmpty)
        #expect(!attempts.canResend(responseStarted: false))
        #expect(attempts.failed(Self.refused, responseStarted: false) { true } == .deliver)
    }

    @Test func a401ToATokenIsResentOnceWithAFreshToken() {
        var attempts = Self.attempts(oauth2: true, idempotent: false)
        #expect(attempts.mayResend, "a token resend keeps the body, also of a POST")
        #expect(attempts.answered(status: 401, responseStarted: false, carriesToken: false) { true } == .deliver)
        #expect(
            attempts.answered(status: 401, responseStarted: false, carriesToken: true) { true }
                == .resendWithFreshToken)
        #expect(attempts.answered(status: 401, responseStarted: false, carriesToken: true) { true } == .deliver)
    }

    @Test func withoutAFreshTokenA401IsLikeAnyStatus() {
        var attempts = Self.attempts(retries: Self.retries(2, on: [.status(401)]), oauth2: true)
        #expect(
            attempts.answered(status: 401, responseStarted: false, carriesToken: true) { true }
                == .resendWithFreshToken)
        #expect(attempts.noFreshToken(status: 401) { true } == .retry(preferOther: true))
    }

    @Test func allAttemptsShareTheRoutesTimeout() {
        var attempts = Self.attempts(retries: Self.retries(3), timeout: 1000)
        #expect(attempts.remainingMilliseconds(now: 5 * Self.second) == 1000)
        #expect(attempts.remainingMilliseconds(now: 5 * Self.second + 400_000_000) == 600)
        attempts.started(target: 1, now: 5 * Self.second + 400_000_000)
        #expect(attempts.remainingMilliseconds(now: 5 * Self.second + 900_000_000) == 100)
        #expect(attempts.remainingMilliseconds(now: 6 * Self.second + 100_000_000) < 0)
    }

    @Test func retryAfterPausesWhoTheModeSays() {
        let headers = [(name: "retry-after", value: " 30 ")]
        #expect(RetryAfterPauseDecision.of(status: 429, headers: headers, mode: .off, nowMilliseconds: 0) == nil)
        #expect(
            RetryAfterPauseDecision.of(status: 429, headers: headers, mode: .upstream, nowMilliseconds: 0)
                == .target(status: 429, seconds: 30))
        #expect(
            RetryAfterPauseDecision.of(status: 503, headers: headers, mode: .consumer, nowMilliseconds: 0)
                == .caller(status: 503, seconds: 30))
        #expect(RetryAfterPauseDecision.of(status: 500, headers: headers, mode: .upstream, nowMilliseconds: 0) == nil)
        #expect(RetryAfterPauseDecision.of(status: 429, headers: [], mode: .upstream, nowMilliseconds: 0) == nil)
        let date = [(name: "Retry-After", value: "Sun, 06 Nov 1994 08:49:37 GMT")]
        #expect(
            RetryAfterPauseDecision.of(
                status: 429, headers: date, mode: .upstream, nowMilliseconds: 784_111_717_000)
                == .target(
                    status: 429, seconds: 60))
        #expect(RetryAfterPauseDecision.retryAfterSeconds("-1", nowMilliseconds: 0) == nil)
    }
}

/// The exchange's progress as a value: what the connection does when the answer or the request completes.
@Suite struct ExchangeStateTests {
    @Test func anAnswerAfterTheWholeRequestFinishesTheExchange() {
        var state = ExchangeState()
        #expect(state.requestCompleted() == .endUpstreamBody)
        state.answerBegan()
        #expect(state.answerStarted && !state.answerComplete)
        #expect(state.answerCompleted(keepAlive: true) == .finish)
        #expect(!state.answerEndWritten)
    }

    @Test func anEarlyAnswerEndsFirstAndTheExchangeFinishesWithTheRequest() {
        var state = ExchangeState()
        state.waitingFor = .phase
        #expect(state.answerCompleted(keepAlive: true) == .endAnswerAndDrainRequest)
        #expect(state.answerEndWritten)
        #expect(state.waitingFor == nil)
        #expect(state.requestCompleted() == .finish)
    }

    @Test func anEarlyAnswerOnAClosingConnectionFinishesAtOnce() {
        var state = ExchangeState()
        #expect(state.answerCompleted(keepAlive: false) == .finish)
    }

    @Test func theLogPhaseRunsOnce() {
        var state = ExchangeState()
        state.abandoned()
        #expect(state.answerComplete)
        let first = state.markLogged()
        let second = state.markLogged()
        #expect(first && !second)
    }
}
