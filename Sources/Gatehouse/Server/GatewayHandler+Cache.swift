import NIOCore
import NIOHTTP1
import UpstreamClient

/// The cache's steps in a connection's exchange: the lookup, waiting for another request's flight, answering
/// from an entry, and the background refresh behind stale-while-revalidate.
extension GatewayHandler {
    /// Looks the response up; the answer comes back on this event loop.
    func lookUp(_ cache: CacheExchange, _ exchange: Exchange, context: ChannelHandlerContext) {
        exchange.waiting = true
        cache.lookupStarted = FlightBoard.now()
        let bound = NIOLoopBound((self, exchange), eventLoop: context.eventLoop)
        cache.cache.lookup(
            cache.key, headers: exchange.context.head.headers, localMilliseconds: cache.config.localTTL.milliseconds,
            mayUseLocal: !cache.requestNoCache, on: context.eventLoop
        ).whenSuccess {
            let (handler, exchange) = bound.value
            handler.lookedUp($0, exchange)
        }
    }

    private func lookedUp(_ result: ResponseCache.Lookup, _ exchange: Exchange) {
        guard let context = channelContext, self.exchange === exchange, !closed, let cache = exchange.cache else {
            return
        }
        exchange.waiting = false
        let (action, status) = cache.decide(result, now: HTTPDate.nowMilliseconds())
        switch action {
        case .serve(let entry, let status, let refresh):
            if refresh { startRefresh(cache, entry: entry, exchange, context: context) }
            serveCached(entry, status: status, exchange, context: context)
        case .forward:
            exchange.context.cacheStatus = status
            if case .unavailable = result {
                // Redis is away: serve from the upstream and store nothing.
                exchange.cache = nil
                forwardUpstream(exchange, context: context)
                return
            }
            if cache.isHead || !cache.mayLead {
                forwardUpstream(exchange, context: context)
                return
            }
            let bound = NIOLoopBound((self, exchange), eventLoop: context.eventLoop)
            let waiter = FlightBoard.Waiter(eventLoop: context.eventLoop) { entry in
                let (handler, exchange) = bound.value
                handler.flightLanded(entry, exchange)
            }
            switch cache.cache.flights.join(cache.key.flightKey, waiter: waiter, lookupStarted: cache.lookupStarted) {
            case .lead:
                cache.leadsFlight = true
                if cache.config.lockTimeout.milliseconds > 0 {
                    lockFleetWide(cache, exchange, context: context)
                } else {
                    forwardUpstream(exchange, context: context)
                }
                return
            case .pass:
                forwardUpstream(exchange, context: context)
                return
            case .landed(let entry):
                // Only what a fresh lookup could have served: no `no-cache` on either side, still fresh.
                if !cache.requestNoCache, !entry.freshness.noCache,
                    entry.freshnessLeft(now: HTTPDate.nowMilliseconds()) > 0
                {
                    answerFromFlight(entry, exchange, context: context)
                } else {
                    forwardUpstream(exchange, context: context)
                }
                return
            case .lookAgain:
                cache.forgetLookup()
                lookUp(cache, exchange, context: context)
                return
            case .wait:
                break
            }
            // Another request for this key is upstream: wait for its entry, but not past the route's timeout.
            exchange.waiting = true
            let timeout = Int64(exchange.context.route?.timeoutMilliseconds ?? 30_000)
            exchange.waitTimer = context.eventLoop.scheduleTask(in: .milliseconds(timeout)) {
                let (handler, exchange) = bound.value
                handler.flightLanded(nil, exchange)
            }
        }
    }

    /// `lock_timeout`: takes the fleet-wide lock on this miss, or, when another instance holds it, waits for the
    /// entry that instance stores. A Redis error counts as having the lock (never wait on a broken store).
    private func lockFleetWide(_ cache: CacheExchange, _ exchange: Exchange, context: ChannelHandlerContext) {
        let timeout = cache.config.lockTimeout.milliseconds
        let bound = NIOLoopBound((self, exchange), eventLoop: context.eventLoop)
        exchange.waiting = true
        let store = cache.cache.store
        let (route, name) = (cache.key.route, cache.key.lockName)
        store.cacheLock(route: route, name: name, milliseconds: timeout, on: context.eventLoop).whenComplete { result in
            let (handler, exchange) = bound.value
            guard let context = handler.channelContext, handler.exchange === exchange, !handler.closed,
                let cache = exchange.cache
            else {
                if (try? result.get()) == true { store.cacheUnlock(route: route, name: name, on: bound.eventLoop) }
                return
            }
            exchange.waiting = false
            switch result {
            case .success(true):
                cache.holdsLock = context.eventLoop
                handler.forwardUpstream(exchange, context: context)
            case .success(false):
                let deadline = NIODeadline.now() + .milliseconds(timeout)
                handler.awaitRemoteEntry(cache, exchange, deadline: deadline, context: context)
            case .failure:
                handler.forwardUpstream(exchange, context: context)
            }
        }
    }

