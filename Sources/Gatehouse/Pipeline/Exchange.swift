import GatehouseConfig
import Logging
import NIOCore
import NIOHTTP1
import UpstreamClient

/// The corridor: one request, from its head to its log line, phase after phase.
///
/// | phase        | job                                                         | may answer with       |
/// |--------------|-------------------------------------------------------------|-----------------------|
/// | accept       | request id, client address, framing and size limits         | 400 413 431           |
/// | route        | normalise the path, match host/method/path, bind params     | 400 404 405           |
/// | authenticate | API key or JWT -> caller                                    | 401 403 503           |
/// | rate limit   | every policy: leased slices, or one Redis round trip        | 429 (503 `deny`)      |
/// | direct       | a `respond` route answers here, after auth and limits       | `respond`             |
/// | cache lookup | key, fresh hit, 304, stale rules, coalescing (`+Cache`)     | cached answer         |
/// | pick target  | balancer over healthy targets, breakers, Retry-After pauses | 503 (429)             |
/// | forward      | rewrite path and headers, stream through libcurl, attempts  | 502 504               |
/// |              | (a WebSocket upgrade: a libcurl tunnel, `+WebSocket`)       | the upstream's        |
/// | cache store  | decide cacheability, store while streaming to the client    |                       |
/// | respond      | one builder of every answer's head (``RespondPhase``)       |                       |
/// | log          | access log line and metrics; always runs, once              |                       |
///
/// The phases are small types (`Phases.swift`); this class only runs them in order and carries what they decide.
/// A deciding phase goes on, answers (it throws a ``GatewayError``), or waits for a future; retries and resends
/// are decided by ``UpstreamAttempts``, and the exchange's progress is an ``ExchangeState``. All of it runs on the
/// connection's event loop; the connection (``ClientConnection``) does the I/O, backpressure and pipelining.
final class Exchange {
    var context: RequestContext
    let runtime: Runtime
    let core: GatewayCore
    let eventLoop: EventLoop
    /// The connection that answers; weak, since the exchange may outlive it in a pending callback.
    private(set) weak var connection: (any ClientConnection)?
    var state = ExchangeState()
    /// The cache's part, on a caching route.
    var cache: CacheExchange?
    /// The upstream attempts: retries, resends with a fresh token, the timeout they share, the kept body.
    private var attempts: UpstreamAttempts
    private var transfer: UpstreamTransfer?
    /// What the current transfer reports to; it lets go of this exchange once the exchange is logged, so the
    /// exchange is freed on its event loop, not by the upstream worker thread when the transfer goes.
    private var bridge: UpstreamBridge?
    /// The OAuth2 token the current attempt carries.
    private var token: String?
    /// The upstream answered 304 to the cache's revalidation: held back, the client gets the stored entry.
    private var notModified: UpstreamResponseHead?
    /// The upstream's Content-Length, if any; its body may not exceed it.
    private var declaredLength: Int?
    /// The upstream body's bytes so far.
    private var upstreamBodyBytes = 0
    /// The answer's gzip or br encoder, when the route compresses it (``CompressionPolicy``).
    private var encoder: BodyEncoder?
    /// The upstream's answer is a gRPC trailers-only answer: its head is not flushed before its end.
    private var trailersOnly = false
    /// Trailer fields that end the answer (the upstream's, or a gRPC status the gateway adds).
    private(set) var answerTrailers: HTTPHeaders?
    /// Request body that arrived while the corridor waited (a phase, a token).
    private var heldBody = CircularBuffer<ByteBuffer>()
    private var heldBodyBytes = 0
    /// The first attempt waited one tick for the end of a body of unknown length (see ``launch(_:token:)``).
    private var deferredForBodyLength = false
    /// Timers: the wait for a flight, a remote entry or a token, and the drain of a request body after an early
    /// answer.
    var waitTimer: Scheduled<Void>?
    private var drainTimer: Scheduled<Void>?
    /// A WebSocket tunnel being made: the tunnel, its bridge, the upgrade request, and the answer so far.
    struct WebSocketState {
        let tunnel: UpstreamTunnel
        let bridge: WebSocketBridge
        let upgrade: ByteBuffer
        var answer = ByteBuffer()
    }

