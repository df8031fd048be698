import CoreMetrics
import GatehouseConfig
import NIOCore
import NIOHTTP1
import UpstreamClient

/// The cache's part in one exchange: what was found, whether the response is being recorded for storing, and
/// the `Cache-Status` to send. Lives on the connection's event loop (or a background refresh's).
final class CacheExchange {
    let cache: ResponseCache
    let key: CacheKey
    let config: RouteCache
    let metrics: CacheMetrics
    var facts: CachePolicy.RequestFacts
    /// The request's own directives (`max-age`, `max-stale`, `min-fresh`, `no-cache`, `only-if-cached`...).
    let request: CacheControl
    /// The client asked for a validated answer (`no-cache`, `max-age=0`).
    var requestNoCache: Bool { request.noCache || request.maxAge == 0 }
    /// A HEAD request: answered from GET's entries, never stored.
    var isHead: Bool
    /// What the lookup saw; a store is dropped when a purge came since.
    var token = CacheToken.initial
    /// The entry found, kept to revalidate it and for stale-if-error.
    var stored: CacheEntry?
    /// The request went upstream with the stored entry's validators.
    var revalidating = false
    /// When the store lookup began (`FlightBoard.now()`).
    var lookupStarted: UInt64 = 0
    private var missCounted = false
    /// This exchange leads a flight: requests for the same key wait for what it stores.
    var leadsFlight = false
    /// This exchange holds the fleet-wide fetch lock (`lock_timeout`), released when the flight lands.
    var holdsLock: EventLoop?
    /// The store write of this exchange's entry; the fleet-wide lock is released only after it, so another
    /// instance that sees the lock gone finds the entry.
    private var pendingWrite: EventLoopFuture<Void>?
    /// The response being collected for storing; nil when it is not stored.
    private var recording: Recording?
    /// Why the response is not stored, once known.
    private(set) var skipped: CacheSkip?
    /// The status of the upstream's answer, once it came.
    private var upstreamStatus = 0

    /// The response is being collected for storing: the upstream is read on even while the client is slow
    /// (at most `max_object_bytes`), so requests waiting for this entry are not held back by one slow reader.
    var isRecording: Bool { recording != nil }

    private struct Recording {
        var status: Int
        var headers: [(name: String, value: String)]
        var storable: CachePolicy.Storable
        var responseTime: Int64
        var body: ByteBuffer
    }

    init(cache: ResponseCache, key: CacheKey, config: RouteCache, metrics: CacheMetrics, request: HTTPRequestHead) {
        self.cache = cache
        self.key = key
        self.config = config
        self.metrics = metrics
        self.request = CachePolicy.requestControl(request.headers)
        isHead = request.method == .HEAD
        facts = CachePolicy.RequestFacts(
            authenticated: false, keyedPerConsumer: false, noStore: self.request.noStore, headers: request.headers,
            requestTime: 0)
    }

    // MARK: what to do with what the lookup found

    enum Action {
        /// Answer from the entry with this Cache-Status; `refresh` asks for one background revalidation.
        case serve(CacheEntry, status: String, refresh: Bool)
        /// Go upstream (revalidating ``stored`` when it is set).
        case forward
        /// `only-if-cached` and nothing stored may answer: 504.
        case refuse
    }

    func decide(_ lookup: ResponseCache.Lookup, now: Int64) -> (Action, status: String) {
        let (action, status) = choose(lookup, now: now)
        if request.onlyIfCached, case .forward = action {
            stored = nil
            return (.refuse, "gatehouse; fwd=miss; detail=only-if-cached")
        }
        return (action, status)
    }

