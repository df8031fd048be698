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
    func record(_ outcome: AttemptOutcome, target index: Int, probe: Bool) {
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

    func end(target index: Int) {
        state.withLock { $0.targets[index].inFlight -= 1 }
    }

    /// A 429 or 503 with `Retry-After`: the target is left alone for `milliseconds` (capped at ``maxPause``).
    /// Returns whether that is news: a pause that starts, or ends at least a second later than the one running.
    /// Counted in the metrics when it starts.
    @discardableResult
    func pause(target index: Int, status: Int, milliseconds: Int64) -> Bool {
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
                    verifyTLS: config.tls.verify, caFile: config.tls.caFile,
                    httpVersion: ForwardPhase.httpVersion(config.protocol))
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
