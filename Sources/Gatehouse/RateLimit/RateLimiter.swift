import CoreMetrics
import Crypto
import GatehouseConfig
import Logging
import NIOCore
import RawStructuredFieldValues
import Synchronization

/// A policy as the request path uses it, made once per config load: its script arguments, its member of
/// `RateLimit-Policy`, and its counters (`gatehouse_rate_limit_total{policy,result}`,
/// `gatehouse_rate_limit_fallback_total{policy,mode}`).
final class RateLimitRule: Sendable {
    let policy: RateLimitPolicy
    /// The store's arguments for the policy: algorithm (1 GCRA, 2 sliding window, 3 fixed window), requests,
    /// period in ms, burst.
    let scriptArguments: [String]
    /// Its member of `RateLimit-Policy`: `"name";q=<requests>;w=<seconds>`.
    let policyHeader: String
    /// Its name as a structured-field string, which each `RateLimit` member starts with.
    let quotedName: String
    let allowedCounter: CoreMetrics.Counter
    let limitedCounter: CoreMetrics.Counter
    let fallbackCounter: CoreMetrics.Counter
    /// GCRA's emission interval: the period over the requests, in whole microseconds (at least 1).
    let intervalMicroseconds: Int64
    /// Whether instances spend slices of this policy's buckets (``RateLimitLeases``): GCRA policies whose burst
    /// is at least ``leaseMinimumBurst``. Smaller ones, and the window algorithms, are checked in the store for
    /// every request, exactly.
    let leased: Bool

    /// The smallest burst whose buckets are leased in slices: a quarter of it is 16 slots.
    static let leaseMinimumBurst = 64

    init(_ policy: RateLimitPolicy, factory: MetricsFactory) {
        self.policy = policy
        let limit = Int64(max(1, policy.requests))
        intervalMicroseconds = max(1, (max(1, policy.per.milliseconds) * 1000 + limit / 2) / limit)
        leased = policy.algorithm == .gcra && policy.burst >= Self.leaseMinimumBurst
        let algorithm =
            switch policy.algorithm {
            case .gcra: "1"
            case .slidingWindow: "2"
            case .fixedWindow: "3"
            }
        scriptArguments = [
            algorithm, String(max(1, policy.requests)), String(max(1, policy.per.milliseconds)),
            String(max(1, policy.burst)),
        ]
        let seconds = RateLimitOutcome.seconds(policy.per.milliseconds)
        policyHeader = Self.member(policy.name, [("q", Int64(policy.requests)), ("w", seconds)])
        quotedName = Self.member(policy.name, [])
        func counter(_ label: String, _ dimension: (String, String)) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: label, dimensions: [("policy", policy.name), dimension], factory: factory)
        }
        allowedCounter = counter("gatehouse_rate_limit_total", ("result", "allowed"))
        limitedCounter = counter("gatehouse_rate_limit_total", ("result", "limited"))
        fallbackCounter = counter("gatehouse_rate_limit_fallback_total", ("mode", policy.onRedisError.rawValue))
    }
}

extension RateLimitRule {
    /// The most slots one instance may hold of a bucket that `holders` instances lease: a quarter of the burst,
    /// shared. What one quiet instance holds is what the others may find missing.
    func sliceCap(holders: Int) -> Int { max(1, policy.burst / (4 * max(1, holders))) }

    /// One list member of a structured field (RFC 8941): the string `name` with integer parameters.
    static func member(_ name: String, _ parameters: [(String, Int64)]) -> String {
        var map = OrderedMap<String, RFC9651BareItem>()
        for (key, value) in parameters { map[key] = .integer(value) }
        var serializer = StructuredFieldValueSerializer()
        let bytes = try? serializer.writeListFieldValue([.item(Item(bareItem: .string(name), parameters: map))])
        return String(decoding: bytes ?? [], as: UTF8.self)
    }
}

/// One policy applied to one request: the rule and the bucket key it counts in.
struct RateLimitCheck: Sendable {
    let rule: RateLimitRule
    /// `rl:<policy>:<identity>` under the store's prefix.
    let key: String

    var policy: RateLimitPolicy { rule.policy }
}

/// What the policies said about a request.
struct RateLimitOutcome: Sendable {
    struct Member: Sendable {
        var rule: RateLimitRule
        var allowed: Bool
        var remaining: Int
        /// Milliseconds until the bucket is full again (`t` of the RateLimit header).
        var resetMilliseconds: Int64
        /// Milliseconds until a request would pass (0 when allowed).
        var retryMilliseconds: Int64