    private func choose(_ lookup: ResponseCache.Lookup, now: Int64) -> (Action, status: String) {
        switch lookup {
        case .unavailable:
            metrics.bypassed.increment()
            return (.forward, "gatehouse; fwd=bypass; detail=redis-unavailable")
        case .miss(let token, let varyMiss):
            self.token = token
            countMiss()
            return (.forward, varyMiss ? "gatehouse; fwd=vary-miss" : "gatehouse; fwd=miss")
        case .found(let entry, let token):
            self.token = token
            let left = entry.freshnessLeft(now: now)
            let ttl = "ttl=\(Self.seconds(left))"
            if requestNoCache || entry.freshness.noCache {
                return forward(
                    revalidating: entry, status: requestNoCache ? "gatehouse; fwd=request" : "gatehouse; fwd=stale")
            }
            if left > 0 {
                if satisfiesRequest(entry, now: now) {
                    metrics.hits.increment()
                    return (.serve(entry, status: "gatehouse; hit; \(ttl)", refresh: false), "")
                }
                return forward(revalidating: entry, status: "gatehouse; fwd=request")
            }
            if entry.freshness.mustRevalidate { return forward(revalidating: entry, status: "gatehouse; fwd=stale") }
            // The client accepts this much staleness (max-stale), within its own max-age.
            if let maxStale = request.maxStale, !entry.freshness.sharedMaxAge, -left <= maxStale * 1000,
                request.maxAge.map({ entry.age(now: now) <= $0 * 1000 }) ?? true
            {
                metrics.hits.increment()
                return (.serve(entry, status: "gatehouse; hit; stale; \(ttl); detail=max-stale", refresh: false), "")
            }
            // A client's max-age, min-fresh or (exceeded) max-stale bounds staleness: no stale answer past it from the
            // route's windows either (RFC 9111 §4.2.4).
            if request.maxAge == nil, request.minFresh == nil, request.maxStale == nil,
                -left <= entry.freshness.staleWhileRevalidate
            {
                metrics.staleWhileRevalidate.increment()
                let status = "gatehouse; hit; stale; \(ttl); detail=stale-while-revalidate"
                return (.serve(entry, status: status, refresh: true), "")
            }
            return forward(revalidating: entry, status: "gatehouse; fwd=stale")
        }
    }

    /// Whether an entry another request just fetched or stored may answer this one as a fresh hit would: no
    /// `no-cache` on either side, fresh, and within the request's `max-age` and `min-fresh`.
    func mayAnswerFresh(_ entry: CacheEntry, now: Int64) -> Bool {
        !requestNoCache && !entry.freshness.noCache && entry.freshnessLeft(now: now) > 0
            && satisfiesRequest(entry, now: now)
    }

    /// Whether a fresh entry also meets the request's `max-age` and `min-fresh` (RFC 9111 §5.2.1).
    private func satisfiesRequest(_ entry: CacheEntry, now: Int64) -> Bool {
        if let maxAge = request.maxAge, entry.age(now: now) > maxAge * 1000 { return false }
        if let minFresh = request.minFresh, entry.freshnessLeft(now: now) < minFresh * 1000 { return false }
        return true
    }

    private func forward(revalidating entry: CacheEntry, status: String) -> (Action, status: String) {
        stored = entry
        countMiss()
        return (.forward, status)
    }

    /// A request counts as one miss, even when it looks up twice.
    private func countMiss() {
        guard !missCounted else { return }
        missCounted = true
        metrics.misses.increment()
    }

    /// Before a second lookup: what the first one found is not revalidated or served stale.
    func forgetLookup() {
        stored = nil
        revalidating = false
    }

    /// Whole seconds, rounded towards zero, for `ttl=` and `Age`.
    static func seconds(_ milliseconds: Int64) -> Int64 { milliseconds / 1000 }

    /// Whether this request may lead a flight that others wait on: not when something in the request itself
    /// (its own `no-store`, its own conditional headers) could make the answer unusable for them.
    var mayLead: Bool {
        !facts.noStore && !facts.headers.contains(name: "If-None-Match")
            && !facts.headers.contains(name: "If-Modified-Since") && !facts.headers.contains(name: "Range")
    }

    /// Adds the stored entry's validator to an upstream request, replacing the client's own conditionals: the
    /// entity tag when there is one (a date could let a 304 pair another version's tag with this body), else
    /// the date.
    func addValidators(to request: inout UpstreamRequest) {
        guard let stored, stored.hasValidator else { return }
        request.headers.removeAll {
            $0.name.caseInsensitiveEquals("If-None-Match") || $0.name.caseInsensitiveEquals("If-Modified-Since")
        }
        if let etag = stored.etag {
            request.headers.append(("If-None-Match", etag))
        } else if let modified = stored.lastModified {
            request.headers.append(("If-Modified-Since", modified))
        }
        revalidating = true
    }

    /// Whether the stored entry may answer instead of an upstream failure (stale-if-error).
    func staleForError(now: Int64) -> CacheEntry? {
        guard let stored, !stored.freshness.mustRevalidate, !stored.freshness.noCache else { return nil }
        let stale = -stored.freshnessLeft(now: now)
        return stale <= stored.freshness.staleIfError ? stored : nil
    }