    var webSocket: WebSocketState?
    /// The next ``DecidingPhase`` to run.
    private var nextPhase = 0
    /// The request's spans, when it is traced (``GatewayTracing``).
    private(set) var trace: RequestTrace?

    init(context: RequestContext, runtime: Runtime, core: GatewayCore, connection: any ClientConnection) {
        self.context = context
        self.runtime = runtime
        self.core = core
        self.connection = connection
        eventLoop = connection.eventLoop
        attempts = UpstreamAttempts(route: nil, method: context.head.method, timeoutMilliseconds: 30_000)
        trace = core.tracing?.begin(context.head)
    }

    /// The upstream worker paired with the connection's event loop.
    var workerIndex: Int? { connection?.workerIndex }

    /// Whether this exchange still drives its connection: the client is there and the answer is not complete.
    var isLive: Bool {
        guard let connection, !state.answerComplete else { return false }
        return connection.isServing(self)
    }

    // MARK: the phases, in order

    /// Runs the deciding phases from the next one on; a waiting phase resumes the corridor when its answer is in.
    func start() {
        let environment = PhaseEnvironment(runtime: runtime, core: core, eventLoop: eventLoop)
        do throws(GatewayError) {
            while let phase = DecidingPhase(rawValue: nextPhase) {
                nextPhase += 1
                if trace != nil, let traced = tracedPhase(phase) { trace?.begin(traced) }
                switch try phase.run(&context, environment) {
                case .next:
                    trace?.end()
                    continue
                case .answer(let direct):
                    respond(RespondPhase.head(for: direct, context), body: direct.body)
                    return
                case .wait(let update):
                    whenLive(update, waitingFor: .phase) { exchange, result in
                        exchange.trace?.end()
                        do {
                            try result.get()(&exchange.context)
                        } catch {
                            exchange.respondError(
                                error as? GatewayError
                                    ?? GatewayError(status: .serviceUnavailable, detail: "\(error)", origin: .gateway))
                            return
                        }
                        exchange.start()
                    }
                    return
                }
            }
        } catch {
            respondError(error)
            return
        }
        // direct: a `respond` route answers only now, after authentication and rate limits like any other.
        if let direct = context.route?.direct {
            respond(RespondPhase.head(for: direct, context), body: direct.body)
            return
        }
        if wantsWebSocket {
            openWebSocket()
            return
        }
        do throws(GatewayError) {
            if let cache = try CacheLookupPhase.run(&context, runtime: runtime, cache: core.cache) {
                self.cache = cache
                trace?.begin(.cache)
                lookUp(cache)
                return
            }
        } catch {
            respondError(error)
            return
        }
        forward()
    }

    /// The span a deciding phase gets when it has work to do on this request's route.
    private func tracedPhase(_ phase: DecidingPhase) -> RequestTrace.Phase? {
        guard let route = context.route else { return nil }
        switch phase {
        case .authenticate: return route.config.auth == .none ? nil : .authenticate
        case .rateLimit:
            let own = context.caller.map { runtime.consumerRateLimits[$0.id] != nil } ?? false
            return route.config.rateLimit.isEmpty && !own ? nil : .rateLimit
        default: return nil
        }
    }

    /// pick target, then forward: chooses a target and starts the first attempt (revalidating a stored entry).
    func forward() {
        trace?.end(.cache)
        do throws(GatewayError) {
            try PickTargetPhase.run(&context)
        } catch {
            respondError(error)
            return
        }
        var request = ForwardPhase.upstreamRequest(for: context, runtime: runtime)
        if let cache {
            cache.addValidators(to: &request)
            cache.facts.requestTime = HTTPDate.nowMilliseconds()
        }
        startAttempt(request)
    }

