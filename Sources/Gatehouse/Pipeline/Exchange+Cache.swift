import CoreMetrics
import GatehouseConfig
import NIOCore
import NIOHTTP1
import UpstreamClient

/// cache lookup: the cache's detours in the corridor: the lookup, waiting for another request's flight or another
/// instance's fetch, answering from an entry, stale-if-error, and the background refresh behind
/// stale-while-revalidate.
extension Exchange {
    /// Looks the response up; the answer comes back on this event loop.
    func lookUp(_ cache: CacheExchange) {
        cache.lookupStarted = FlightBoard.now()
        // A hit in this process's memory answers now, without a future.
        if !cache.requestNoCache,
            let found = cache.cache.lookupLocal(
                cache.key, headers: context.head.headers, localMilliseconds: cache.config.localTTL.milliseconds)
        {
            lookedUp(found, cache)
            return
        }
        let lookup = cache.cache.lookup(
            cache.key, headers: context.head.headers, localMilliseconds: cache.config.localTTL.milliseconds,
            mayUseLocal: !cache.requestNoCache, on: eventLoop)
        whenLive(lookup, waitingFor: .phase) { exchange, result in
            if case .success(let found) = result { exchange.lookedUp(found, cache) }
        }
    }

    private func lookedUp(_ result: ResponseCache.Lookup, _ cache: CacheExchange) {
        let (action, status) = cache.decide(result, now: HTTPDate.nowMilliseconds())
        switch action {
        case .serve(let entry, let status, let refresh):
            if refresh { startRefresh(cache, entry: entry) }
            serveCached(entry, status: status)
        case .refuse:
            context.cacheStatus = status
            respondError(.onlyIfCached())
        case .forward:
            context.cacheStatus = status
            if case .unavailable = result {
                // Redis is away: serve from the upstream and store nothing.
                self.cache = nil
                forward()
                return
            }
            if cache.isHead || !cache.mayLead {
                forward()
                return
            }
            joinFlight(cache)
        }
    }

    /// Coalescing: one request per key goes upstream (it leads the flight); the others wait for its entry, but
    /// not past the route's timeout.
    private func joinFlight(_ cache: CacheExchange) {
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        let waiter = FlightBoard.Waiter(eventLoop: eventLoop) { entry in bound.value.flightLanded(entry) }
        switch cache.cache.flights.join(cache.key.flightKey, waiter: waiter, lookupStarted: cache.lookupStarted) {
        case .lead:
            cache.leadsFlight = true
            if cache.config.lockTimeout.milliseconds > 0 {
                lockFleetWide(cache)
            } else {
                forward()
            }
        case .pass:
            forward()
        case .landed(let entry):
            // Only what a fresh lookup could have served: no `no-cache` on either side, still fresh.
            if cache.mayAnswerFresh(entry, now: HTTPDate.nowMilliseconds()) {
                answerFromFlight(entry)
            } else {
                forward()
            }
        case .lookAgain:
            cache.forgetLookup()
            lookUp(cache)
        case .wait:
            state.waitingFor = .phase
            let timeout = Int64(context.route?.timeoutMilliseconds ?? 30_000)
            waitTimer = after(.milliseconds(timeout), waitingFor: .phase) { $0.answerFromFlight(nil) }
        }
    }

    /// `lock_timeout`: takes the fleet-wide lock on this miss, or, when another instance holds it, waits for the
    /// entry that instance stores. A Redis error counts as having the lock (never wait on a broken store).
    private func lockFleetWide(_ cache: CacheExchange) {
        let timeout = cache.config.lockTimeout.milliseconds
        let store = cache.cache.store
        let (name, loop) = (cache.key.fleetLock, eventLoop)
        let locked = store.lock(name, milliseconds: timeout, on: eventLoop)
        // A lock taken for an exchange that ended meanwhile is given back.
        locked.whenSuccess { [bound = NIOLoopBound(self, eventLoop: eventLoop)] held in
            if held, !bound.value.isLive { store.unlock(name, on: loop) }
        }
        whenLive(locked, waitingFor: .phase) { exchange, result in
            switch result {
            case .success(true):
                cache.holdsLock = exchange.eventLoop
                exchange.forward()
            case .success(false):
                exchange.awaitRemoteEntry(cache, deadline: NIODeadline.now() + .milliseconds(timeout))
            case .failure:
                exchange.forward()
            }
        }
    }

    /// Polls for the entry another instance is fetching; goes upstream when its lock is gone without an entry,
    /// or at the deadline.
    private func awaitRemoteEntry(_ cache: CacheExchange, deadline: NIODeadline) {
        state.waitingFor = .phase
        waitTimer = after(.milliseconds(20), waitingFor: .phase) { exchange in
            let store = cache.cache.store
            let loop = exchange.eventLoop
            let polled = cache.cache.lookup(
                cache.key, headers: exchange.context.head.headers, localMilliseconds: 0, mayUseLocal: false, on: loop
            ).and(store.isLocked(cache.key.fleetLock, on: loop))
            exchange.whenLive(polled, waitingFor: .phase) { exchange, result in
                if case .success((.found(let entry, _), _)) = result,
                    cache.mayAnswerFresh(entry, now: HTTPDate.nowMilliseconds())
                {
                    cache.metrics.coalesced.increment()
                    cache.land(entry)
                    exchange.serveCached(entry, status: "gatehouse; fwd=miss; collapsed")
                } else if case .success((_, true)) = result, NIODeadline.now() < deadline {
                    exchange.awaitRemoteEntry(cache, deadline: deadline)
                } else {
                    exchange.forward()
                }
            }
        }
    }