    // MARK: storing the upstream's answer

    /// Decides whether the upstream's answer is stored; returns the `Cache-Status` for it.
    func responseArrived(status: Int, upstreamHeaders: [(name: String, value: String)], prefix: String) -> String {
        upstreamStatus = status
        if revalidating { metrics.revalidations.increment() }
        let prefix = revalidating || stored != nil ? "\(prefix); fwd-status=\(status)" : prefix
        let now = HTTPDate.nowMilliseconds()
        var decision = CachePolicy.evaluate(
            status: status, headers: upstreamHeaders, request: facts, responseTime: now, route: config)
        if isHead, case .success = decision { decision = .failure(.status) }
        if case .success = decision,
            let length = CachePolicy.header("Content-Length", in: upstreamHeaders).flatMap(Int.init),
            length > config.maxObjectBytes
        {
            decision = .failure(.tooLarge)
        }
        switch decision {
        case .success(let storable):
            recording = Recording(
                status: status, headers: [], storable: storable, responseTime: now, body: ByteBuffer())
            return prefix + "; stored"
        case .failure(let reason):
            skip(reason)
            // Nothing will be stored: requests waiting for this one go upstream now, not when its body ends.
            land(nil)
            return prefix + "; detail=\(reason.rawValue)"
        }
    }

    /// The headers a stored response keeps: the client's view, less what is per request or per connection.
    func recordHeaders(_ headers: HTTPHeaders) {
        guard recording != nil else { return }
        recording?.headers = Self.storable(headers)
    }

    /// The headers an entry keeps: not those of one exchange (framing, its request id, its caller's RateLimit).
    static func storable(_ headers: HTTPHeaders) -> [(name: String, value: String)] {
        headers.compactMap { name, value in
            switch name.lowercased() {
            case "content-length", "connection", "x-request-id", "age", "cache-status", "transfer-encoding",
                "ratelimit", "ratelimit-policy":
                nil
            default: (name, value)
            }
        }
    }

    func record(_ chunk: ByteBuffer) {
        guard recording != nil else { return }
        if (recording?.body.readableBytes ?? 0) + chunk.readableBytes > config.maxObjectBytes {
            recording = nil
            skip(.tooLarge)
            land(nil)
            return
        }
        var chunk = chunk
        recording?.body.writeBuffer(&chunk)
    }

    private func skip(_ reason: CacheSkip) {
        skipped = reason
        metrics.skipped(reason)
    }

    /// The upstream's answer ended: store it when it ended intact, and land the flight either way.
    @discardableResult
    func finish(intact: Bool, on eventLoop: EventLoop) -> CacheEntry? {
        var entry: CacheEntry?
        if let recording {
            if intact {
                entry = CacheEntry(
                    status: recording.status, headers: recording.headers, body: recording.body,
                    responseTime: recording.responseTime, initialAge: recording.storable.initialAge,
                    freshness: recording.storable.freshness, vary: recording.storable.vary)
            } else {
                skip(.incomplete)
            }
        }
        recording = nil
        if let entry {
            pendingWrite = cache.write(entry, key: key, token: token, config: config, metrics: metrics, on: eventLoop)
        }
        land(entry)
        return entry
    }

    /// The upstream answered 304 to a revalidation: the stored entry, with the new headers and freshness
    /// (RFC 9111 §4.3.4), is stored again and returned to answer this client.
    func refresh(with notModified: UpstreamResponseHead, responseHeaders: HTTPHeaders, on eventLoop: EventLoop)
        -> CacheEntry?
    {
        metrics.notModified.increment()
        guard let entry = stored else {
            land(nil)
            return nil
        }
        // A 304 for another version (RFC 9111 §4.3.4): answer with what is stored, but do not update it.
        if let tag = CachePolicy.header("ETag", in: notModified.headers), !Self.selects(tag, entry) {
            land(nil)
            return entry
        }
        let (answer, written) = update(entry, with: notModified, responseHeaders: responseHeaders, on: eventLoop)
        land(written)
        return answer
    }

    /// Whether a 304's or HEAD's entity tag selects the stored response for an update: by strong comparison when
    /// the new tag is strong, so a weakly validated body never becomes strongly validated (RFC 9111 §4.3.4).
    private static func selects(_ tag: String, _ entry: CacheEntry) -> Bool {
        guard let stored = entry.etag else { return false }
        let new = EntityTag(Substring(tag))
        let old = EntityTag(Substring(stored))
        return new.isWeak ? new.weaklyMatches(old) : new.stronglyMatches(old)
    }