    /// Polls for the entry another instance is fetching; goes upstream when its lock is gone without an entry,
    /// or at the deadline.
    private func awaitRemoteEntry(
        _ cache: CacheExchange, _ exchange: Exchange, deadline: NIODeadline, context: ChannelHandlerContext
    ) {
        exchange.waiting = true
        let bound = NIOLoopBound((self, exchange), eventLoop: context.eventLoop)
        let loop = context.eventLoop
        let headers = exchange.context.head.headers
        exchange.waitTimer = loop.scheduleTask(in: .milliseconds(20)) {
            let (handler, exchange) = bound.value
            guard handler.exchange === exchange, !handler.closed, exchange.waiting, let cache = exchange.cache else {
                return
            }
            let store = cache.cache.store
            cache.cache.lookup(cache.key, headers: headers, localMilliseconds: 0, mayUseLocal: false, on: loop)
                .and(store.cacheLockHeld(route: cache.key.route, name: cache.key.lockName, on: loop))
                .whenComplete { result in
                    let (handler, exchange) = bound.value
                    guard let context = handler.channelContext, handler.exchange === exchange, !handler.closed,
                        exchange.waiting, let cache = exchange.cache
                    else { return }
                    exchange.waiting = false
                    let now = HTTPDate.nowMilliseconds()
                    if case .success((.found(let entry, _), _)) = result, entry.freshnessLeft(now: now) > 0 {
                        cache.metrics.coalesced.increment()
                        cache.land(entry)
                        handler.serveCached(entry, status: "gatehouse; fwd=miss; collapsed", exchange, context: context)
                    } else if case .success((_, true)) = result, NIODeadline.now() < deadline {
                        handler.awaitRemoteEntry(cache, exchange, deadline: deadline, context: context)
                    } else {
                        handler.forwardUpstream(exchange, context: context)
                    }
                }
        }
    }

    /// The flight this request waited for landed (or the wait timed out): answer from its entry, or go upstream.
    private func flightLanded(_ entry: CacheEntry?, _ exchange: Exchange) {
        guard let context = channelContext, self.exchange === exchange, !closed, exchange.waiting else { return }
        exchange.waiting = false
        exchange.waitTimer?.cancel()
        answerFromFlight(entry, exchange, context: context)
    }

    /// Answers with the entry another request fetched when it suits this request's Vary headers, else goes
    /// upstream.
    private func answerFromFlight(_ entry: CacheEntry?, _ exchange: Exchange, context: ChannelHandlerContext) {
        let headers = exchange.context.head.headers
        if let entry, let cache = exchange.cache,
            entry.vary.allSatisfy({ headers[$0.name].joined(separator: ", ") == $0.value })
        {
            cache.metrics.coalesced.increment()
            serveCached(entry, status: "gatehouse; fwd=miss; collapsed", exchange, context: context)
            return
        }
        forwardUpstream(exchange, context: context)
    }

    /// Picks a target and starts the upstream exchange, revalidating the stored entry when there is one.
    func forwardUpstream(_ exchange: Exchange, context: ChannelHandlerContext) {
        do throws(GatewayError) {
            var request = try Pipeline.forward(&exchange.context, runtime: exchange.runtime)
            if let cache = exchange.cache {
                cache.addValidators(to: &request)
                cache.facts.requestTime = HTTPDate.nowMilliseconds()
            }
            startTransfer(request, exchange, context: context)
        } catch {
            respondError(error, exchange, context: context)
        }
    }

    /// Answers from a stored entry: 304 when the client's own conditional matches it, else the whole response.
    func serveCached(_ entry: CacheEntry, status: String, _ exchange: Exchange, context: ChannelHandlerContext) {
        exchange.context.cacheStatus = status
        let notModified = CachePolicy.notModified(exchange.context.head.headers, entry: entry)
        var headers = HTTPHeaders()
        headers.reserveCapacity(entry.headers.count + 5)
        for (name, value) in entry.headers where !notModified || Self.keptOnNotModified(name) {
            headers.add(name: name, value: value)
        }
        let age = max(0, CacheExchange.seconds(entry.age(now: HTTPDate.nowMilliseconds())))
        headers.add(name: "Age", value: String(age))
        headers.add(name: "Cache-Status", value: status)
        headers.add(name: "X-Request-ID", value: exchange.context.requestID)
        for (name, value) in exchange.context.rateLimitHeaders { headers.add(name: name, value: value) }
        let hasBody = !notModified && entry.status != 204 && entry.status != 304
        if hasBody { headers.add(name: "Content-Length", value: String(entry.body.readableBytes)) }
        if !exchange.context.keepAlive { headers.add(name: "Connection", value: "close") }
        let code = notModified ? 304 : entry.status
        exchange.context.status = code
        let head = HTTPResponseHead(
            version: exchange.context.head.version, status: HTTPResponseStatus(statusCode: code), headers: headers)
        sendWhole(head, body: hasBody && !exchange.isHead ? entry.body : nil, exchange, context: context)
    }

