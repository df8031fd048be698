import CoreMetrics
import GatehouseConfig
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization
import UpstreamClient

/// The targets of one upstream, their health, and how the next one is chosen.
///
/// A target takes requests unless its active health check failed, passive health ejected it, its circuit is open
/// (or half-open with its probe in flight), or it asked to be left alone with `Retry-After`. Among the targets
/// that take requests, `balance` picks one. All of it sits behind one lock per upstream: the critical sections
/// are a few comparisons, and the same lock keeps in-flight counts, breaker windows and the retry budget exact.
final class UpstreamPool: Sendable {
    let config: UpstreamConfig
    /// Lower-cased request headers never sent to this upstream: `request_headers.remove` and the API-key header.
    let droppedHeaders: Set<String>
    /// Target base URLs, in config order.
    let urls: [String]
    /// The request header whose value picks the target (`hash:header:<Name>`).
    let hashHeader: String?
    /// The client-credentials grant whose token goes with every request, with `oauth2`.
    let oauth2: OAuth2Grant?
    /// The callers told to wait, with `pause_on_retry_after: consumer`; kept across reloads.
    let callerPauses: CallerPauses
    private let ring: HashRing?
    private let state: Mutex<PoolState>
    private let metrics: [TargetMetrics]
    private let retries: CoreMetrics.Counter
    private let healthChecks = Mutex<RepeatedTask?>(nil)

    /// The targets that `previous` (this upstream in the config before a reload) had too, by URL, keep their
    /// health, ejections, breakers and pauses, so a reload does not send traffic to targets known to be down.
    /// Requests in flight stay counted in `previous`.
    init(
        _ config: UpstreamConfig, apiKeyHeader: String, factory: PrometheusMetricsFactory,
        previous: UpstreamPool? = nil
    ) {
        self.config = config
        droppedHeaders = Set(config.requestHeaders.remove.map { $0.lowercased() } + [apiKeyHeader.lowercased()])
        let urls = config.targets.map(\.url)
        self.urls = urls
        oauth2 = OAuth2Grant(config)
        callerPauses = previous?.callerPauses ?? CallerPauses()
        if case .hashHeader(let name) = config.balance {
            hashHeader = name
            ring = HashRing(config.targets)
        } else {
            hashHeader = nil
            ring = nil
        }
        var targets = config.targets.map { TargetState(weight: max(1, $0.weight)) }
        if let previous {
            let old = previous.state.withLock { $0.targets }
            for (index, url) in urls.enumerated() {
                guard let oldIndex = previous.urls.firstIndex(of: url) else { continue }
                let weight = targets[index].weight
                targets[index] = old[oldIndex]
                targets[index].reweigh(weight)
            }
        }
        state = Mutex(PoolState(targets: targets))
        metrics = config.targets.map { TargetMetrics(upstream: config.name, target: $0.url, factory: factory) }
        for (index, target) in targets.enumerated() {
            metrics[index].healthy.record(target.activeHealthy ? 1 : 0)
            metrics[index].breaker.record(target.breaker.gaugeValue)
        }
        retries = CoreMetrics.Counter(
            label: "gatehouse_upstream_retries_total", dimensions: [("upstream", config.name)], factory: factory)
    }

    // MARK: picking