    /// Waits for `future` while the exchange waits for `wait`, then runs `next` on the event loop, unless the
    /// exchange ended meanwhile (client gone, answered). The one guard every callback of the corridor passes.
    func whenLive<Value: Sendable>(
        _ future: EventLoopFuture<Value>, waitingFor wait: ExchangeState.Wait,
        _ next: @escaping (Exchange, Result<Value, Error>) -> Void
    ) {
        state.waitingFor = wait
        let bound = NIOLoopBound((self, next), eventLoop: eventLoop)
        future.hop(to: eventLoop).whenComplete { result in
            let (exchange, next) = bound.value
            guard exchange.isLive, exchange.state.waitingFor == wait, !exchange.state.answerStarted else { return }
            exchange.state.waitingFor = nil
            next(exchange, result)
        }
    }

    /// Runs `next` after `delay` while the exchange still waits for `wait` and is live.
    func after(
        _ delay: TimeAmount, waitingFor wait: ExchangeState.Wait, _ next: @escaping (Exchange) -> Void
    ) -> Scheduled<Void> {
        let bound = NIOLoopBound((self, next), eventLoop: eventLoop)
        return eventLoop.scheduleTask(in: delay) {
            let (exchange, next) = bound.value
            guard exchange.isLive, exchange.state.waitingFor == wait else { return }
            exchange.state.waitingFor = nil
            next(exchange)
        }
    }

    // MARK: forward: the upstream attempts

    /// Starts an upstream attempt. On an upstream with `oauth2`, the attempt waits for a token when this instance
    /// holds none, within the route's timeout.
    private func startAttempt(_ request: UpstreamRequest) {
        if attempts.count == 0 {
            attempts = UpstreamAttempts(
                route: context.route, method: context.head.method, timeoutMilliseconds: context.timeoutMilliseconds)
            let head = context.head
            if !state.requestEnded, head.headers.first(name: "Expect")?.lowercased() == "100-continue" {
                connection?.write(.head(HTTPResponseHead(version: head.version, status: .continue)), flush: true)
            }
        }
        attempts.started(target: context.lease?.index, now: UpstreamPool.now())
        guard let grant = context.route?.pool?.oauth2 else {
            launch(request, token: nil)
            return
        }
        if let token = core.oauth2.heldToken(for: grant, on: eventLoop) {
            launch(request, token: token)
            return
        }
        awaitBeforeAttempt(core.oauth2.token(for: grant, on: eventLoop)) { exchange, result in
            switch result {
            case .success(let token):
                exchange.launch(request, token: token)
            case .failure(let error):
                exchange.endAttempt()
                exchange.respondError(
                    error as? GatewayError
                        ?? GatewayError(status: .badGateway, detail: "No upstream token.", origin: .upstream))
            }
        }
    }

    /// Waits for what an attempt needs first (a token, or a refused token's removal), within the route's timeout
    /// (504 past it).
    private func awaitBeforeAttempt<Value: Sendable>(
        _ future: EventLoopFuture<Value>, next: @escaping (Exchange, Result<Value, Error>) -> Void
    ) {
        let remaining = Int64(max(attempts.remainingMilliseconds(now: UpstreamPool.now()), 0))
        // The wait timer: log() cancels it however the exchange ends, so it never holds a gone exchange.
        waitTimer = after(.milliseconds(remaining), waitingFor: .attempt) { exchange in
            exchange.endAttempt()
            exchange.respondError(.upstreamTimeout)
        }
        whenLive(future, waitingFor: .attempt) { exchange, result in
            exchange.waitTimer?.cancel()
            next(exchange, result)
        }
    }

    /// The current attempt is over without an answer worth reporting.
    private func endAttempt() {
        context.lease?.record(.neutral)
        context.lease?.end()
    }

    /// Replaces the client's `Authorization` with the upstream's OAuth2 token.
    static func authorize(_ request: inout UpstreamRequest, token: String) {
        request.headers.removeAll { $0.name.caseInsensitiveEquals("Authorization") }
        request.headers.append(("Authorization", "Bearer " + token))
    }

