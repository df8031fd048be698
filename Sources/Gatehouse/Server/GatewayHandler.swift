import GatehouseConfig
import NIOCore
import NIOHTTP1
import UpstreamClient

/// Serves the requests of one client connection, one at a time, answering pipelined requests in order.
///
/// Runs the ``Pipeline`` phases, streams the request body to the upstream and the response back, with
/// backpressure both ways: a full upstream queue stops reading the client, and a client that cannot take more
/// pauses the upstream transfer. Requests that arrive while one is being answered wait in a small queue; reading
/// stops only when that queue is full, so a connection without pipelining never toggles its read interest.
final class GatewayHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// One request in progress.
    final class Exchange {
        var context: RequestContext
        let runtime: Runtime
        var transfer: UpstreamTransfer?
        var requestEnded = false
        var responseStarted = false
        var responseEnded = false
        /// The response's end was written before the request body ended; the rest of the body is dropped.
        var endWritten = false
        /// The access-log line and metrics were written; they are written once.
        var logged = false
        /// The Content-Length sent to the client, if any; the body may not exceed it.
        var declaredLength: Int?
        /// Closes the connection if the rest of a request body does not come after an early answer.
        var lingerTimer: Scheduled<Void>?
        /// The cache's part, on a caching route.
        var cache: CacheExchange?
        /// Waiting for the cache lookup or for another request's flight; the timer bounds the wait for a flight.
        var waiting = false
        var waitTimer: Scheduled<Void>?
        /// The upstream answered 304 to the cache's revalidation: held back, the client gets the stored entry.
        var notModified: UpstreamResponseHead?
        /// Request body that arrived before the upstream exchange started.
        var heldBody = CircularBuffer<ByteBuffer>()
        var heldBodyBytes = 0
        /// The upstream attempts: retries, resends with a fresh token, the timeout they share, the kept body.
        var attempts: UpstreamAttempts
        /// The OAuth2 token the current attempt carries.
        var token: String?
        /// Waiting for what the next attempt needs (a token); the request body is held meanwhile.
        var awaitingUpstream = false
        var isHead: Bool { context.head.method == .HEAD }

        init(context: RequestContext, runtime: Runtime) {
            self.context = context
            self.runtime = runtime
            attempts = UpstreamAttempts(route: nil, method: context.head.method)
        }
    }

    let core: GatewayCore
    private let activity: ConnectionActivity
    private var connection: ConnectionInfo?
    /// The upstream worker paired with this connection's event loop.
    var workerIndex: Int?
    private let tls: Bool
    var exchange: Exchange?
    var channelContext: ChannelHandlerContext?
    var readBlocked = false
    private var readPending = false
    private var draining = false
    var closed = false
    /// Parts of pipelined requests that arrived while the current one is answered.
    private var queued = CircularBuffer<HTTPServerRequestPart>()
    private var queuedBytes = 0
    private var servingQueue = false
    /// Queued pipelined bytes past which the client is not read until the queue drains.
    private static let queueLimit = 64 * 1024

    /// Makes the request decoder this connection restarts after an upgrade request.
    private let makeDecoder: () -> ByteToMessageHandler<HTTPRequestDecoder>
    /// The last request head received was an upgrade request (see ``isUpgradeRequest(_:)``).
    private var receivedUpgrade = false

    init(
        core: GatewayCore, activity: ConnectionActivity, tls: Bool,
        makeDecoder: @escaping () -> ByteToMessageHandler<HTTPRequestDecoder>
    ) {
        self.core = core
        self.activity = activity
        self.tls = tls
        self.makeDecoder = makeDecoder
    }

    func handlerAdded(context: ChannelHandlerContext) {
        channelContext = context
        connection = ConnectionInfo(remote: context.channel.remoteAddress, tls: tls)
        workerIndex = core.workerIndex(for: context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        channelContext = nil
    }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch part {
        case .head(let head): receivedUpgrade = Self.isUpgradeRequest(head)
        case .end where receivedUpgrade:
            // The decoder stopped at this request's end, whether it is served now or waits in the queue.
            receivedUpgrade = false
            restartDecoder(context: context)
        default: break
        }
        if !queued.isEmpty || exchange?.requestEnded == true || (exchange == nil && !context.channel.isWritable) {
            // A pipelined request: it is answered after the current one, and only once the client takes answers
            // again (a client that sends and never reads must not fill the gateway's memory with answers).
            queued.append(part)
            queuedBytes += Self.size(of: part)
            if queuedBytes > Self.queueLimit { readBlocked = true }
            return
        }
        serve(part, context: context)
    }

    private func serve(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            activity.headComplete()
            requestHead(head, context: context)
        case .body(let buffer):
            requestBody(buffer, context: context)
        case .end:
            requestEnd(context: context)
        }
    }

    /// Whether the HTTP parser takes `head` for a protocol switch (llhttp's rule: CONNECT, or `Upgrade` with
    /// `Connection: upgrade`): it then stops parsing, and everything the client sends after it would pile up.
    static func isUpgradeRequest(_ head: HTTPRequestHead) -> Bool {
        head.method == .CONNECT
            || (head.headers.contains(name: "Upgrade")
                && ForwardPhase.connectionTokens(head.headers).contains("upgrade"))
    }

    /// The gateway switches no protocol, so after an upgrade request a fresh decoder takes over the bytes the
    /// stopped one holds (it forwards them when removed, after the parts it delivered) and the connection goes on
    /// with HTTP/1.1.
    private func restartDecoder(context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((context, makeDecoder), eventLoop: context.eventLoop)
        context.eventLoop.execute {
            let (context, makeDecoder) = loopBound.value
            let pipeline = context.pipeline.syncOperations
            guard let old = try? pipeline.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self) else { return }
            do {
                try pipeline.addHandler(makeDecoder(), position: .after(old))
                pipeline.removeHandler(old, promise: nil)
            } catch {
                context.close(promise: nil)
            }
        }
    }

    private static func size(of part: HTTPServerRequestPart) -> Int {
        switch part {
        case .head(let head):
            return head.uri.utf8.count + head.headers.reduce(0) { $0 + $1.name.utf8.count + $1.value.utf8.count }
        case .body(let buffer): return buffer.readableBytes
        case .end: return 0
        }
    }

    /// Serves queued pipelined parts until one of them starts an exchange that is still being answered.
    private func serveQueue(context: ChannelHandlerContext) {
        guard !servingQueue else { return }
        servingQueue = true
        defer { servingQueue = false }
        while !closed, exchange?.requestEnded != true, exchange != nil || context.channel.isWritable,
            let part = queued.popFirst()
        {
            queuedBytes -= Self.size(of: part)
            serve(part, context: context)
        }
    }

    private func requestHead(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let runtime = core.runtime
        let connection = self.connection ?? ConnectionInfo(remote: context.channel.remoteAddress, tls: tls)
        let clientID = head.headers.first(name: "X-Request-ID")
        let requestID = clientID.flatMap { RequestID.isAcceptable($0) ? $0 : nil } ?? RequestID.make()
        var requestContext = RequestContext(
            requestID: requestID, head: head, connection: connection, trusted: runtime.trustedProxies)
        if draining { requestContext.keepAlive = false }
        let exchange = Exchange(context: requestContext, runtime: runtime)
        self.exchange = exchange
        do throws(GatewayError) {
            let decision = try Pipeline.beforeForward(
                &exchange.context, runtime: runtime, core: core, eventLoop: context.eventLoop)
            proceed(with: decision, exchange, context: context)
        } catch {
            respondError(error, exchange, context: context)
        }
    }

    /// Carries out what the pipeline decided before forwarding.
    func proceed(with decision: Pipeline.Decision, _ exchange: Exchange, context: ChannelHandlerContext) {
        switch decision {
        case .direct(let answer):
            respondDirect(answer, exchange, context: context)
        case .authenticating(let outcome):
            resume(after: outcome, exchange, context: context) { result, exchange, handler, loop throws(GatewayError) in
                try Pipeline.afterAuthentication(
                    result, &exchange.context, runtime: exchange.runtime, core: handler.core, eventLoop: loop)
            }
        case .rateLimiting(let outcome):
            resume(after: outcome, exchange, context: context) { result, exchange, handler, _ throws(GatewayError) in
                try Pipeline.afterRateLimit(result, &exchange.context, runtime: exchange.runtime, core: handler.core)
            }
        case .lookUp(let cache):
            exchange.cache = cache
            lookUp(cache, exchange, context: context)
        case .forward(let request):
            startTransfer(request, exchange, context: context)
        }
    }

    /// Waits for a phase that needs an answer from elsewhere, then proceeds with what `next` decides, unless the
    /// exchange ended meanwhile (client gone, request answered).
    private func resume<Value: Sendable>(
        after outcome: EventLoopFuture<Value>, _ exchange: Exchange, context: ChannelHandlerContext,
        next:
            @escaping (Result<Value, Error>, Exchange, GatewayHandler, EventLoop) throws(GatewayError) ->
            Pipeline
            .Decision
    ) {
        exchange.waiting = true
        let bound = NIOLoopBound((self, exchange, next), eventLoop: context.eventLoop)
        outcome.whenComplete { result in
            let (handler, exchange, next) = bound.value
            guard let context = handler.channelContext, handler.exchange === exchange, !handler.closed,
                exchange.waiting, !exchange.responseStarted
            else { return }
            exchange.waiting = false
            do throws(GatewayError) {
                handler.proceed(
                    with: try next(result, exchange, handler, context.eventLoop), exchange, context: context)
            } catch {
                handler.respondError(error, exchange, context: context)
            }
        }
    }

    /// Starts an upstream attempt, with whatever request body arrived while the pipeline was waiting. On an
    /// upstream with `oauth2`, the attempt waits for a token when this instance holds none.
    func startTransfer(_ request: UpstreamRequest, _ exchange: Exchange, context: ChannelHandlerContext) {
        let pool = exchange.context.route?.pool
        if exchange.attempts.count == 0 {
            exchange.attempts = UpstreamAttempts(route: exchange.context.route, method: exchange.context.head.method)
            let head = exchange.context.head
            if !exchange.requestEnded, head.headers.first(name: "Expect")?.lowercased() == "100-continue" {
                context.writeAndFlush(
                    wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
            }
        }
        exchange.attempts.started(target: exchange.context.lease?.index, now: UpstreamPool.now())
        guard let grant = pool?.oauth2 else {
            launch(request, token: nil, exchange, context: context)
            return
        }
        if let token = core.oauth2.heldToken(for: grant, on: context.eventLoop) {
            launch(request, token: token, exchange, context: context)
            return
        }
        awaitBeforeAttempt(core.oauth2.token(for: grant, on: context.eventLoop), exchange, context: context) {
            result, handler, exchange, context in
            switch result {
            case .success(let token):
                handler.launch(request, token: token, exchange, context: context)
            case .failure(let error):
                handler.endAttempt(exchange)
                handler.respondError(
                    error as? GatewayError
                        ?? GatewayError(status: .badGateway, detail: "No upstream token.", origin: .upstream),
                    exchange, context: context)
            }
        }
    }

    /// Waits for what an attempt needs first (a token, or a refused token's removal), within the route's
    /// timeout (504 past it), then runs `next` unless the exchange ended meanwhile.
    private func awaitBeforeAttempt<Value: Sendable>(
        _ future: EventLoopFuture<Value>, _ exchange: Exchange, context: ChannelHandlerContext,
        next: @escaping @Sendable (Result<Value, Error>, GatewayHandler, Exchange, ChannelHandlerContext) -> Void
    ) {
        exchange.awaitingUpstream = true
        let bound = NIOLoopBound((self, exchange), eventLoop: context.eventLoop)
        let timer = context.eventLoop.scheduleTask(in: .milliseconds(Int64(max(remainingMilliseconds(exchange), 0)))) {
            let (handler, exchange) = bound.value
            guard let context = handler.channelContext, handler.exchange === exchange, !handler.closed,
                exchange.awaitingUpstream
            else { return }
            exchange.awaitingUpstream = false
            handler.endAttempt(exchange)
            handler.respondError(.upstreamTimeout, exchange, context: context)
        }
        future.hop(to: context.eventLoop).whenComplete { result in
            timer.cancel()
            let (handler, exchange) = bound.value
            guard let context = handler.channelContext, handler.exchange === exchange, !handler.closed,
                exchange.awaitingUpstream, !exchange.responseStarted
            else { return }
            exchange.awaitingUpstream = false
            next(result, handler, exchange, context)
        }
    }

    /// What is left of the route's timeout since the first attempt started, in milliseconds.
    private func remainingMilliseconds(_ exchange: Exchange) -> Int {
        exchange.attempts.remainingMilliseconds(now: UpstreamPool.now())
    }

    /// The current attempt is over without an answer worth reporting.
    private func endAttempt(_ exchange: Exchange) {
        exchange.context.lease?.record(.neutral)
        exchange.context.lease?.end()
    }

    /// Replaces the client's `Authorization` with the upstream's OAuth2 token.
    static func authorize(_ request: inout UpstreamRequest, token: String) {
        request.headers.removeAll { $0.name.caseInsensitiveEquals("Authorization") }
        request.headers.append(("Authorization", "Bearer " + token))
    }

    private func launch(
        _ request: UpstreamRequest, token: String?, _ exchange: Exchange, context: ChannelHandlerContext
    ) {
        let remaining = remainingMilliseconds(exchange)
        guard remaining > 0 else {
            endAttempt(exchange)
            respondError(.upstreamTimeout, exchange, context: context)
            return
        }
        var request = request
        request.timeoutMilliseconds = min(request.timeoutMilliseconds, remaining)
        if let token {
            Self.authorize(&request, token: token)
            exchange.token = token
        }
        exchange.attempts.sending(request)
        let bridge = UpstreamBridge(handler: self, exchange: exchange, eventLoop: context.eventLoop)
        let transfer = core.upstream.start(request, delegate: bridge, worker: workerIndex)
        exchange.transfer = transfer
        var keepReading = true
        if exchange.attempts.count > 1 {
            for buffer in exchange.attempts.replay { keepReading = transfer.sendBody(buffer) }
        }
        while let buffer = exchange.heldBody.popFirst() { keepReading = send(buffer, exchange, to: transfer) }
        exchange.heldBodyBytes = 0
        if exchange.requestEnded { transfer.endBody() }
        if keepReading, readBlocked { resumeReading(context: context) }
    }

    /// Sends request body upstream, keeping a copy while the request may be sent again.
    private func send(_ buffer: ByteBuffer, _ exchange: Exchange, to transfer: UpstreamTransfer) -> Bool {
        exchange.attempts.sendingBody(buffer)
        return transfer.sendBody(buffer)
    }

    /// Sends the request again, to another target when `preferOther` and one is available, within what is left of
    /// the route's timeout; `after` is waited for first. False when it cannot (the current attempt then goes on).
    private func resend(
        _ exchange: Exchange, context: ChannelHandlerContext, preferOther: Bool,
        after: EventLoopFuture<Void>? = nil
    ) -> Bool {
        guard var request = exchange.attempts.request, let pool = exchange.context.route?.pool,
            remainingMilliseconds(exchange) > 0
        else { return false }
        let hashKey = pool.hashHeader.flatMap { exchange.context.head.headers.first(name: $0) }
        guard
            case .success(let lease) = pool.pick(
                hashKey: hashKey, excluding: preferOther ? exchange.attempts.triedTargets : [], firstAttempt: false)
        else { return false }
        exchange.transfer?.cancel()
        exchange.transfer = nil
        exchange.context.lease?.end()
        let oldBase = exchange.context.targetURL ?? ""
        request.url = lease.url + request.url.dropFirst(oldBase.count)
        exchange.context.lease = lease
        exchange.context.targetURL = lease.url
        guard let after else {
            startTransfer(request, exchange, context: context)
            return true
        }
        let resent = request
        awaitBeforeAttempt(after, exchange, context: context) { _, handler, exchange, context in
            handler.startTransfer(resent, exchange, context: context)
        }
        return true
    }

    /// Reports an upstream answer to its target and decides whether it goes to the client: a 401 to an OAuth2
    /// token is resent once with a fresh token, and a status listed in `retries.on` is retried. True when the
    /// request was sent again instead.
    private func upstreamAnswered(_ head: UpstreamResponseHead, _ exchange: Exchange, context: ChannelHandlerContext)
        -> Bool
    {
        let lease = exchange.context.lease
        lease?.record(.of(status: head.status))
        guard let pool = exchange.context.route?.pool else { return false }
        switch RetryAfterPauseDecision.of(
            status: head.status, headers: head.headers, mode: pool.config.pauseOnRetryAfter,
            nowMilliseconds: HTTPDate.nowMilliseconds())
        {
        case .target(let status, let seconds):
            if let pause = lease?.pause(status: status, seconds: seconds) { core.store.announcePause(pause) }
        case .caller(let status, let seconds):
            pool.callerPauses.pause(exchange.context.callerKey, status: status, seconds: seconds)
        case nil:
            break
        }
        var next = exchange.attempts.answered(
            status: head.status, responseStarted: exchange.responseStarted, carriesToken: exchange.token != nil,
            budget: pool.allowRetry)
        if next == .resendWithFreshToken {
            if let token = exchange.token, let grant = pool.oauth2,
                let refreshed = core.oauth2.refreshAfterRefusal(of: token, for: grant, on: context.eventLoop)
            {
                return resend(exchange, context: context, preferOther: false, after: refreshed)
            }
            next = exchange.attempts.noFreshToken(status: head.status, budget: pool.allowRetry)
        }
        guard case .retry(let preferOther) = next else { return false }
        return resend(exchange, context: context, preferOther: preferOther)
    }

    private func requestBody(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        guard let exchange, !exchange.requestEnded else { return }
        exchange.context.bytesIn += buffer.readableBytes
        let limit = exchange.runtime.config.server.limits.maxBodyBytes
        if exchange.context.bytesIn > limit {
            respondError(.bodyTooLarge(limit: limit), exchange, context: context)
            return
        }
        if let transfer = exchange.transfer, !exchange.responseEnded {
            if !send(buffer, exchange, to: transfer) { readBlocked = true }
        } else if exchange.waiting || exchange.awaitingUpstream {
            // The pipeline is still deciding (authentication, a cache lookup, a token): hold the body, within bounds.
            exchange.heldBody.append(buffer)
            exchange.heldBodyBytes += buffer.readableBytes
            if exchange.heldBodyBytes > UpstreamTransfer.requestBodyHighWater { readBlocked = true }
        }
    }

    private func requestEnd(context: ChannelHandlerContext) {
        guard let exchange else { return }
        exchange.requestEnded = true
        if exchange.responseEnded {
            finishExchange(exchange, context: context)
        } else {
            exchange.transfer?.endBody()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        if let exchange {
            exchange.transfer?.cancel()
            exchange.transfer = nil
            // 499: the client went away before an answer started (nginx's convention).
            if !exchange.responseStarted { exchange.context.status = 499 }
            log(exchange)
        }
        exchange = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let parserError = error as? HTTPParserError {
            let answer: GatewayError
            switch parserError {
            case .headerOverflow:
                answer = .headersTooLarge(limit: core.runtime.config.server.limits.maxHeaderBytes)
            default:
                answer = .badRequest("The request is malformed (\(parserError)).")
            }
            if let exchange, exchange.requestEnded {
                // The bad bytes belong to a later, pipelined request: answer the current one, then close.
                exchange.context.keepAlive = false
                queued.removeAll()
                queuedBytes = 0
                return
            }
            if exchange == nil || exchange?.responseStarted == false {
                let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
                let requestContext = RequestContext(
                    requestID: RequestID.make(), head: head,
                    connection: connection ?? ConnectionInfo(remote: nil, tls: tls), trusted: [])
                let exchange = self.exchange ?? Exchange(context: requestContext, runtime: core.runtime)
                exchange.transfer?.cancel()
                exchange.transfer = nil
                self.exchange = exchange
                respondError(answer, exchange, context: context)
            } else {
                abort(context: context)
            }
            return
        }
        abort(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is DrainEvent {
            draining = true
            if exchange == nil, activity.isIdle { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        let writable = context.channel.isWritable
        exchange?.transfer?.setResponsePaused(!writable && exchange?.cache?.isRecording != true)
        if writable, exchange == nil {
            serveQueue(context: context)
            // A request served from the queue decides about reading itself (its body may hold reads back).
            if exchange == nil, queuedBytes <= Self.queueLimit { resumeReading(context: context) }
        }
        context.fireChannelWritabilityChanged()
    }

    // MARK: outbound

    func read(context: ChannelHandlerContext) {
        // Between requests, nothing more is read while the client does not take the answers already written.
        if readBlocked || (!context.channel.isWritable && (exchange == nil || exchange?.requestEnded == true)) {
            readPending = true
        } else {
            context.read()
        }
    }

    func resumeReading(context: ChannelHandlerContext) {
        readBlocked = false
        if readPending {
            readPending = false
            context.read()
        }
    }

    // MARK: answers made here

    private func respondDirect(_ answer: DirectAnswer, _ exchange: Exchange, context: ChannelHandlerContext) {
        var headers = answer.headers
        headers.add(name: "X-Request-ID", value: exchange.context.requestID)
        for (name, value) in exchange.context.rateLimitHeaders { headers.add(name: name, value: value) }
        if !exchange.context.keepAlive { headers.add(name: "Connection", value: "close") }
        let head = HTTPResponseHead(version: exchange.context.head.version, status: answer.status, headers: headers)
        exchange.context.status = Int(answer.status.code)
        sendWhole(head, body: exchange.isHead ? nil : answer.body, exchange, context: context)
    }

    /// The one way a failure reaches the client. Once the answer started, the connection closes (the failure is
    /// logged). Before, a stored entry stands in for a failure on the upstream's side when stale-if-error allows;
    /// otherwise the client gets the problem+json answer.
    func respondError(_ error: GatewayError, _ exchange: Exchange, context: ChannelHandlerContext) {
        if error.origin == .upstream, servedStale(forFailure: nil, exchange, context: context) { return }
        exchange.cache?.finish(intact: false, on: context.eventLoop)
        exchange.context.error = error
        if exchange.responseStarted {
            abort(context: context)
            return
        }
        exchange.context.status = Int(error.status.code)
        if error.closeConnection { exchange.context.keepAlive = false }
        // A client waiting for 100 Continue will not send its body now: close rather than wait for it.
        if !exchange.requestEnded, exchange.context.bytesIn == 0,
            exchange.context.head.headers.first(name: "Expect")?.lowercased() == "100-continue"
        {
            exchange.context.keepAlive = false
        }
        let body = ProblemResponse.body(for: error, requestID: exchange.context.requestID)
        let buffer = context.channel.allocator.buffer(string: body)
        let head = ProblemResponse.head(
            for: error, requestID: exchange.context.requestID, bodyLength: buffer.readableBytes,
            version: exchange.context.head.version)
        var headHeaders = head.headers
        if !exchange.context.keepAlive, !error.closeConnection { headHeaders.add(name: "Connection", value: "close") }
        if exchange.context.route?.config.cache != nil {
            headHeaders.add(name: "Cache-Status", value: exchange.context.cacheStatus ?? "gatehouse; fwd=bypass")
        }
        for (name, value) in exchange.context.rateLimitHeaders { headHeaders.add(name: name, value: value) }
        let fullHead = HTTPResponseHead(version: head.version, status: head.status, headers: headHeaders)
        sendWhole(fullHead, body: exchange.isHead ? nil : buffer, exchange, context: context)
    }

    /// Writes a complete answer made by the gateway; the request body, if any, is read and dropped.
    func sendWhole(
        _ head: HTTPResponseHead, body: ByteBuffer?, _ exchange: Exchange, context: ChannelHandlerContext
    ) {
        exchange.responseStarted = true
        exchange.context.bytesOut = body?.readableBytes ?? 0
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if let body { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        exchange.transfer?.cancel()
        exchange.transfer = nil
        completeResponse(exchange, context: context)
    }

    /// The whole response has been produced. Finish now, or, while the request body is still coming, end the
    /// response and drop the rest of the body; the exchange finishes at its end.
    func completeResponse(_ exchange: Exchange, context: ChannelHandlerContext) {
        exchange.responseEnded = true
        if exchange.requestEnded || !exchange.context.keepAlive {
            finishExchange(exchange, context: context)
        } else {
            // Answered before the request body ended: read and drop the rest, but not forever.
            exchange.endWritten = true
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            let bound = NIOLoopBound((self, context, exchange), eventLoop: context.eventLoop)
            let limit = exchange.runtime.config.server.limits.headerTimeout.nanoseconds
            exchange.lingerTimer = context.eventLoop.scheduleTask(in: .nanoseconds(limit)) {
                let (handler, context, exchange) = bound.value
                if handler.exchange === exchange { handler.abort(context: context) }
            }
            resumeReading(context: context)
        }
    }

    // MARK: upstream events (on this event loop)

    func upstreamEvents(_ events: UpstreamEvents, for exchange: Exchange) {
        guard let context = channelContext, self.exchange === exchange, !closed, !exchange.responseEnded else { return }
        if let head = events.head {
            guard (200...599).contains(head.status), !exchange.responseStarted else {
                exchange.transfer?.cancel()
                exchange.context.lease?.record(.failure)
                upstreamFailed(UpstreamError(kind: .reset, detail: "invalid status line"), exchange, context: context)
                return
            }
            if upstreamAnswered(head, exchange, context: context) { return }
            if let cache = exchange.cache {
                if cache.revalidating, head.status == 304 {
                    exchange.notModified = head
                } else if head.status >= 500, servedStale(forFailure: head.status, exchange, context: context) {
                    return
                } else {
                    exchange.context.cacheStatus = cache.responseArrived(
                        status: head.status, upstreamHeaders: head.headers,
                        prefix: exchange.context.cacheStatus ?? "gatehouse")
                }
            }
            if exchange.notModified == nil {
                exchange.responseStarted = true
                exchange.context.status = head.status
                let responseHead = Pipeline.responseHead(for: head, exchange.context)
                exchange.cache?.recordHeaders(responseHead.headers)
                exchange.declaredLength = responseHead.headers.first(name: "Content-Length").flatMap(Int.init)
                context.write(wrapOutboundOut(.head(responseHead)), promise: nil)
            }
        }
        if exchange.notModified == nil {
            if !events.body.isEmpty, !exchange.responseStarted {
                exchange.transfer?.cancel()
                upstreamFailed(
                    UpstreamError(kind: .reset, detail: "body without a status line"), exchange, context: context)
                return
            }
            for chunk in events.body {
                exchange.context.bytesOut += chunk.readableBytes
                if let declared = exchange.declaredLength, exchange.context.bytesOut > declared {
                    // More than the upstream announced: never let the excess pass as the next response.
                    exchange.context.error = GatewayError(
                        status: .badGateway, detail: "The upstream sent more than its Content-Length.",
                        origin: .upstream)
                    abort(context: context)
                    return
                }
                exchange.cache?.record(chunk)
                context.write(wrapOutboundOut(.body(.byteBuffer(chunk))), promise: nil)
            }
        }
        if let completion = events.completion {
            exchange.context.upstreamMicroseconds = completion.totalMicroseconds
            exchange.transfer = nil
            if let error = completion.error {
                let lease = exchange.context.lease
                lease?.record(error.kind == .cancelled || error.kind == .requestBody ? .neutral : .failure)
                if let pool = exchange.context.route?.pool,
                    case .retry(let preferOther) = exchange.attempts.failed(
                        GatewayError(upstream: error), responseStarted: exchange.responseStarted,
                        budget: pool.allowRetry),
                    resend(exchange, context: context, preferOther: preferOther)
                {
                    return
                }
                lease?.end()
                upstreamFailed(error, exchange, context: context)
                return
            }
            exchange.context.lease?.end()
            if let notModified = exchange.notModified, let cache = exchange.cache {
                let responseHeaders = Pipeline.responseHead(for: notModified, exchange.context).headers
                if let entry = cache.refresh(with: notModified, responseHeaders: responseHeaders, on: context.eventLoop)
                {
                    let status = (exchange.context.cacheStatus ?? "gatehouse") + "; fwd-status=304"
                    serveCached(entry, status: status, exchange, context: context)
                    return
                }
            }
            exchange.cache?.finish(intact: true, on: context.eventLoop)
            finishUpstreamResponse(exchange, context: context)
            return
        }
        context.flush()
        if !context.channel.isWritable, exchange.cache?.isRecording != true {
            exchange.transfer?.setResponsePaused(true)
        }
    }

    /// The upstream's answer is complete. A successful unsafe request first removes the cached responses of its
    /// path, so the client's next read cannot be answered from a stale entry.
    private func finishUpstreamResponse(_ exchange: Exchange, context: ChannelHandlerContext) {
        guard let route = exchange.context.invalidates, (200..<400).contains(exchange.context.status) else {
            completeResponse(exchange, context: context)
            return
        }
        let bound = NIOLoopBound((self, context, exchange), eventLoop: context.eventLoop)
        let cache = core.cache
        let path = exchange.context.path
        let loop = context.eventLoop
        Task {
            _ = try? await cache.purge(route: route, path: path)
            loop.execute {
                let (handler, context, exchange) = bound.value
                guard handler.exchange === exchange, !handler.closed else { return }
                handler.completeResponse(exchange, context: context)
            }
        }
    }

    func upstreamWantsBody(for exchange: Exchange) {
        guard let context = channelContext, self.exchange === exchange else { return }
        resumeReading(context: context)
    }

    private func upstreamFailed(_ error: UpstreamError, _ exchange: Exchange, context: ChannelHandlerContext) {
        let upstreamName = exchange.context.route?.pool?.config.name ?? "-"
        exchange.context.route?.metrics.recordUpstreamError(upstream: upstreamName, kind: "\(error.kind)")
        core.logger.debug(
            "upstream failed", metadata: ["route": "\(exchange.context.route?.config.id ?? "-")", "error": "\(error)"])
        respondError(GatewayError(upstream: error), exchange, context: context)
    }

    // MARK: finishing

    /// The response is complete and the request fully read: log, write the end, then serve any pipelined
    /// request that waited, and read on.
    private func finishExchange(_ exchange: Exchange, context: ChannelHandlerContext) {
        let keepAlive = exchange.context.keepAlive && !draining
        exchange.lingerTimer?.cancel()
        log(exchange)
        self.exchange = nil
        readBlocked = false
        if keepAlive {
            activity.awaitingNextRequest()
            if !exchange.endWritten { context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil) }
            serveQueue(context: context)
            if queuedBytes > Self.queueLimit { readBlocked = true }
            if readPending, !readBlocked {
                readPending = false
                context.read()
            }
        } else if exchange.endWritten {
            context.close(promise: nil)
        } else {
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }

    /// Closes a connection whose response cannot be completed.
    private func abort(context: ChannelHandlerContext) {
        if let exchange {
            exchange.lingerTimer?.cancel()
            exchange.transfer?.cancel()
            exchange.transfer = nil
            exchange.responseEnded = true
            log(exchange)
        }
        exchange = nil
        context.close(promise: nil)
    }

    /// The log phase: runs once per exchange, however it ended.
    private func log(_ exchange: Exchange) {
        guard !exchange.logged else { return }
        exchange.logged = true
        exchange.context.lease?.record(.neutral)
        exchange.context.lease?.end()
        // Whatever happened, requests waiting for this one's flight must not wait on.
        exchange.cache?.land(nil)
        exchange.waitTimer?.cancel()
        Pipeline.log(exchange.context, gateway: core)
    }
}

/// Asks a connection to close once its current request is done (graceful shutdown).
struct DrainEvent: Sendable {}

/// Receives a transfer's events on the connection's event loop and passes them to its handler.
final class UpstreamBridge: UpstreamTransferDelegate {
    private let target: NIOLoopBound<(GatewayHandler, GatewayHandler.Exchange)>
    let eventLoop: EventLoop

    init(handler: GatewayHandler, exchange: GatewayHandler.Exchange, eventLoop: EventLoop) {
        target = NIOLoopBound((handler, exchange), eventLoop: eventLoop)
        self.eventLoop = eventLoop
    }

    func upstreamTransfer(_ transfer: UpstreamTransfer, received events: UpstreamEvents) {
        let (handler, exchange) = target.value
        // A cancelled attempt's last events (a retry replaced it) are not the current answer.
        guard exchange.transfer === transfer else { return }
        handler.upstreamEvents(events, for: exchange)
    }

    func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer) {
        let (handler, exchange) = target.value
        handler.upstreamWantsBody(for: exchange)
    }
}