    /// A HEAD request went upstream past a stored GET response and got 200: when it describes the same
    /// representation (every validator it carries matches, and its Content-Length, when it gives one), the stored
    /// response takes its header fields and freshness (RFC 9111 §4.3.5); otherwise the stored response is marked
    /// stale, so the next GET validates it.
    func freshen(with head: UpstreamResponseHead, responseHeaders: HTTPHeaders, on eventLoop: EventLoop) {
        guard isHead, head.status == 200, var entry = stored else { return }
        let etag = CachePolicy.header("ETag", in: head.headers)
        let modified = CachePolicy.header("Last-Modified", in: head.headers)
        let length = CachePolicy.header("Content-Length", in: head.headers).flatMap(Int.init)
        // Every validator the HEAD answer carries must match; with none, its length must.
        let tagMatches = etag.map { Self.selects($0, entry) } ?? true
        let dateMatches = modified.map { $0 == entry.lastModified } ?? true
        let lengthMatches = length.map { $0 == entry.body.readableBytes } ?? (etag != nil || modified != nil)
        if tagMatches, dateMatches, lengthMatches {
            _ = update(entry, with: head, responseHeaders: responseHeaders, on: eventLoop)
        } else {
            entry.freshness.lifetime = 0
            entry.freshness.staleWhileRevalidate = 0
            pendingWrite = cache.write(entry, key: key, token: token, config: config, metrics: metrics, on: eventLoop)
        }
    }

    /// `entry` updated by a 304 or HEAD response: each header field the response carries replaces the stored one
    /// (but `Content-Length`, which describes the stored body), and freshness is judged again on the merged fields
    /// with the response's `Age`. Returns the answer for this client and, when the merged response may still be
    /// stored, what was stored: that keeps the stored `Set-Cookie`, never this caller's.
    private func update(
        _ entry: CacheEntry, with response: UpstreamResponseHead, responseHeaders: HTTPHeaders, on eventLoop: EventLoop
    ) -> (answer: CacheEntry, written: CacheEntry?) {
        var answer = entry
        var kept = entry.headers
        var replaced = Set<String>()
        for (name, value) in Self.storable(responseHeaders) where !name.caseInsensitiveEquals("Content-Length") {
            // Every value of a field the response carries replaces all the stored ones, in the response's order.
            if replaced.insert(name.lowercased()).inserted {
                answer.headers.removeAll { $0.name.caseInsensitiveEquals(name) }
                if !name.caseInsensitiveEquals("Set-Cookie") { kept.removeAll { $0.name.caseInsensitiveEquals(name) } }
            }
            answer.headers.append((name, value))
            if !name.caseInsensitiveEquals("Set-Cookie") { kept.append((name, value)) }
        }
        let now = HTTPDate.nowMilliseconds()
        var judged = kept
        judged.append(contentsOf: response.headers.filter { $0.name.caseInsensitiveEquals("Age") })
        switch CachePolicy.evaluate(
            status: entry.status, headers: judged, request: facts, responseTime: now, route: config)
        {
        case .success(let storable):
            (answer.responseTime, answer.initialAge, answer.freshness) = (now, storable.initialAge, storable.freshness)
            var written = answer
            written.headers = kept
            pendingWrite = cache.write(written, key: key, token: token, config: config, metrics: metrics, on: eventLoop)
            return (answer, written)
        case .failure(let reason):
            skip(reason)
            return (answer, nil)
        }
    }

    /// Ends this exchange's flight, if it leads one. Without an entry, a response that came whole but could not
    /// be stored makes the key skip coalescing for a while.
    func land(_ entry: CacheEntry?) {
        if let loop = holdsLock {
            holdsLock = nil
            let (store, name) = (cache.store, key.fleetLock)
            if let pendingWrite {
                pendingWrite.whenComplete { _ in store.unlock(name, on: loop) }
            } else {
                store.unlock(name, on: loop)
            }
        }
        guard leadsFlight else { return }
        leadsFlight = false
        let unstorable = entry == nil && skipped?.startsPass(status: upstreamStatus) == true
        cache.flights.land(key.flightKey, entry: entry, written: pendingWrite, unstorable: unstorable)
    }
}