    /// Picks a target for a request, preferring one not in `excluding` (targets an earlier attempt used).
    /// `hashKey` is the value of the `hash:header:` header, when there is one. A request's first attempt counts
    /// towards the retry budget's base; a later one (a retry, a resend with a fresh token) does not.
    func pick(hashKey: String? = nil, excluding: [Int] = [], firstAttempt: Bool = true)
        -> Result<TargetLease, GatewayError>
    {
        let now = Self.now()
        let chosen = state.withLock { state -> Result<(Int, Bool), GatewayError> in
            if firstAttempt, config.retries != nil { state.budget.add(now, first: true) }
            // The candidate list reuses one buffer: no allocation per request.
            var candidates: [Int] = []
            swap(&candidates, &state.scratch)
            defer {
                candidates.removeAll(keepingCapacity: true)
                swap(&candidates, &state.scratch)
            }
            state.collectCandidates(at: now, excluding: excluding, into: &candidates)
            if candidates.isEmpty, !excluding.isEmpty {
                state.collectCandidates(at: now, excluding: [], into: &candidates)
            }
            guard !candidates.isEmpty else { return .failure(state.refusal(at: now, upstream: config.name)) }
            let index: Int
            if let ring, let hashKey {
                index = ring.target(for: hashKey, among: candidates)
            } else {
                switch config.balance {
                case .leastRequests: index = state.leastLoaded(candidates)
                case .random: index = state.powerOfTwoChoices(candidates)
                case .roundRobin, .hashHeader: index = state.smoothWeightedRoundRobin(candidates)
                }
            }
            state.targets[index].inFlight += 1
            var probe = false
            if case .halfOpen = state.targets[index].breaker {
                state.targets[index].probeInFlight = true
                probe = true
            }
            return .success((index, probe))
        }
        switch chosen {
        case .success(let (index, probe)):
            metrics[index].requests.increment()
            if probe { metrics[index].breaker.record(BreakerState.halfOpen.gaugeValue) }
            return .success(TargetLease(pool: self, index: index, probe: probe))
        case .failure(let error):
            return .failure(error)
        }
    }

    /// Takes one retry from the budget: false when retries already reach `budget` of recent requests.
    func allowRetry() -> Bool {
        let ratio = config.retries?.budget ?? 0.2
        let now = Self.now()
        let allowed = state.withLock { state -> Bool in
            let (requests, retries) = state.budget.counts(at: now)
            guard Double(retries) < Double(requests) * ratio + Double(RetryBudget.reserve) else { return false }
            state.budget.add(now, first: false)
            return true
        }
        if allowed { retries.increment() }
        return allowed
    }

    // MARK: outcomes

    /// What one attempt said about its target; called at most once per lease.
    fileprivate func record(_ outcome: AttemptOutcome, target index: Int, probe: Bool) {
        let now = Self.now()
        let passive = config.passiveHealth
        let breaker = config.circuitBreaker
        let events = state.withLock { state in
            state.targets[index].record(outcome, probe: probe, at: now, passive: passive, breaker: breaker)
        }
        let metrics = self.metrics[index]
        if outcome == .failure { metrics.failures.increment() }
        if events.ejected { metrics.ejections.increment() }
        if let breakerState = events.breaker { metrics.breaker.record(breakerState.gaugeValue) }
    }

    fileprivate func end(target index: Int) {
        state.withLock { $0.targets[index].inFlight -= 1 }
    }

    /// A 429 or 503 with `Retry-After`: the target is left alone for `milliseconds` (capped at ``maxPause``).
    /// Returns whether that is news: a pause that starts, or ends at least a second later than the one running.
    /// Counted in the metrics when it starts.
    @discardableResult
    fileprivate func pause(target index: Int, status: Int, milliseconds: Int64) -> Bool {
        let capped = UInt64(min(max(milliseconds, 1), Int64(Self.maxPause) * 1000))
        let now = Self.now()
        let until = now + capped * 1_000_000
        let (news, started) = state.withLock { state -> (Bool, Bool) in
            let running = state.targets[index].pausedUntil
            guard running <= now || until >= running + 1_000_000_000 else { return (false, false) }
            state.targets[index].pausedUntil = until
            state.targets[index].pausedStatus = status
            return (true, running <= now)
        }
        if started { metrics[index].pauses.increment() }
        return news
    }

    /// A pause another instance (or this one) announced for one of this upstream's targets.
    func apply(_ pause: TargetPause) {
        guard let index = urls.firstIndex(of: pause.target) else { return }
        self.pause(target: index, status: pause.status, milliseconds: pause.milliseconds)
    }

    /// The longest pause a `Retry-After` can ask for, in seconds.
    static let maxPause = 600

    // MARK: active health checks