    /// Sends the attempt, with the body kept for a resend and what arrived while the corridor waited.
    private func launch(_ request: UpstreamRequest, token: String?) {
        let remaining = attempts.remainingMilliseconds(now: UpstreamPool.now())
        guard remaining > 0 else {
            endAttempt()
            respondError(.upstreamTimeout)
            return
        }
        var request = request
        if request.bodyLength == -1, attempts.count == 1, request.mayUseHTTP2 {
            // Over HTTP/2, libcurl 7.88.1 can lose the answer to a body of unknown length that it had to wait for
            // (measured: 113 of 3200 exchanges; none with a known length). A body that ends within this event-loop
            // tick, as a gRPC unary call's does, is sent with its length; a longer stream starts streaming then.
            if state.requestEnded {
                request.bodyLength = Int64(heldBodyBytes)
            } else if !deferredForBodyLength {
                deferredForBodyLength = true
                state.waitingFor = .attempt
                waitTimer = after(.zero, waitingFor: .attempt) { $0.launch(request, token: token) }
                return
            }
        }
        request.timeoutMilliseconds = min(request.timeoutMilliseconds, remaining)
        trace?.beginUpstream(&request.headers, url: request.url, method: request.method)
        if let token {
            Self.authorize(&request, token: token)
            self.token = token
        }
        attempts.sending(request)
        // Only the current attempt's events count (``upstreamEvents(_:from:)``): an earlier attempt's bridge lets go.
        bridge?.detach()
        let bridge = UpstreamBridge(self)
        self.bridge = bridge
        let transfer = core.upstream.start(request, delegate: bridge, worker: workerIndex)
        self.transfer = transfer
        var keepReading = true
        if attempts.count > 1 {
            for buffer in attempts.replay { keepReading = transfer.sendBody(buffer) }
        }
        while let buffer = heldBody.popFirst() { keepReading = send(buffer, to: transfer) }
        heldBodyBytes = 0
        if state.requestEnded { transfer.endBody() }
        if keepReading, connection?.readingStopped == true { connection?.resumeReading() }
    }

    /// Sends request body upstream, keeping a copy while the request may be sent again.
    private func send(_ buffer: ByteBuffer, to transfer: UpstreamTransfer) -> Bool {
        attempts.sendingBody(buffer)
        return transfer.sendBody(buffer)
    }

    /// Sends the request again, to another target when `preferOther` and one is available, within what is left of
    /// the route's timeout; `after` is waited for first. False when it cannot (the current attempt then goes on).
    private func resend(preferOther: Bool, after: EventLoopFuture<Void>? = nil) -> Bool {
        guard var request = attempts.request, let pool = context.route?.pool,
            attempts.remainingMilliseconds(now: UpstreamPool.now()) > 0
        else { return false }
        let hashKey = pool.hashHeader.flatMap { context.head.headers.first(name: $0) }
        guard
            case .success(let lease) = pool.pick(
                hashKey: hashKey, excluding: preferOther ? attempts.triedTargets : [], firstAttempt: false)
        else { return false }
        transfer?.cancel()
        transfer = nil
        context.lease?.end()
        let oldBase = context.targetURL ?? ""
        request.url = lease.url + request.url.dropFirst(oldBase.count)
        context.lease = lease
        context.targetURL = lease.url
        guard let after else {
            startAttempt(request)
            return true
        }
        awaitBeforeAttempt(after) { exchange, _ in exchange.startAttempt(request) }
        return true
    }