    /// The flight this request waited for landed: answer from its entry, or go upstream.
    private func flightLanded(_ entry: CacheEntry?) {
        guard isLive, state.waitingFor == .phase else { return }
        state.waitingFor = nil
        waitTimer?.cancel()
        answerFromFlight(entry)
    }

    /// Answers with the entry another request fetched when it suits this request's Vary headers, else goes
    /// upstream.
    private func answerFromFlight(_ entry: CacheEntry?) {
        let headers = context.head.headers
        if let entry, let cache, entry.vary.allSatisfy({ CacheKey.headerValue(headers, $0.name) == $0.value }) {
            cache.metrics.coalesced.increment()
            serveCached(entry, status: "gatehouse; fwd=miss; collapsed")
            return
        }
        forward()
    }

    /// Answers from a stored entry: 304 when the client's own conditional matches it, 206 (or 416) for a `Range`,
    /// else the whole response.
    func serveCached(_ entry: CacheEntry, status: String) {
        context.cacheStatus = status
        var part: ClosedRange<Int>?
        let notModified = CachePolicy.notModified(context.head.headers, entry: entry)
        if !notModified {
            switch CachePolicy.range(context.head, entry: entry) {
            case .part(let bounds): part = bounds
            case .unsatisfiable(let length):
                respondError(.rangeNotSatisfiable(length: length))
                return
            case nil: break
            }
        }
        var (headers, status) = RespondPhase.headers(for: entry, notModified: notModified, part: part, context)
        var body: ByteBuffer?
        if status != .notModified, status != .noContent {
            body =
                part.map { entry.body.getSlice(at: entry.body.readerIndex + $0.lowerBound, length: $0.count) }
                ?? entry.body
        }
        // The entry holds the identity answer; this client's encoding is made here, whole (it is at most the
        // route's max_object_bytes).
        if let compression = context.route?.compression,
            let encoder = compression.begin(
                &headers, status: Int(status.code), request: context.head,
                representation: status == .notModified ? HTTPHeaders(entry.headers.map { ($0.name, $0.value) }) : nil),
            let whole = body
        {
            body = encoder.encode(whole, .finish, allocator: ByteBufferAllocator())
        }
        respond(RespondPhase.finish(&headers, status: status, context), body: body)
    }

    /// stale-if-error: the upstream failed (it answered `upstreamStatus`, a 5xx, or nothing), and the stored entry
    /// answers instead when its window allows. True when it did.
    func servedStale(forFailure upstreamStatus: Int?) -> Bool {
        guard !state.answerStarted, let cache, let entry = cache.staleForError(now: HTTPDate.nowMilliseconds())
        else { return false }
        cache.metrics.staleIfError.increment()
        cache.land(nil)
        let forwarded = upstreamStatus.map { "; fwd-status=\($0)" } ?? ""
        serveCached(entry, status: "gatehouse; fwd=stale\(forwarded); detail=stale-if-error")
        return true
    }

    /// Revalidates a stale entry in the background, once per key on this instance, while the client gets it.
    private func startRefresh(_ cache: CacheExchange, entry: CacheEntry) {
        let refresh = CacheExchange(
            cache: cache.cache, key: cache.key, config: cache.config, metrics: cache.metrics, request: context.head)
        refresh.facts = cache.facts
        refresh.isHead = false  // the refresh is a GET, whatever the client sent
        refresh.token = cache.token
        refresh.stored = entry
        guard case .lead = refresh.cache.flights.join(refresh.key.flightKey, waiter: nil) else { return }
        refresh.leadsFlight = true
        var requestContext = context
        do throws(GatewayError) {
            try PickTargetPhase.run(&requestContext)
        } catch {
            refresh.land(nil)
            return
        }
        var request = ForwardPhase.upstreamRequest(for: requestContext, runtime: runtime)
        if request.method == "HEAD" { request.method = "GET" }
        if let grant = requestContext.route?.pool?.oauth2 {
            // A refresh never waits for a token: without one held here, it is left to a later request.
            guard let token = core.oauth2.heldToken(for: grant, on: eventLoop) else {
                refresh.land(nil)
                return
            }
            Self.authorize(&request, token: token)
        }
        refresh.addValidators(to: &request)
        refresh.facts.requestTime = HTTPDate.nowMilliseconds()
        let delegate = BackgroundRefresh(refresh, context: requestContext, eventLoop: eventLoop)
        core.upstream.start(request, delegate: delegate, worker: workerIndex).endBody()
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
                cache.recordHeaders(RespondPhase.headers(for: head, state.value.context))
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
                with: notModified, responseHeaders: RespondPhase.headers(for: notModified, state.value.context),
                on: eventLoop)
        } else {
            cache.finish(intact: true, on: eventLoop)
        }
    }

    func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer) {}
}
