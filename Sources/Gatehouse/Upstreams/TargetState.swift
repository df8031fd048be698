import CoreMetrics
import GatehouseConfig
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization
import UpstreamClient

/// The state behind an upstream pool's lock: each target's health, ejections, breaker and pauses, the retry
/// budget, and the balancers' helpers. Values only; ``UpstreamPool`` owns the lock.
struct PoolState {
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

/// One target's health, passive ejection, circuit breaker and `Retry-After` pause, as a value the pool's lock guards.
struct TargetState {
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
struct OutcomeWindow {
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
struct RetryBudget {
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
struct HashRing: Sendable {
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
struct Xorshift {
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
struct TargetMetrics: Sendable {
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