        var policy: RateLimitPolicy { rule.policy }
    }

    var members: [Member]
    /// Not counted: Redis was away and a policy said `allow` (or the fallback decided).
    var degraded = false

    var allowed: Bool { members.allSatisfy(\.allowed) }

    /// `RateLimit-Policy` and `RateLimit` (IETF httpapi-ratelimit-headers), one member per policy.
    var headers: [(String, String)] {
        // A member is the policy's name and two sf-integers (plain digits), so only the name needs the serializer,
        // once per config load.
        func state(_ member: Member) -> String {
            "\(member.rule.quotedName);r=\(member.remaining);t=\(Self.seconds(member.resetMilliseconds))"
        }
        if members.count == 1, let member = members.first {
            return [("RateLimit-Policy", member.rule.policyHeader), ("RateLimit", state(member))]
        }
        return [
            ("RateLimit-Policy", members.map(\.rule.policyHeader).joined(separator: ", ")),
            ("RateLimit", members.map(state).joined(separator: ", ")),
        ]
    }

    /// Whole seconds, rounded up.
    static func seconds(_ milliseconds: Int64) -> Int64 { (min(max(0, milliseconds), 1 << 46) + 999) / 1000 }
}

/// What the limiter says about a request: at once (from this instance's slices), or after a store round trip.
enum RateLimitAnswer {
    case now(RateLimitOutcome)
    case later(EventLoopFuture<RateLimitOutcome>)
}

/// Enforces `rate_limits` across every instance with the Redis server's clock, falling back per policy
/// (`on_redis_error`) while Redis is away.
///
/// Policies with a roomy burst are spent from slices this instance leases (``RateLimitLeases``): most requests
/// need no round trip. The others are checked by one Lua script per request: each is evaluated, and only when
/// all pass are their buckets updated, so a request one policy refuses consumes nothing from the others. A
/// request with both kinds is checked by its slices first, then by the script; a refusal puts its slots back.
final class RateLimiter: Sendable {
    private let store: RateLimitStore
    private let leases: RateLimitLeases?
    private let local = LocalRateLimiter()
    private let logger: Logger
    private let eventLoop: EventLoop
    /// Gives back the slots of slices that went quiet, every ``RateLimitLeases/idleReturn``.
    private let sweeper: Mutex<RepeatedTask?>

    init(store: RateLimitStore, eventLoop: EventLoop, logger: Logger) {
        self.store = store
        let leases = (store as? RateLimitLeaseStore).map { RateLimitLeases(store: $0, logger: logger) }
        self.leases = leases
        self.logger = logger
        self.eventLoop = eventLoop
        let every = TimeAmount.nanoseconds(RateLimitLeases.idleReturn)
        sweeper = Mutex(
            leases.map { leases in
                eventLoop.scheduleRepeatedAsyncTask(initialDelay: every, delay: every) { _ in
                    leases.sweep(on: eventLoop)
                }
            })
    }

    /// Stops the sweeps and gives back every slot held (at shutdown).
    func close() async {
        sweeper.withLock { $0 }?.cancel()
        try? await leases?.sweep(all: true, on: eventLoop).get()
    }

