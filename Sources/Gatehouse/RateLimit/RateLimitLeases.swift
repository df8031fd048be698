import GatehouseConfig
import Logging
import NIOCore
import Synchronization

/// What the store granted for one lease: a run of consecutive slots on a GCRA bucket's timeline, or a refusal.
struct RateLimitGrant: Sendable {
    /// How many slots were reserved (0: refused).
    var slots: Int
    /// Microseconds from the script's clock reading to the bucket's stored time before the grant (never negative):
    /// the first slot is one interval after it.
    var start: Int64
    /// The bucket's stored time after the grant, on the store's clock in microseconds: what a give-back checks.
    var tail: Int64
    /// When refused: microseconds until a request would pass.
    var retry: Int64
    /// How many instances leased this bucket lately (this one included).
    var holders: Int
}

/// Where leases come from: Redis, shared by the fleet. (In memory, checks are local anyway and need none.)
protocol RateLimitLeaseStore: Sendable {
    /// Reserves up to `slots` slots of the check's bucket in one atomic step.
    func leaseSlots(_ check: RateLimitCheck, slots: Int, on eventLoop: EventLoop) -> EventLoopFuture<RateLimitGrant>
    /// Gives back the last `slots` slots of a grant whose stored time was `tail`, if nothing was reserved since;
    /// says whether it did.
    func returnSlots(_ check: RateLimitCheck, tail: Int64, slots: Int, on eventLoop: EventLoop)
        -> EventLoopFuture<Bool>
}

/// Slices of the fleet's GCRA buckets that this instance spends without a Redis round trip per request.
///
/// A slice is a run of consecutive slots on a bucket's timeline (its theoretical arrival times), reserved by one
/// script that advances the stored time by k emission intervals at once. A slot is the interval it stands for; it
/// is spent from the moment it was granted until that interval begins, which is when GCRA itself would have
/// admitted a request into it; slots whose interval has begun lapse. So every request the fleet admits holds a slot of its own, and the fleet never admits more
/// than the policy allows. What it costs: slots reserved by a quiet instance are not there for the others until
/// their time passes or they are given back, so the slice size is bounded by ``RateLimitRule/sliceCap(holders:)``
/// (a quarter of the burst shared by the instances that lease the bucket) and follows the key's own rate.
///
/// A slice not spent for ``idleReturn`` gives its remaining slots back, when it is still the newest reservation
/// on the bucket's timeline (a compare-and-set on the stored time); otherwise it keeps them, for this instance's
/// next requests, until they lapse.
final class RateLimitLeases: Sendable {
    /// One bucket's slice. Times are this process's uptime in nanoseconds.
    private struct Slice {
        /// The policy and bucket, for the give-back.
        var check: RateLimitCheck
        var interval: Int64
        /// The start of the next slot to spend.
        var next: Int64 = 0
        /// Slots left, from `next` on, one interval apart.
        var count = 0
        /// The start of the last slot granted, and the bucket's stored time then on the store's clock.
        var tail: Int64 = 0
        var storeTail: Int64 = 0
        /// Refused by the store: every request is refused until then.
        var refusedUntil: Int64 = 0
        var refusedReset: Int64 = 0
        /// The lease in flight, which requests finding the slice empty wait for.
        var fetch: EventLoopFuture<Void>?
        /// Whether the last lease brought slots beyond its own request's: only then do others wait for the next
        /// one. Otherwise (a tiny cap, a timeline denser than the round trip) each request leases for itself, at
        /// once, as the exact path would.
        var waitWorthwhile = true
        /// Slots spent since the last lease was asked for, and when: the key's rate here.
        var spent = 0
        var since: Int64
        var lastUse: Int64 = 0
        var holders = 1

        /// Drops the slots whose interval has begun.
        mutating func lapse(now: Int64) {
            guard count > 0, next < now else { return }
            let passed = Int((now - next + interval - 1) / interval)
            count = max(0, count - passed)
            next += Int64(passed) * interval
        }
    }