    /// Reports an upstream answer to its target, applies `pause_on_retry_after`, and decides whether the answer goes
    /// to the client. True when the request was sent again instead.
    private func upstreamAnswered(_ head: UpstreamResponseHead) -> Bool {
        let lease = context.lease
        lease?.record(.of(status: head.status))
        guard let pool = context.route?.pool else { return false }
        switch RetryAfterPauseDecision.of(
            status: head.status, headers: head.headers, mode: pool.config.pauseOnRetryAfter,
            nowMilliseconds: HTTPDate.nowMilliseconds())
        {
        case .target(let status, let seconds):
            if let pause = lease?.pause(status: status, seconds: seconds) { core.store.announcePause(pause) }
        case .caller(let status, let seconds):
            pool.callerPauses.pause(context.callerKey, status: status, seconds: seconds)
        case nil:
            break
        }
        var next = attempts.answered(
            status: head.status, responseStarted: state.answerStarted, carriesToken: token != nil,
            budget: pool.allowRetry)
        if next == .resendWithFreshToken {
            if let token, let grant = pool.oauth2,
                let refreshed = core.oauth2.refreshAfterRefusal(of: token, for: grant, on: eventLoop)
            {
                return resend(preferOther: false, after: refreshed)
            }
            next = attempts.noFreshToken(status: head.status, budget: pool.allowRetry)
        }
        guard case .retry(let preferOther) = next else { return false }
        return resend(preferOther: preferOther)
    }

    // MARK: upstream events (on this event loop)

    /// The upstream's answer so far: its head, body and end. Streams it to the client, storing as it goes.
    func upstreamEvents(_ events: UpstreamEvents, from sender: UpstreamTransfer) {
        // A cancelled attempt's last events (a retry replaced it) are not the current answer.
        guard sender === transfer, isLive else { return }
        for interim in events.interim { relayInterim(interim) }
        if let head = events.head {
            guard (200...599).contains(head.status), !state.answerStarted else {
                transfer?.cancel()
                context.lease?.record(.failure)
                upstreamFailed(UpstreamError(kind: .reset, detail: "invalid status line"))
                return
            }
            trace?.upstreamStatus = head.status
            if upstreamAnswered(head) { return }
            if CacheInvalidation.applies(to: context) {
                context.invalidates = CacheInvalidation.targets(context, response: head.headers, runtime: runtime)
            }
            if let cache {
                if cache.revalidating, head.status == 304 {
                    notModified = head
                } else if head.status >= 500, servedStale(forFailure: head.status) {
                    return
                } else {
                    context.cacheStatus = cache.responseArrived(
                        status: head.status, upstreamHeaders: head.headers, prefix: context.cacheStatus ?? "gatehouse")
                }
            }
            if notModified == nil {
                state.answerBegan()
                context.status = head.status
                var headers = RespondPhase.headers(for: head, context)
                // The cache stores the identity answer; each client's encoding is made on the way out.
                cache?.recordHeaders(headers)
                cache?.freshen(with: head, responseHeaders: headers, on: eventLoop)
                declaredLength = headers.first(name: "Content-Length").flatMap(Int.init)
                encoder = context.route?.compression?.begin(&headers, status: head.status, request: context.head)
                let responseHead = RespondPhase.finish(
                    &headers, status: HTTPResponseStatus(statusCode: head.status), context)
                connection?.write(.head(responseHead), flush: false)
                // A gRPC status in the head is a trailers-only answer: the head waits for the end, so that both
                // leave as one HEADERS frame (``EndStreamOnHeaders``).
                trailersOnly = context.isGRPC && responseHead.headers.contains(name: "grpc-status")
            }
        }
        if notModified == nil {
            if !events.body.isEmpty, !state.answerStarted {
                transfer?.cancel()
                upstreamFailed(UpstreamError(kind: .reset, detail: "body without a status line"))
                return
            }
            for (index, chunk) in events.body.enumerated() {
                upstreamBodyBytes += chunk.readableBytes
                if let declaredLength, upstreamBodyBytes > declaredLength {
                    // More than the upstream announced: never let the excess pass as the next response.
                    abort(
                        GatewayError(
                            status: .badGateway, detail: "The upstream sent more than its Content-Length.",
                            origin: .upstream))
                    return
                }
                cache?.record(chunk)
                // What arrived together is flushed together; the end comes with the completion.
                let step: BodyEncoder.Step =
                    index < events.body.count - 1 ? .more : (events.completion == nil ? .flush : .more)
                let out = encoder.map { $0.encode(chunk, step, allocator: ByteBufferAllocator()) } ?? chunk
                context.bytesOut += out.readableBytes
                if out.readableBytes > 0 { connection?.write(.body(.byteBuffer(out)), flush: false) }
            }
        }
        if !events.trailers.isEmpty, notModified == nil {
            var trailers = HTTPHeaders()
            for (name, value) in events.trailers { trailers.add(name: name, value: value) }
            answerTrailers = trailers
        }
        if let completion = events.completion {
            upstreamCompleted(completion)
            return
        }
        if !trailersOnly { connection?.flush() }
        if connection?.isWritable == false, cache?.isRecording != true { transfer?.setResponsePaused(true) }
    }