    func check(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> RateLimitAnswer {
        guard let leases, checks.contains(where: \.rule.leased) else { return .later(exact(checks, on: eventLoop)) }
        var members = [RateLimitOutcome.Member?](repeating: nil, count: checks.count)
        var slots: [(RateLimitCheck, Int64)] = []
        var waiting: [(Int, EventLoopFuture<Void>?)] = []
        var refused = false
        for (index, check) in checks.enumerated() where check.rule.leased {
            switch leases.spend(check) {
            case .spent(let member, let slot):
                members[index] = member
                slots.append((check, slot))
            case .refused(let member):
                members[index] = member
                refused = true
            case .empty(let pending): waiting.append((index, pending))
            }
        }
        let waits = waiting
        if refused || (waits.isEmpty && !checks.contains { !$0.rule.leased }) {
            return .now(record(finish(members, slots: slots)))
        }
        let taken = waits.map { index, pending in leases.take(checks[index], pending: pending, on: eventLoop) }
        let (decided, spent) = (members, slots)
        let outcome = EventLoopFuture.whenAllSucceed(taken, on: eventLoop).flatMap { answers in
            var (members, slots) = (decided, spent)
            for ((index, _), (member, slot)) in zip(waits, answers) {
                members[index] = member
                if let slot { slots.append((checks[index], slot)) }
            }
            let unleased = checks.indices.filter { !checks[$0].rule.leased }
            guard members.allSatisfy({ $0?.allowed ?? true }), !unleased.isEmpty else {
                return eventLoop.makeSucceededFuture(self.finish(members, slots: slots))
            }
            let (leased, leasedSlots) = (members, slots)
            return self.store.rateLimit(unleased.map { checks[$0] }, on: eventLoop).map { outcome in
                var members = leased
                for (index, member) in zip(unleased, outcome.members) { members[index] = member }
                return self.finish(members, slots: leasedSlots)
            }
        }
        return .later(
            outcome.map { self.record($0) }.recover { error in
                self.logger.debug("rate limit check failed", metadata: ["error": "\(error)"])
                return self.record(self.fallback(checks))
            })
    }

    /// The outcome of the members decided (in the request's policy order; a policy not reached after a refusal
    /// has none); when one refused, the slots spent for the request go back.
    private func finish(_ members: [RateLimitOutcome.Member?], slots: [(RateLimitCheck, Int64)]) -> RateLimitOutcome {
        let outcome = RateLimitOutcome(members: members.compactMap { $0 })
        if !outcome.allowed { for (check, slot) in slots { leases?.unspend(check, slot: slot) } }
        return outcome
    }

    /// Every policy checked in the store, this request alone.
    private func exact(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome> {
        store.rateLimit(checks, on: eventLoop).map { self.record($0) }.recover { error in
            self.logger.debug("rate limit check failed", metadata: ["error": "\(error)"])
            return self.record(self.fallback(checks))
        }
    }

    /// Redis is away: each policy does what its `on_redis_error` says; `local` ones are counted in memory, and only
    /// when no `deny` policy refuses (a refused request consumes nothing).
    private func fallback(_ checks: [RateLimitCheck]) -> RateLimitOutcome {
        for check in checks { check.rule.fallbackCounter.increment() }
        let denying = checks.contains { $0.policy.onRedisError == .deny }
        let locals = checks.filter { $0.policy.onRedisError == .local }
        var members: [RateLimitOutcome.Member] = denying ? [] : local.check(locals).members
        for check in checks where check.policy.onRedisError != .local || denying {
            let deny = check.policy.onRedisError == .deny
            members.append(
                .init(
                    rule: check.rule, allowed: !deny, remaining: deny ? 0 : check.policy.requests,
                    resetMilliseconds: check.policy.per.milliseconds, retryMilliseconds: deny ? 1000 : 0))
        }
        // Keep the request's policy order for the headers.
        let order = checks.map(\.policy.name)
        members.sort { (order.firstIndex(of: $0.policy.name) ?? 0) < (order.firstIndex(of: $1.policy.name) ?? 0) }
        return RateLimitOutcome(members: members, degraded: true)
    }

    /// A request that passed counts as allowed by each of its policies; a refused one as limited by those that
    /// refused it.
    private func record(_ outcome: RateLimitOutcome) -> RateLimitOutcome {
        let passed = outcome.allowed
        for member in outcome.members where passed || !member.allowed {
            (passed ? member.rule.allowedCounter : member.rule.limitedCounter).increment()
        }
        return outcome
    }

    /// The bucket key of a policy for a request; long or odd identities are hashed so keys stay short and safe.
    static func key(_ policy: RateLimitPolicy, identity: String) -> String {
        let safe = identity.utf8.count <= 128 && identity.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F }
        let part =
            safe ? identity : "h:" + SHA256.hash(data: Array(identity.utf8)).map { String($0, radix: 16) }.joined()
        // The identity is the hash tag: in a cluster, the buckets one caller fills share a node and one script.
        return "rl:" + policy.name + ":{" + part + "}"
    }
}

/// The same algorithms in this process's memory, in whole microseconds like the script: exact for `memory://`,
/// per instance as the `local` fallback. At most `limit` buckets are kept; past that, expired ones are dropped,
/// and if too few are, the tenth that ends soonest (the callers seen least lately), so memory stays bounded and
/// the buckets of callers over their limit survive a flood of new keys.
final class LocalRateLimiter: Sendable {
    private struct Bucket {
        /// GCRA: theoretical arrival time (µs); windows: the count of `window`.
        var value: Int64
        var previous: Int64 = 0
        var window: Int64 = 0
        var expires: Int64
    }