    /// A slice spends its key's rate over this long before it asks for the next one.
    static let leaseSpan: Int64 = 100_000_000
    /// A slice not spent for this long gives its slots back.
    static let idleReturn: Int64 = 100_000_000
    /// At most this many buckets have slices; past it, new keys are checked one request at a time.
    static let sliceLimit = 50_000

    private let store: RateLimitLeaseStore
    private let slices = Mutex<[String: Slice]>([:])
    private let logger: Logger

    init(store: RateLimitLeaseStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    static func now() -> Int64 { Int64(NIODeadline.now().uptimeNanoseconds) }

    /// What a slice could say about a check at once.
    enum Local {
        /// A slot was spent: the member to answer with, and the slot's time (to give it back with
        /// ``unspend(_:slot:)``).
        case spent(RateLimitOutcome.Member, slot: Int64)
        /// The store refused lately and its retry time has not come.
        case refused(RateLimitOutcome.Member)
        /// No slot here: a lease is needed (or is on its way: wait for `pending`).
        case empty(pending: EventLoopFuture<Void>?)
    }

    /// Spends a slot of the check's slice if it has one.
    func spend(_ check: RateLimitCheck) -> Local {
        let now = Self.now()
        return slices.withLock { slices -> Local in
            guard var slice = slices[check.key] else { return .empty(pending: nil) }
            guard slice.interval == check.rule.intervalMicroseconds * 1000 else {
                // The policy changed on a reload: its old slots lapse.
                slices[check.key] = nil
                return .empty(pending: nil)
            }
            defer { slices[check.key] = slice }
            slice.lapse(now: now)
            if slice.count > 0 {
                let slot = slice.next
                slice.count -= 1
                slice.next += slice.interval
                slice.spent += 1
                slice.lastUse = now
                return .spent(Self.member(check, slice, now: now), slot: slot)
            }
            if slice.refusedUntil > now {
                return .refused(
                    .init(
                        rule: check.rule, allowed: false, remaining: 0,
                        resetMilliseconds: Self.milliseconds(slice.refusedReset - now),
                        retryMilliseconds: Self.milliseconds(slice.refusedUntil - now)))
            }
            return .empty(pending: slice.fetch)
        }
    }

    /// Puts back a slot spent for a request that another policy refused, if it is still the one just before the
    /// slice's next slot (nobody spent after it) and its time has not passed; otherwise it stays spent.
    func unspend(_ check: RateLimitCheck, slot: Int64) {
        let now = Self.now()
        slices.withLock { slices in
            guard var slice = slices[check.key], slot >= now, slice.next - slice.interval == slot else { return }
            slice.count += 1
            slice.next = slot
            slice.spent -= 1
            slices[check.key] = slice
        }
    }

    /// The answer for a check whose slice was empty. One lease per bucket is in flight at a time: a request that
    /// finds one waits for it and spends a slot of it; if those slots are gone by then, it waits for the next
    /// lease, or asks for it. Every lease serves at least the request that asked for it (or refuses), so every
    /// request gets its answer.
    func take(_ check: RateLimitCheck, pending: EventLoopFuture<Void>?, on eventLoop: EventLoop)
        -> EventLoopFuture<(RateLimitOutcome.Member, slot: Int64?)>
    {
        if let pending {
            return pending.hop(to: eventLoop).flatMap {
                switch self.spend(check) {
                case .spent(let member, let slot): eventLoop.makeSucceededFuture((member, slot))
                case .refused(let member): eventLoop.makeSucceededFuture((member, nil))
                case .empty(let pending): self.take(check, pending: pending, on: eventLoop)
                }
            }
        }
        let rule = check.rule
        let sent = Self.now()
        let promise = eventLoop.makePromise(of: Void.self)
        enum Start {
            case lease(slots: Int)
            /// Too many slices, or a lease in flight not worth waiting for: this request leases one slot alone.
            case alone
            case wait(EventLoopFuture<Void>)
        }
        let start = slices.withLock { slices -> Start in
            if slices[check.key] == nil, slices.count >= Self.sliceLimit { return .alone }
            var slice =
                slices[check.key] ?? Slice(check: check, interval: rule.intervalMicroseconds * 1000, since: sent)
            if let fetch = slice.fetch {
                guard slice.waitWorthwhile else { return .alone }
                return .wait(fetch)
            }
            // The key's rate here over the last lease, in requests per lease span.
            let rate = Int64(slice.spent) * Self.leaseSpan / max(sent - slice.since, 1_000_000)
            // Enough slots for that rate, and slots that last a lease span (a dense timeline lapses fast).
            let byTime = min(Self.leaseSpan / slice.interval, 1 << 30)
            let want = min(rule.sliceCap(holders: slice.holders), Int(max(1, rate + 1, byTime)))
            slice.spent = 0
            slice.since = sent
            slice.fetch = promise.futureResult
            slices[check.key] = slice
            return .lease(slots: want)
        }
        let want: Int
        switch start {
        case .wait(let fetch):
            promise.succeed()
            return take(check, pending: fetch, on: eventLoop)
        case .alone:
            promise.succeed()
            return store.leaseSlots(check, slots: 1, on: eventLoop).map { grant in
                // Counted in the key's rate, so that the next lease is sized to it.
                if grant.slots > 0 { self.slices.withLock { $0[check.key]?.spent += 1 } }
                return (Self.member(check, grant: grant), nil)
            }
        case .lease(let slots): want = slots
        }
        return store.leaseSlots(check, slots: want, on: eventLoop).map { grant in
            let answer = self.apply(grant, to: check, sent: sent)
            promise.succeed()
            return answer
        }.flatMapErrorThrowing { error in
            self.slices.withLock { slices in
                if slices[check.key]?.fetch === promise.futureResult { slices[check.key]?.fetch = nil }
            }
            // The requests waiting for this lease fall back as this one does.
            promise.fail(error)
            throw error
        }
    }

    /// Stores a grant's slots in the slice, and spends the first for the request that asked.
    private func apply(_ grant: RateLimitGrant, to check: RateLimitCheck, sent: Int64)
        -> (RateLimitOutcome.Member, slot: Int64?)
    {
        let now = Self.now()
        return slices.withLock { slices -> (RateLimitOutcome.Member, slot: Int64?) in
            var slice =
                slices[check.key] ?? Slice(check: check, interval: check.rule.intervalMicroseconds * 1000, since: sent)
            defer { slices[check.key] = slice }
            slice.fetch = nil
            slice.holders = max(1, grant.holders)
            guard grant.slots > 0 else {
                // Anchored at the time the lease was sent: the store read its clock later, so this ends early,
                // never late.
                slice.refusedUntil = sent + grant.retry * 1000
                slice.refusedReset = sent + grant.start * 1000
                return (Self.member(check, grant: grant), nil)
            }
            // Slots are anchored at the time the lease was sent too, no later than the store's clock reading: a slot
            // lapses here no later than it does in the store. The first slot begins at the stored time before.
            let first = sent + grant.start * 1000
            slice.lapse(now: now)
            slice.refusedUntil = 0
            if slice.count > 0, grant.tail - Int64(grant.slots) * slice.interval / 1000 != slice.storeTail {
                // Slots left that this grant does not continue (a request put one back, or a lease of one ran
                // beside the slice's): they stay the run; this request is counted by its own grant's first slot.
                slice.waitWorthwhile = grant.slots > 1
                return (Self.member(check, grant: grant), nil)
            }
            if slice.count > 0 {
                // Right after what is left, on the store's timeline: one run.
                slice.count += grant.slots
            } else {
                slice.next = first
                slice.count = grant.slots
            }
            slice.tail = slice.next + Int64(slice.count - 1) * slice.interval
            slice.storeTail = grant.tail
            slice.lapse(now: now)
            guard slice.count > 0 else {
                // Every slot lapsed on the way (a timeline denser than the round trip). The store counted one for
                // this request, as the exact script would have: it passes; the next requests lease for themselves.
                slice.waitWorthwhile = false
                return (Self.member(check, grant: grant), nil)
            }
            let slot = slice.next
            slice.count -= 1
            slice.next += slice.interval
            slice.spent += 1
            slice.lastUse = now
            slice.waitWorthwhile = slice.count > 0
            return (Self.member(check, slice, now: now), slot)
        }
    }

    /// Gives back the slots of slices idle for ``idleReturn`` and forgets slices with nothing left to say; with
    /// `all`, every slice (at shutdown).
    func sweep(all: Bool = false, on eventLoop: EventLoop) -> EventLoopFuture<Void> {
        let now = Self.now()
        let returns = slices.withLock { slices -> [(key: String, slice: Slice, done: EventLoopPromise<Void>)] in
            var returns: [(key: String, slice: Slice, done: EventLoopPromise<Void>)] = []
            for (key, var slice) in slices where slice.fetch == nil {
                guard all || now - slice.lastUse >= Self.idleReturn else { continue }
                slice.lapse(now: now)
                // Only slots at the end of the bucket's timeline can go back: this slice's last grant, untouched,
                // if nothing was reserved since (the store compares its stored time with that grant's). While the
                // store decides, they are not spent, and requests wait for its answer as for a lease.
                if slice.count > 0, slice.next + Int64(slice.count - 1) * slice.interval == slice.tail {
                    let done = eventLoop.makePromise(of: Void.self)
                    returns.append((key, slice, done))
                    slice.count = 0
                    slice.fetch = done.futureResult
                    slice.waitWorthwhile = true
                    slices[key] = slice
                    continue
                }
                // A slice keeps slots it cannot give back, for this instance's next requests, until they lapse.
                slices[key] = all || (slice.count == 0 && slice.refusedUntil <= now) ? nil : slice
            }
            return returns
        }
        let futures = returns.map { key, slice, done in
            store.returnSlots(slice.check, tail: slice.storeTail, slots: slice.count, on: eventLoop).map { taken in
                self.slices.withLock { slices in
                    guard var current = slices[key], current.fetch === done.futureResult else { return }
                    current.fetch = nil
                    // Not taken (another instance reserved since): still this instance's to spend.
                    if !taken {
                        current.next = slice.next
                        current.count = slice.count
                    }
                    slices[key] = all ? nil : current
                }
                done.succeed()
            }.recover { error in
                // Whether the store took them is unknown: they are not spent here, never twice.
                self.slices.withLock { slices in
                    if slices[key]?.fetch === done.futureResult { slices[key]?.fetch = nil }
                }
                done.succeed()
                self.logger.debug("could not give rate-limit slots back", metadata: ["error": "\(error)"])
            }
        }
        return EventLoopFuture.andAllComplete(futures, on: eventLoop)
    }

    /// A spent slot's member: what the bucket holds as of this instance's last lease, with its own slots counted
    /// as available.
    private static func member(_ check: RateLimitCheck, _ slice: Slice, now: Int64) -> RateLimitOutcome.Member {
        let interval = slice.interval
        let capacity = Int64(max(1, check.policy.burst)) * interval
        // The bucket's stored time, as this instance knows it, if it gave back what it holds.
        let full = max(0, slice.tail + interval - Int64(slice.count) * interval - now)
        return .init(
            rule: check.rule, allowed: true, remaining: Int(max(0, (capacity - full) / interval)),
            resetMilliseconds: milliseconds(full), retryMilliseconds: 0)
    }

    /// The member of a grant taken whole by one request (no slice kept).
    private static func member(_ check: RateLimitCheck, grant: RateLimitGrant) -> RateLimitOutcome.Member {
        let interval = check.rule.intervalMicroseconds
        let capacity = Int64(max(1, check.policy.burst)) * interval
        if grant.slots == 0 {
            return .init(
                rule: check.rule, allowed: false, remaining: 0, resetMilliseconds: (grant.start + 999) / 1000,
                retryMilliseconds: (grant.retry + 999) / 1000)
        }
        let full = grant.start + interval
        return .init(
            rule: check.rule, allowed: true, remaining: Int(max(0, (capacity - full) / interval)),
            resetMilliseconds: (full + 999) / 1000, retryMilliseconds: 0)
    }

    /// Nanoseconds as whole milliseconds, rounded up.
    private static func milliseconds(_ nanoseconds: Int64) -> Int64 { max(0, (nanoseconds + 999_999) / 1_000_000) }
}