    /// An interim answer (103 Early Hints, 102) goes on to a client that can take it (HTTP/1.1 and HTTP/2), before
    /// the final head; it is never stored.
    private func relayInterim(_ interim: UpstreamResponseHead) {
        let version = context.head.version
        guard !state.answerStarted, version.major > 1 || version.minor >= 1, !context.isGRPC else { return }
        connection?.write(.head(RespondPhase.head(forInterim: interim, context)), flush: true)
    }

    private func upstreamCompleted(_ completion: UpstreamCompletion) {
        context.upstreamMicroseconds = completion.totalMicroseconds
        transfer = nil
        if completion.error != nil { trace?.upstreamStatus = nil }
        trace?.endUpstream()
        if let error = completion.error {
            let lease = context.lease
            lease?.record(error.kind == .cancelled || error.kind == .requestBody ? .neutral : .failure)
            if let pool = context.route?.pool,
                case .retry(let preferOther) = attempts.failed(
                    GatewayError(upstream: error), responseStarted: state.answerStarted, budget: pool.allowRetry),
                resend(preferOther: preferOther)
            {
                return
            }
            lease?.end()
            upstreamFailed(error)
            return
        }
        context.lease?.end()
        // cache store: a 304 to the revalidation refreshes the stored entry, which answers; else the recording ends.
        if let notModified, let cache {
            let responseHeaders = RespondPhase.headers(for: notModified, context)
            if let entry = cache.refresh(with: notModified, responseHeaders: responseHeaders, on: eventLoop) {
                serveCached(entry, status: (context.cacheStatus ?? "gatehouse") + "; fwd-status=304")
                return
            }
        }
        if let tail = encoder?.encode(ByteBuffer(), .finish, allocator: ByteBufferAllocator()), tail.readableBytes > 0 {
            context.bytesOut += tail.readableBytes
            connection?.write(.body(.byteBuffer(tail)), flush: false)
        }
        encoder = nil
        cache?.finish(intact: true, on: eventLoop)
        guard !context.invalidates.isEmpty, (200..<400).contains(context.status) else {
            completeAnswer()
            return
        }
        // A successful unsafe request first removes the stored responses it invalidates, so the client's next read
        // cannot be answered from a stale entry.
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        let (cache, targets, loop) = (core.cache, context.invalidates, eventLoop)
        Task {
            for target in targets { _ = try? await cache.purge(route: target.route, path: target.path) }
            loop.execute {
                let exchange = bound.value
                if exchange.isLive { exchange.completeAnswer() }
            }
        }
    }

    /// The upstream wants more request body: the client may be read again.
    func upstreamWantsBody() {
        if connection?.isServing(self) == true { connection?.resumeReading() }
    }

    func upstreamFailed(_ error: UpstreamError) {
        let upstreamName = context.route?.pool?.config.name ?? "-"
        context.route?.metrics.recordUpstreamError(upstream: upstreamName, kind: "\(error.kind)")
        core.logger.debug(
            "upstream failed", metadata: ["route": "\(context.route?.config.id ?? "-")", "error": "\(error)"])
        respondError(GatewayError(upstream: error))
    }

    // MARK: the request body (from the connection)