    /// Headers a 304 from the cache carries (RFC 9110 §15.4.5).
    private static func keptOnNotModified(_ name: String) -> Bool {
        switch name.lowercased() {
        case "etag", "cache-control", "content-location", "date", "expires", "vary", "last-modified", "via": true
        default: false
        }
    }

    /// stale-if-error: the upstream failed (it answered `upstreamStatus`, a 5xx, or nothing), and the stored entry
    /// answers instead when its window allows. True when it did.
    func servedStale(forFailure upstreamStatus: Int?, _ exchange: Exchange, context: ChannelHandlerContext) -> Bool {
        guard !exchange.responseStarted, let cache = exchange.cache,
            let entry = cache.staleForError(now: HTTPDate.nowMilliseconds())
        else { return false }
        cache.metrics.staleIfError.increment()
        cache.land(nil)
        let forwarded = upstreamStatus.map { "; fwd-status=\($0)" } ?? ""
        serveCached(
            entry, status: "gatehouse; fwd=stale\(forwarded); detail=stale-if-error", exchange, context: context)
        return true
    }

    /// Revalidates a stale entry in the background, once per key on this instance, while the client gets it.
    private func startRefresh(
        _ cache: CacheExchange, entry: CacheEntry, _ exchange: Exchange, context: ChannelHandlerContext
    ) {
        let refresh = CacheExchange(
            cache: cache.cache, key: cache.key, config: cache.config, metrics: cache.metrics,
            request: exchange.context.head)
        refresh.facts = cache.facts
        refresh.isHead = false  // the refresh is a GET, whatever the client sent
        refresh.token = cache.token
        refresh.stored = entry
        guard case .lead = refresh.cache.flights.join(refresh.key.flightKey, waiter: nil) else { return }
        refresh.leadsFlight = true
        var requestContext = exchange.context
        do throws(GatewayError) {
            var request = try Pipeline.forward(&requestContext, runtime: exchange.runtime)
            if request.method == "HEAD" { request.method = "GET" }
            if let grant = requestContext.route?.pool?.oauth2 {
                // A refresh never waits for a token: without one held here, it is left to a later request.
                guard let token = core.oauth2.heldToken(for: grant, on: context.eventLoop) else {
                    refresh.land(nil)
                    return
                }
                Self.authorize(&request, token: token)
            }
            refresh.addValidators(to: &request)
            refresh.facts.requestTime = HTTPDate.nowMilliseconds()
            let delegate = BackgroundRefresh(refresh, context: requestContext, eventLoop: context.eventLoop)
            core.upstream.start(request, delegate: delegate, worker: workerIndex).endBody()
        } catch {
            refresh.land(nil)
        }
    }
}

/// Receives the answer of a background revalidation and stores it; no client is waiting for it.
final class BackgroundRefresh: UpstreamTransferDelegate {
    private let state:
        NIOLoopBoundBox<(cache: CacheExchange, context: RequestContext, notModified: UpstreamResponseHead?)>
    let eventLoop: EventLoop

    init(_ cache: CacheExchange, context: RequestContext, eventLoop: EventLoop) {
        state = NIOLoopBoundBox((cache, context, nil), eventLoop: eventLoop)
        self.eventLoop = eventLoop
    }

    func upstreamTransfer(_ transfer: UpstreamTransfer, received events: UpstreamEvents) {
        let cache = state.value.cache
        let lease = state.value.context.lease
        if let head = events.head {
            lease?.record(.of(status: head.status))
            if cache.revalidating, head.status == 304 {
                state.value.notModified = head
            } else {
                _ = cache.responseArrived(status: head.status, upstreamHeaders: head.headers, prefix: "")
                cache.recordHeaders(RespondPhase.head(for: head, state.value.context).headers)
            }
        }
        for chunk in events.body { cache.record(chunk) }
        guard let completion = events.completion else { return }
        if let error = completion.error {
            lease?.record(error.kind == .cancelled ? .neutral : .failure)
        }
        lease?.end()
        if completion.error != nil {
            cache.finish(intact: false, on: eventLoop)
        } else if let notModified = state.value.notModified {
            _ = cache.refresh(
                with: notModified, responseHeaders: RespondPhase.head(for: notModified, state.value.context).headers,
                on: eventLoop)
        } else {
            cache.finish(intact: true, on: eventLoop)
        }
    }

    func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer) {}
}