    /// Starts probing every target's `health_check.path` each `interval`, if the upstream has a health check.
    func startHealthChecks(client: UpstreamClient, on loop: EventLoop) {
        guard let check = config.healthCheck else { return }
        let interval = max(check.interval.milliseconds, 10)
        // A check may take longer than the interval (a slow machine is not a dead target); a target is not
        // checked again while its last check is still under way.
        let timeout = Int(min(max(config.timeout.milliseconds, 1), 5000))
        let connectTimeout = Int(max(1, min(config.connectTimeout.milliseconds, Int64(timeout))))
        let checking = NIOLoopBoundBox.makeBoxSendingValue(Array(repeating: false, count: urls.count), eventLoop: loop)
        let task = loop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(interval)) { [self] _ in
            for (index, url) in urls.enumerated() where !checking.value[index] {
                checking.value[index] = true
                let request = UpstreamRequest(
                    url: url + check.path, method: "GET", headers: [("User-Agent", "gatehouse-health-check")],
                    bodyLength: nil, connectTimeoutMilliseconds: connectTimeout, timeoutMilliseconds: timeout,
                    verifyTLS: config.tls.verify, caFile: config.tls.caFile)
                UpstreamFetch.send(request, client: client, on: loop, limit: 64 * 1024).whenComplete { result in
                    checking.value[index] = false
                    switch result {
                    case .success(let answer):
                        self.recordHealthCheck(
                            target: index, healthy: (200..<400).contains(answer.status), check: check)
                    case .failure(let error as UpstreamError) where error.kind == .cancelled:
                        break  // shutting down
                    case .failure:
                        self.recordHealthCheck(target: index, healthy: false, check: check)
                    }
                }
            }
        }
        healthChecks.withLock { $0 = task }
    }

    func stopHealthChecks() {
        healthChecks.withLock { task in
            task?.cancel()
            task = nil
        }
    }

    private func recordHealthCheck(target index: Int, healthy: Bool, check: HealthCheckConfig) {
        let changed = state.withLock { state in
            state.targets[index].recordHealthCheck(healthy: healthy, check: check)
        }
        if let changed { metrics[index].healthy.record(changed ? 1 : 0) }
    }

    // MARK: inspection

    /// Each target's state for `GET /upstreams`.
    func snapshot() -> [TargetSnapshot] {
        let now = Self.now()
        return state.withLock { state in
            state.targets.enumerated().map { index, target in
                TargetSnapshot(
                    url: urls[index], weight: target.weight, inFlight: target.inFlight,
                    state: target.describe(at: now))
            }
        }
    }

    /// Monotonic nanoseconds.
    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }
}