    /// Request body from the client: to the upstream, or held while the corridor waits.
    func receivedBody(_ buffer: ByteBuffer) {
        guard !state.requestEnded else { return }
        context.bytesIn += buffer.readableBytes
        let limit = runtime.config.server.limits.maxBodyBytes
        if context.bytesIn > limit {
            respondError(.bodyTooLarge(limit: limit))
            return
        }
        if let transfer, !state.answerComplete {
            if !send(buffer, to: transfer) { connection?.stopReading() }
        } else if state.waitingFor != nil {
            // The corridor is still deciding (authentication, a cache lookup, a token): hold the body, within bounds.
            heldBody.append(buffer)
            heldBodyBytes += buffer.readableBytes
            if heldBodyBytes > UpstreamTransfer.requestBodyHighWater { connection?.stopReading() }
        }
    }

    /// The request's end arrived.
    func receivedEnd() {
        switch state.requestCompleted() {
        case .finish: finish()
        case .endUpstreamBody: transfer?.endBody()
        case .wait, .endAnswerAndDrainRequest: break
        }
    }

    /// Whether the client takes what is written changed: the upstream transfer follows (unless the cache records
    /// it: a stored answer is fetched whole).
    func writabilityChanged(writable: Bool) {
        transfer?.setResponsePaused(!writable && cache?.isRecording != true)
    }

    // MARK: respond: every answer made here, and the one error path

    /// Writes a complete answer the gateway made (direct, cached, or an error); a request body still coming is
    /// read and dropped.
    func respond(_ head: HTTPResponseHead, body: ByteBuffer?) {
        trace?.end(.cache)
        state.answerBegan()
        context.status = Int(head.status.code)
        let body = context.head.method == .HEAD ? nil : body
        context.bytesOut = body?.readableBytes ?? 0
        connection?.write(.head(head), flush: false)
        if let body { connection?.write(.body(.byteBuffer(body)), flush: false) }
        transfer?.cancel()
        transfer = nil
        completeAnswer()
    }

    /// The one way a failure reaches the client. Once the answer started, the connection closes (the failure is
    /// logged). Before, a stored entry stands in for a failure on the upstream's side when stale-if-error allows;
    /// otherwise the client gets the problem+json answer.
    func respondError(_ error: GatewayError) {
        if error.origin == .upstream, servedStale(forFailure: nil) { return }
        cache?.finish(intact: false, on: eventLoop)
        if context.isGRPC {
            respondGRPCError(error)
            return
        }
        guard !state.answerStarted else {
            abort(error)
            return
        }
        context.error = error
        if error.closeConnection { context.keepAlive = false }
        // A client waiting for 100 Continue will not send its body now: close rather than wait for it.
        if !state.requestEnded, context.bytesIn == 0,
            context.head.headers.first(name: "Expect")?.lowercased() == "100-continue"
        {
            context.keepAlive = false
        }
        let body = ByteBuffer(string: ProblemResponse.body(for: error, requestID: context.requestID))
        respond(RespondPhase.head(for: error, bodyLength: body.readableBytes, context), body: body)
    }

    /// A gRPC call's failure: a trailers-only answer, or trailers that end the messages already sent.
    private func respondGRPCError(_ error: GatewayError) {
        context.error = error
        guard state.answerStarted else {
            respond(RespondPhase.grpcHead(for: error, context), body: nil)
            return
        }
        transfer?.cancel()
        transfer = nil
        var trailers = HTTPHeaders()
        trailers.add(name: "grpc-status", value: String(GRPC.status(for: error.status)))
        trailers.add(name: "grpc-message", value: GRPC.encodeMessage(error.detail))
        answerTrailers = trailers
        completeAnswer()
    }

