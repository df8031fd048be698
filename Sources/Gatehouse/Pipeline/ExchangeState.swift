/// Where one exchange stands, as a value: whether the request and the answer are complete, what the exchange
/// waits for, and whether it was logged. Events return what the connection must do next; no I/O here.
struct ExchangeState: Equatable {
    /// The answer's progress.
    enum Answer: Equatable {
        case notStarted
        /// The head went out; body may follow.
        case streaming
        /// The whole answer was produced.
        case complete
    }

    /// What the exchange waits for before it can go on.
    enum Wait: Equatable {
        /// A phase's answer from elsewhere: authentication, a rate limit, a cache lookup, another request's flight,
        /// the fleet-wide lock.
        case phase
        /// What the next upstream attempt needs first (a token); the route's timeout bounds it.
        case attempt
    }

    /// What the connection does once the answer is complete or the request ended.
    enum Next: Equatable {
        /// Nothing yet.
        case wait
        /// The exchange is over: log it, and go on with the next request or close.
        case finish
        /// The answer is whole but the request body is still coming: write the answer's end now, then read and drop
        /// the rest of the body (bounded by a timer); the exchange finishes when the request ends.
        case endAnswerAndDrainRequest
        /// The request body is complete: tell the upstream.
        case endUpstreamBody
    }

    private(set) var requestEnded = false
    private(set) var answer = Answer.notStarted
    /// The answer's end was written before the request ended (``Next/endAnswerAndDrainRequest``).
    private(set) var answerEndWritten = false
    private(set) var logged = false
    var waitingFor: Wait?

    var answerStarted: Bool { answer != .notStarted }
    var answerComplete: Bool { answer == .complete }

    mutating func answerBegan() {
        if answer == .notStarted { answer = .streaming }
    }

    /// The whole answer was produced.
    mutating func answerCompleted(keepAlive: Bool) -> Next {
        answer = .complete
        waitingFor = nil
        if requestEnded || !keepAlive { return .finish }
        answerEndWritten = true
        return .endAnswerAndDrainRequest
    }

    /// The answer cannot be completed (the connection closes) or the client went away.
    mutating func abandoned() {
        answer = .complete
        waitingFor = nil
    }

    /// The request's end arrived.
    mutating func requestCompleted() -> Next {
        requestEnded = true
        return answer == .complete ? .finish : .endUpstreamBody
    }

    /// Marks the exchange logged; true only the first time (the log phase runs once, however the exchange ended).
    mutating func markLogged() -> Bool {
        defer { logged = true }
        return !logged
    }
}