/// One target's state as `GET /upstreams` shows it.
struct TargetSnapshot: Sendable {
    let url: String
    let weight: Int
    let inFlight: Int
    let state: String
}

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

    fileprivate init(pool: UpstreamPool, index: Int, probe: Bool) {
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

// MARK: - state behind the pool's lock

private struct PoolState {
    var targets: [TargetState]
    var random = Xorshift(seed: UInt64.random(in: 1...UInt64.max))
    var budget = RetryBudget()
    /// The buffer `pick` lists candidates in.
    var scratch: [Int] = []

    /// Appends the targets that take requests now to `out`, in config order.
    mutating func collectCandidates(at now: UInt64, excluding: [Int], into out: inout [Int]) {
        for index in targets.indices where !excluding.contains(index) {
            if targets[index].available(at: now) { out.append(index) }
        }
    }

    /// nginx's smooth weighted round robin among the candidates that `included` keeps: every one gains its weight,
    /// the richest is picked and pays the total.
    mutating func smoothWeightedRoundRobin(
        _ candidates: [Int], where included: (_ inFlight: Int, _ weight: Int) -> Bool = { _, _ in true }
    ) -> Int {
        guard candidates.count > 1 else { return candidates[0] }
        var total = 0
        var best: Int?
        for index in candidates where included(targets[index].inFlight, targets[index].weight) {
            targets[index].currentWeight += targets[index].weight
            total += targets[index].weight
            let leader = best ?? index
            if best == nil || targets[index].currentWeight > targets[leader].currentWeight { best = index }
        }
        guard let best else { return candidates[0] }
        targets[best].currentWeight -= total
        return best
    }

    /// The fewest requests in flight for its weight; ties are shared by weighted round robin.
    mutating func leastLoaded(_ candidates: [Int]) -> Int {
        var lightest = candidates[0]
        for index in candidates.dropFirst() where lighter(index, than: lightest) { lightest = index }
        let (least, leastWeight) = (targets[lightest].inFlight, targets[lightest].weight)
        return smoothWeightedRoundRobin(candidates) { inFlight, weight in inFlight * leastWeight == least * weight }
    }

    /// Two targets drawn at random by weight; the less loaded one wins.
    mutating func powerOfTwoChoices(_ candidates: [Int]) -> Int {
        guard candidates.count > 1 else { return candidates[0] }
        let first = weightedDraw(candidates)
        var second = weightedDraw(candidates)
        if second == first { second = weightedDraw(candidates) }
        return lighter(second, than: first) ? second : first
    }

    private mutating func weightedDraw(_ candidates: [Int]) -> Int {
        let total = candidates.reduce(0) { $0 + targets[$1].weight }
        var point = Int(random.next() % UInt64(total))
        for index in candidates {
            point -= targets[index].weight
            if point < 0 { return index }
        }
        return candidates[candidates.count - 1]
    }

    private func lighter(_ a: Int, than b: Int) -> Bool {
        targets[a].inFlight * targets[b].weight < targets[b].inFlight * targets[a].weight
    }

    /// The answer when no target takes requests: every target paused by `Retry-After` gives that status and
    /// the shortest wait; otherwise 503.
    func refusal(at now: UInt64, upstream: String) -> GatewayError {
        let paused = targets.filter { $0.pausedUntil > now }
        if paused.count == targets.count, let soonest = paused.map(\.pausedUntil).min() {
            let statuses = Set(paused.map(\.pausedStatus))
            let status = statuses.count == 1 ? statuses.first ?? 503 : 503
            let seconds = (soonest - now + 999_999_999) / 1_000_000_000
            return GatewayError(
                status: HTTPResponseStatus(statusCode: status),
                detail: "The upstream \(upstream) asked for a pause; try again after \(seconds) s.", origin: .upstream,
                headers: [("Retry-After", String(seconds))])
        }
        let open = targets.contains { $0.circuitIsOpen }
        return GatewayError(
            status: .serviceUnavailable,
            detail: open
                ? "No healthy target of the upstream \(upstream) is left (circuit open)."
                : "No healthy target of the upstream \(upstream) is left.",
            origin: .upstream)
    }
}

/// The circuit breaker of one target.
enum BreakerState: Sendable {
    case closed
    case open(until: UInt64)
    /// One probe request is let through; its outcome closes or reopens the circuit.
    case halfOpen

    var gaugeValue: Double {
        switch self {
        case .closed: 0
        case .halfOpen: 1
        case .open: 2
        }
    }
}

private struct TargetState {
    private(set) var weight: Int
    var inFlight = 0
    var currentWeight = 0
    // active health checks
    var activeHealthy = true
    /// Consecutive results of the same kind: positive successes, negative failures.
    var activeStreak = 0
    // passive health
    var consecutiveFailures = 0
    var ejectedUntil: UInt64 = 0
    var ejections = 0
    // circuit breaker
    var breaker = BreakerState.closed
    var probeInFlight = false
    var window = OutcomeWindow()
    // Retry-After
    var pausedUntil: UInt64 = 0
    var pausedStatus = 503

    init(weight: Int) { self.weight = weight }

    /// Keeps the health state but takes a new weight, and counts no requests in flight (they report to the pool
    /// they started in).
    mutating func reweigh(_ weight: Int) {
        self.weight = weight
        currentWeight = 0
        inFlight = 0
        // A probe in flight reports to the old pool.
        probeInFlight = false
    }

    var circuitIsOpen: Bool {
        if case .closed = breaker { return false }
        return true
    }

    mutating func available(at now: UInt64) -> Bool {
        guard activeHealthy, pausedUntil <= now, ejectedUntil <= now else { return false }
        switch breaker {
        case .closed: return true
        case .open(let until):
            guard until <= now else { return false }
            breaker = .halfOpen
            probeInFlight = false
            return true
        case .halfOpen: return !probeInFlight
        }
    }

    /// Applies an outcome; says whether the target was ejected and the breaker's new state if it changed.
    mutating func record(
        _ outcome: AttemptOutcome, probe: Bool, at now: UInt64, passive: PassiveHealthConfig,
        breaker config: CircuitBreakerConfig?
    ) -> (ejected: Bool, breaker: BreakerState?) {
        var ejected = false
        var changed: BreakerState?
        switch outcome {
        case .neutral:
            if probe { probeInFlight = false }
        case .success:
            consecutiveFailures = 0
            ejections = 0
            if probe {
                breaker = .closed
                probeInFlight = false
                window = OutcomeWindow()
                changed = .closed
            } else if config != nil {
                window.add(at: now, failed: false)
            }
        case .failure:
            let openUntil = now + UInt64(max(config?.openFor.milliseconds ?? 1, 1)) * 1_000_000
            // A failed probe opens the circuit again, whatever else holds the target back.
            if config != nil, probe {
                breaker = .open(until: openUntil)
                probeInFlight = false
                changed = breaker
            }
            // Requests that were under way when the target was ejected say nothing new.
            if ejectedUntil > now { break }
            consecutiveFailures += 1
            if passive.failures > 0, consecutiveFailures >= passive.failures {
                ejections += 1
                let base = UInt64(max(passive.ejectFor.milliseconds, 1)) * 1_000_000
                let cap = UInt64(max(passive.maxEjectFor.milliseconds, 1)) * 1_000_000
                let factor = UInt64(1) << UInt64(min(ejections - 1, 20))
                ejectedUntil = now + min(cap, base.multipliedReportingOverflow(by: factor).partialValue)
                // Back in after the wait, one more failure ejects it again, for twice as long.
                consecutiveFailures = passive.failures - 1
                ejected = true
            }
            if let config, !probe, case .closed = breaker {
                window.add(at: now, failed: true)
                let (total, failures) = window.counts(at: now)
                if total >= config.minRequests, Double(failures) >= config.failureRatio * Double(total) {
                    breaker = .open(until: openUntil)
                    changed = breaker
                }
            }
        }
        return (ejected, changed)
    }

    /// Applies a health-check result; returns the new health when it changed.
    mutating func recordHealthCheck(healthy: Bool, check: HealthCheckConfig) -> Bool? {
        if healthy {
            activeStreak = max(activeStreak, 0) + 1
            if !activeHealthy, activeStreak >= check.healthyAfter {
                activeHealthy = true
                // Its checks saw it go down and come back: an ejection for the failures while it was down is
                // out of date, and so is its back-off. (A target that fails requests while passing its checks
                // stays ejected; the circuit breaker keeps its own course.)
                ejectedUntil = 0
                ejections = 0
                consecutiveFailures = 0
                return true
            }
        } else {
            activeStreak = min(activeStreak, 0) - 1
            if activeHealthy, -activeStreak >= check.unhealthyAfter {
                activeHealthy = false
                return false
            }
        }
        return nil
    }

    func describe(at now: UInt64) -> String {
        if !activeHealthy { return "unhealthy" }
        if pausedUntil > now { return "paused" }
        if ejectedUntil > now { return "ejected" }
        switch breaker {
        case .closed: return "healthy"
        case .open(let until): return until > now ? "circuit-open" : "circuit-half-open"
        case .halfOpen: return "circuit-half-open"
        }
    }
}

/// Requests and failures of the last 10 seconds, in 1-second buckets.
private struct OutcomeWindow {
    private var seconds = [UInt64](repeating: 0, count: 10)
    private var totals = [Int](repeating: 0, count: 10)
    private var failures = [Int](repeating: 0, count: 10)

    mutating func add(at now: UInt64, failed: Bool) {
        let second = now / 1_000_000_000
        let slot = Int(second % 10)
        if seconds[slot] != second {
            seconds[slot] = second
            totals[slot] = 0
            failures[slot] = 0
        }
        totals[slot] += 1
        if failed { failures[slot] += 1 }
    }

    func counts(at now: UInt64) -> (total: Int, failures: Int) {
        let second = now / 1_000_000_000
        var total = 0
        var failed = 0
        for slot in 0..<10 where seconds[slot] + 10 > second {
            total += totals[slot]
            failed += failures[slot]
        }
        return (total, failed)
    }
}

/// First attempts and retries of the last 10 seconds: retries may add `budget` of the first attempts, plus
/// ``reserve`` so that a quiet upstream can still retry.
private struct RetryBudget {
    static let reserve = 10
    private var window = OutcomeWindow()

    /// Records a first attempt (`first`) or a retry.
    mutating func add(_ now: UInt64, first: Bool) { window.add(at: now, failed: !first) }

    /// First attempts and retries in the window.
    func counts(at now: UInt64) -> (requests: Int, retries: Int) {
        let (total, retries) = window.counts(at: now)
        return (total - retries, retries)
    }
}

/// A consistent-hash ring: 100 points per unit of weight, so a target that leaves moves only its own keys.
private struct HashRing: Sendable {
    private let points: [(hash: UInt64, target: Int)]

    init(_ targets: [UpstreamTarget]) {
        var points: [(hash: UInt64, target: Int)] = []
        for (index, target) in targets.enumerated() {
            for replica in 0..<(100 * max(1, target.weight)) {
                points.append((Self.hash(target.url + "#" + String(replica)), index))
            }
        }
        self.points = points.sorted { $0.hash < $1.hash }
    }

    /// The first candidate clockwise from the key's point.
    func target(for key: String, among candidates: [Int]) -> Int {
        let hash = Self.hash(key)
        var low = 0
        var high = points.count
        while low < high {
            let middle = (low + high) / 2
            if points[middle].hash < hash { low = middle + 1 } else { high = middle }
        }
        for step in 0..<points.count {
            let point = points[(low + step) % points.count]
            if candidates.contains(point.target) { return point.target }
        }
        return candidates[0]
    }

    /// FNV-1a, 64 bits, finished with a mixer: stable across processes (Swift's `Hasher` is seeded per process).
    static func hash(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        hash ^= hash >> 33
        hash = hash &* 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        return hash
    }
}

/// A small, fast generator for balancing draws (not for anything secret).
private struct Xorshift {
    private var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9e37_79b9_7f4a_7c15 : seed }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

/// The per-target metrics, made once per load.
private struct TargetMetrics: Sendable {
    let requests: CoreMetrics.Counter
    let failures: CoreMetrics.Counter
    let ejections: CoreMetrics.Counter
    let pauses: CoreMetrics.Counter
    /// 0 closed, 1 half-open, 2 open.
    let breaker: CoreMetrics.Gauge
    /// 1 while the active health check passes.
    let healthy: CoreMetrics.Gauge

    init(upstream: String, target: String, factory: PrometheusMetricsFactory) {
        let dimensions = [("upstream", upstream), ("target", target)]
        func counter(_ name: String) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: "gatehouse_upstream_target_" + name, dimensions: dimensions, factory: factory)
        }
        requests = counter("requests_total")
        failures = counter("failures_total")
        ejections = counter("ejections_total")
        pauses = counter("pauses_total")
        breaker = CoreMetrics.Gauge(
            label: "gatehouse_upstream_target_breaker_state", dimensions: dimensions, factory: factory)
        healthy = CoreMetrics.Gauge(
            label: "gatehouse_upstream_target_healthy", dimensions: dimensions, factory: factory)
    }
}