    let limit: Int
    private let buckets = Mutex<[String: Bucket]>([:])

    init(limit: Int = 100_000) {
        self.limit = max(10, limit)
    }

    private static func now() -> Int64 { Int64(NIODeadline.now().uptimeNanoseconds / 1000) }

    func check(_ checks: [RateLimitCheck]) -> RateLimitOutcome {
        let now = Self.now()
        return buckets.withLock { buckets in
            var members: [RateLimitOutcome.Member] = []
            var commits: [(String, Bucket)] = []
            for check in checks {
                let policy = check.policy
                let limit = Int64(max(1, policy.requests))
                let period = max(1, policy.per.milliseconds) * 1000
                var bucket = buckets[check.key].flatMap { $0.expires > now ? $0 : nil }
                switch policy.algorithm {
                case .gcra:
                    let interval = max(1, (period + limit / 2) / limit)
                    let capacity = Int64(max(1, policy.burst)) * interval
                    let tat = max(bucket?.value ?? 0, now)
                    let next = tat + interval
                    if next - now <= capacity {
                        members.append(
                            .init(
                                rule: check.rule, allowed: true, remaining: Int((capacity - (next - now)) / interval),
                                resetMilliseconds: Self.milliseconds(next - now), retryMilliseconds: 0))
                        commits.append((check.key, Bucket(value: next, expires: next)))
                    } else {
                        members.append(
                            .init(
                                rule: check.rule, allowed: false, remaining: 0,
                                resetMilliseconds: Self.milliseconds(tat - now),
                                retryMilliseconds: Self.milliseconds(next - now - capacity)))
                    }
                case .slidingWindow, .fixedWindow:
                    let window = now / period
                    if bucket?.window != window {
                        let previous = bucket?.window == window - 1 ? bucket?.value ?? 0 : 0
                        bucket = Bucket(value: 0, previous: previous, window: window, expires: (window + 2) * period)
                    }
                    let current = bucket?.value ?? 0
                    let previous = policy.algorithm == .slidingWindow ? bucket?.previous ?? 0 : 0
                    let into = now % period
                    let used = Double(previous) * (1 - Double(into) / Double(period)) + Double(current)
                    let reset = period - into
                    if used + 1 <= Double(limit) {
                        members.append(
                            .init(
                                rule: check.rule, allowed: true, remaining: Int(Double(limit) - used - 1),
                                resetMilliseconds: Self.milliseconds(reset), retryMilliseconds: 0))
                        var updated = bucket ?? Bucket(value: 0, window: window, expires: (window + 2) * period)
                        updated.value += 1
                        commits.append((check.key, updated))
                    } else {
                        var retry = reset
                        if current + 1 > limit {
                            if policy.algorithm == .slidingWindow, current > 0 {
                                let fraction = 1 - Double(limit - 1) / Double(current)
                                retry = reset + max(0, Int64((fraction * Double(period)).rounded(.up)))
                            }
                        } else {
                            let fraction = 1 - Double(limit - current - 1) / Double(previous)
                            retry = Int64((fraction * Double(period)).rounded(.up)) - into
                        }
                        members.append(
                            .init(
                                rule: check.rule, allowed: false, remaining: 0,
                                resetMilliseconds: Self.milliseconds(reset),
                                retryMilliseconds: Self.milliseconds(retry)))
                    }
                }
            }
            if members.allSatisfy(\.allowed) {
                if buckets.count + commits.count > limit {
                    buckets = buckets.filter { $0.value.expires > now }
                    if buckets.count + commits.count > limit {
                        let oldest = buckets.sorted { $0.value.expires < $1.value.expires }.prefix(limit / 10)
                        for (key, _) in oldest { buckets[key] = nil }
                    }
                }
                for (key, bucket) in commits { buckets[key] = bucket }
            } else {
                for index in members.indices where members[index].allowed { members[index].remaining += 1 }
            }
            return RateLimitOutcome(members: members)
        }
    }

    /// Microseconds as whole milliseconds, rounded up.
    private static func milliseconds(_ microseconds: Int64) -> Int64 { max(0, (microseconds + 999) / 1000) }
}