    /// The whole answer has been produced: finish now, or, while the request body is still coming, end the answer
    /// and drop the rest of the body (the exchange finishes at its end, or the connection closes after a while).
    func completeAnswer() {
        switch state.answerCompleted(keepAlive: context.keepAlive) {
        case .finish:
            finish()
        case .endAnswerAndDrainRequest:
            connection?.write(.end(answerTrailers), flush: true)
            // An HTTP/1.1 request that declared no body ends with its head: its end is already on its way.
            if context.head.version.major == 1, !context.declaresBody {
                connection?.resumeReading()
                return
            }
            let limit = runtime.config.server.limits.headerTimeout.nanoseconds
            let bound = NIOLoopBound(self, eventLoop: eventLoop)
            drainTimer = eventLoop.scheduleTask(in: .nanoseconds(limit)) {
                let exchange = bound.value
                if exchange.connection?.isServing(exchange) == true { exchange.abort(nil) }
            }
            connection?.resumeReading()
        case .wait, .endUpstreamBody:
            break
        }
    }

    /// The answer and the request are complete: log, and hand the connection back.
    private func finish() {
        drainTimer?.cancel()
        log()
        connection?.exchangeFinished(self, endWritten: state.answerEndWritten)
    }

    /// The answer cannot be completed: the connection closes; `error` says why, for the log.
    func abort(_ error: GatewayError?) {
        if let error { context.error = error }
        state.abandoned()
        drainTimer?.cancel()
        transfer?.cancel()
        transfer = nil
        log()
        connection?.exchangeAborted(self)
    }

    /// The client went away (the connection is gone).
    func clientGone() {
        transfer?.cancel()
        transfer = nil
        // 499: the client went away before an answer started (nginx's convention).
        if !state.answerStarted { context.status = 499 }
        state.abandoned()
        drainTimer?.cancel()
        log()
    }

    // MARK: log

    /// The log phase: runs once per exchange, however it ended.
    func log() {
        guard state.markLogged() else { return }
        webSocket?.tunnel.close()
        context.lease?.record(.neutral)
        context.lease?.end()
        // Whatever happened, requests waiting for this one's flight must not wait on.
        cache?.land(nil)
        waitTimer?.cancel()
        bridge?.detach()
        bridge = nil
        trace?.finish(context)
        trace = nil
        LogPhase.run(&context, gateway: core)
    }
}

/// What an exchange needs from the connection it answers on: the HTTP/1.1 handler today, an HTTP/2 stream next.
/// All calls happen on ``eventLoop``.
protocol ClientConnection: AnyObject {
    var eventLoop: EventLoop { get }
    /// The upstream worker paired with this connection's event loop.
    var workerIndex: Int? { get }
    /// Whether the client takes what is written now.
    var isWritable: Bool { get }
    /// Whether `exchange` is still the one this connection serves (the client is there).
    func isServing(_ exchange: Exchange) -> Bool
    func write(_ part: HTTPServerResponsePart, flush: Bool)
    func flush()
    /// Request body backpressure: read the client again, or stop reading it.
    func resumeReading()
    func stopReading()
    /// Reading the client was stopped (``stopReading()``, or a full queue of pipelined requests).
    var readingStopped: Bool { get }
    /// The exchange is over and logged; its answer's end is written unless `endWritten`. The connection goes on
    /// with the next request, or closes.
    func exchangeFinished(_ exchange: Exchange, endWritten: Bool)
    /// The exchange could not be completed and is logged: the connection closes.
    func exchangeAborted(_ exchange: Exchange)
    /// The upstream switched to WebSocket: `handler` takes the connection over from the HTTP handlers.
    func becomeTunnel(_ handler: TunnelHandler)
}

/// Receives a transfer's events on the exchange's event loop and passes them on.
final class UpstreamBridge: UpstreamTransferDelegate {
    /// The exchange, until it is logged (``detach()``); touched on its event loop only.
    private let exchange: NIOLoopBoundBox<Exchange?>
    let eventLoop: EventLoop

    init(_ exchange: Exchange) {
        self.exchange = NIOLoopBoundBox(exchange, eventLoop: exchange.eventLoop)
        eventLoop = exchange.eventLoop
    }

    func detach() { exchange.value = nil }

    func upstreamTransfer(_ transfer: UpstreamTransfer, received events: UpstreamEvents) {
        exchange.value?.upstreamEvents(events, from: transfer)
    }

    func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer) {
        exchange.value?.upstreamWantsBody()
    }
}
