import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOPosix
import RedisClient
import Synchronization

/// ``SharedStore`` on Redis, with every key under the configured prefix.
final class RedisStore: SharedStore, RateLimitLeaseStore {
    /// One server (``RedisClient``) or a cluster (``RedisCluster``): keys that one script touches share a hash tag
    /// (a route's cache keys `{route}`, a rate-limit identity's buckets `{identity}`).
    let client: any RedisCommands
    private let prefix: String
    private let display: String
    private let group: EventLoopGroup
    private let logger: Logger
    private let subscriptions = Mutex<[RedisSubscription]>([])
    /// This instance's mark on the fleet locks it holds.
    private let lockOwner = Array(UUID().uuidString.utf8)

    init(
        client: any RedisCommands, prefix: String, display: String,
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger = Logger(label: "gatehouse")
    ) {
        self.client = client
        self.prefix = prefix
        self.display = display
        self.group = group
        self.logger = logger
    }

    var problem: String? { client.problem.map { "redis \(display): \($0)" } }

    func get(_ key: String) async throws -> [UInt8]? {
        try await client.get(prefix + key)
    }

    func get(_ key: String, on eventLoop: EventLoop) -> EventLoopFuture<[UInt8]?> {
        client.send(["GET", .string(prefix + key)], key: prefix + key, on: eventLoop).map(\.bytes)
    }

    func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int?, onlyIfAbsent: Bool) async throws -> Bool {
        try await client.set(prefix + key, value, expireMilliseconds: expireMilliseconds, onlyIfAbsent: onlyIfAbsent)
    }

    func delete(_ keys: [String]) async throws -> Int {
        guard !keys.isEmpty else { return 0 }
        guard client.crossesSlots else {
            // In a cluster the keys may live on different nodes: one DEL each.
            var count = 0
            for key in keys {
                count += Int(try await client.send(["DEL", .string(prefix + key)], key: prefix + key).integer ?? 0)
            }
            return count
        }
        return Int(try await client.send(["DEL"] + keys.map { .string(prefix + $0) }, key: nil).integer ?? 0)
    }

    static let deleteIfEqualScript = RedisScript(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")

    func delete(_ key: String, ifEqualTo value: [UInt8]) async throws -> Bool {
        let reply = try await client.evalsha(Self.deleteIfEqualScript, keys: [prefix + key], arguments: [.bytes(value)])
        return reply.integer == 1
    }

    static let incrementScript = RedisScript(
        """
        local n = redis.call('INCR', KEYS[1])
        if n == 1 and tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
        return n
        """)

    func increment(_ key: String, expireMilliseconds: Int?) async throws -> Int64 {
        let reply = try await client.evalsha(
            Self.incrementScript, keys: [prefix + key], arguments: [.string(String(expireMilliseconds ?? 0))])
        return reply.integer ?? 0
    }

    /// Keys: `cache:{route}:gen` holds the route's generation; `cache:{route}:pv:{path}` a path's version;
    /// `cache:{route}:{gen}:{path}` is a path's record (a hash); `cache:{route}:{gen}:#` counts the entries written
    /// in that generation, for the purge answer.
    /// `<prefix>cache:{<route>}:<rest>`, built in one allocation.
    private func cacheKey(_ route: String, _ rest: String) -> String {
        var key = ""
        key.reserveCapacity(prefix.utf8.count + route.utf8.count + rest.utf8.count + 9)
        key += prefix
        key += "cache:{"
        key += route
        key += "}:"
        key += rest
        return key
    }

    static let cacheReadScript = RedisScript(
        """
        local g = redis.call('GET', KEYS[1]) or '0'
        local out = {g, redis.call('GET', ARGV[1] .. 'pv:' .. ARGV[2]) or '0'}
        local record = ARGV[1] .. g .. ':' .. ARGV[2]
        for i = 3, #ARGV do out[#out + 1] = redis.call('HGET', record, ARGV[i]) end
        return out
        """)

    /// KEYS: record, counter, generation, path version. ARGV: ttl, generation and path version seen, the number of
    /// fields to remove, those fields, then field/value pairs. Returns 0 when a purge came in between.
    static let cacheWriteScript = RedisScript(
        """
        if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[2] or (redis.call('GET', KEYS[4]) or '0') ~= ARGV[3] then
          return 0
        end
        local ttl = tonumber(ARGV[1])
        local removals = tonumber(ARGV[4])
        for i = 5, 4 + removals do
          if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 and string.byte(ARGV[i], -1) ~= 1 then
            redis.call('DECR', KEYS[2])
          end
        end
        for i = 5 + removals, #ARGV, 2 do
          if redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 and string.byte(ARGV[i], -1) ~= 1 then
            redis.call('INCR', KEYS[2])
          end
        end
        for i = 1, 2 do
          if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
        end
        return 1
        """)

    /// Purges and tells every instance (`PUBLISH` on the purge channel: route, newline, path or nothing).
    static let cachePurgeScript = RedisScript(
        """
        local g = redis.call('GET', KEYS[1]) or '0'
        local counter = ARGV[1] .. g .. ':#'
        redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\\n' .. ARGV[2])
        if ARGV[2] == '' then
          local n = tonumber(redis.call('GET', counter) or '0')
          redis.call('INCR', KEYS[1])
          return n
        end
        local version = ARGV[1] .. 'pv:' .. ARGV[2]
        redis.call('INCR', version)
        redis.call('PEXPIRE', version, 86400000)
        local record = ARGV[1] .. g .. ':' .. ARGV[2]
        local n = 0
        for _, field in ipairs(redis.call('HKEYS', record)) do
          if string.byte(field, -1) ~= 1 then n = n + 1 end
        end
        redis.call('DEL', record)
        if n > 0 and redis.call('EXISTS', counter) == 1 then redis.call('DECRBY', counter, n) end
        return n
        """)

    func cacheRead(route: String, path: String, fields: [String], on eventLoop: EventLoop)
        -> EventLoopFuture<CacheRecord>
    {
        var arguments: [RedisArgument] = [.string(cacheKey(route, "")), .string(path)]
        arguments.reserveCapacity(2 + fields.count)
        for field in fields { arguments.append(.string(field)) }
        return client.evalsha(
            Self.cacheReadScript, keys: [cacheKey(route, "gen")], arguments: arguments, on: eventLoop
        ).flatMapThrowing { reply in
            guard case .array(let items?) = reply, items.count >= 2,
                let generation = items[0].string.flatMap({ Int64($0) }),
                let pathVersion = items[1].string.flatMap({ Int64($0) })
            else {
                throw RedisError(.protocolError, "unexpected reply to the cache read")
            }
            return CacheRecord(
                version: CacheVersion(generation: generation, path: pathVersion),
                values: items.dropFirst(2).map(\.bytes))
        }
    }

    func cacheWrite(
        route: String, version: CacheVersion, path: String, set: [(field: String, value: [UInt8])],
        remove: [String], expireMilliseconds: Int64, on eventLoop: EventLoop
    ) -> EventLoopFuture<Void> {
        var arguments: [RedisArgument] = [
            .string(String(expireMilliseconds)), .string(String(version.generation)), .string(String(version.path)),
            .string(String(remove.count)),
        ]
        arguments += remove.map { .string($0) }
        for (field, value) in set { arguments += [.string(field), .bytes(value)] }
        let generation = version.generation
        return client.evalsha(
            Self.cacheWriteScript,
            keys: [
                cacheKey(route, "\(generation):\(path)"), cacheKey(route, "\(generation):#"), cacheKey(route, "gen"),
                cacheKey(route, "pv:" + path),
            ],
            arguments: arguments, on: eventLoop
        ).map { _ in }
    }

    func cachePurge(route: String, path: String?) async throws -> Int {
        let reply = try await client.evalsha(
            Self.cachePurgeScript, keys: [cacheKey(route, "gen")],
            arguments: [.string(cacheKey(route, "")), .string(path ?? ""), .string(purgeChannel), .string(route)])
        return Int(reply.integer ?? 0)
    }

    private var purgeChannel: String { prefix + "cache:purge" }

    /// The rate-limit script over the request's buckets (see ``rateLimitScript``). In a cluster, the buckets of one
    /// identity share a slot and one script; a request whose policies count different identities runs one script
    /// per slot, and is refused when any refuses (the others may then have counted it).
    func rateLimit(_ checks: [RateLimitCheck], on eventLoop: EventLoop) -> EventLoopFuture<RateLimitOutcome> {
        guard !client.crossesSlots, checks.count > 1 else { return rateLimitScript(checks, on: eventLoop) }
        // The checks' positions, grouped by slot, in the order the slots first appear.
        var groups: [Int: [Int]] = [:]
        var order: [Int] = []
        for (index, check) in checks.enumerated() {
            let slot = RedisHashSlot.of(prefix + check.key)
            if groups[slot] == nil { order.append(slot) }
            groups[slot, default: []].append(index)
        }
        guard order.count > 1 else { return rateLimitScript(checks, on: eventLoop) }
        let positions = order.compactMap { groups[$0] }
        let runs = positions.map { group in rateLimitScript(group.map { checks[$0] }, on: eventLoop) }
        return EventLoopFuture.whenAllSucceed(runs, on: eventLoop).map { outcomes in
            // Back in the checks' order.
            var members = [RateLimitOutcome.Member?](repeating: nil, count: checks.count)
            for (group, outcome) in zip(positions, outcomes) {
                for (position, member) in zip(group, outcome.members) { members[position] = member }
            }
            return RateLimitOutcome(members: members.compactMap { $0 })
        }
    }

    private func rateLimitScript(_ checks: [RateLimitCheck], on eventLoop: EventLoop)
        -> EventLoopFuture<RateLimitOutcome>
    {
        var arguments: [RedisArgument] = []
        arguments.reserveCapacity(checks.count * 4)
        for check in checks { for argument in check.rule.scriptArguments { arguments.append(.string(argument)) } }
        return client.evalsha(
            Self.rateLimitScript, keys: checks.map { prefix + $0.key }, arguments: arguments, on: eventLoop
        ).flatMapThrowing { try Self.rateLimitOutcome(checks, reply: $0) }
    }

    /// The script: KEYS are the buckets; ARGV holds four numbers per policy: algorithm (1 GCRA, 2 sliding window,
    /// 3 fixed window), requests, period in ms, burst. Returns, per policy: allowed, remaining, reset ms, retry ms.
    static let rateLimitScript = RedisScript(
        """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local n = #KEYS
        local out = {}
        local commits = {}
        local all = true
        for i = 1, n do
          local alg = tonumber(ARGV[i * 4 - 3])
          local limit = tonumber(ARGV[i * 4 - 2])
          local period = tonumber(ARGV[i * 4 - 1]) * 1000
          local burst = tonumber(ARGV[i * 4])
          local key = KEYS[i]
          local allowed, remaining, reset, retry
          if alg == 1 then
            -- GCRA in whole microseconds: exact integers in a double.
            local interval = math.max(1, math.floor(period / limit + 0.5))
            local capacity = burst * interval
            local tat = tonumber(redis.call('GET', key) or '0')
            if tat < now then tat = now end
            local new = tat + interval
            if new - now <= capacity then
              allowed = 1
              remaining = math.floor((capacity - (new - now)) / interval)
              reset = new - now
              retry = 0
              commits[i] = {'gcra', new, new - now}
            else
              allowed = 0
              remaining = 0
              reset = tat - now
              retry = new - now - capacity
            end
          else
            local window = math.floor(now / period)
            local into = now % period
            local current = tonumber(redis.call('GET', key .. ':' .. window) or '0')
            local previous = 0
            if alg == 2 then previous = tonumber(redis.call('GET', key .. ':' .. (window - 1)) or '0') end
            local used = previous * (1 - into / period) + current
            reset = period - into
            if used + 1 <= limit then
              allowed = 1
              remaining = math.floor(limit - used - 1)
              retry = 0
              commits[i] = {'count', key .. ':' .. window, (alg == 2 and 2 or 1) * period}
            else
              allowed = 0
              remaining = 0
              if current + 1 > limit then
                -- Not before the next window; there the current count weighs as the previous one.
                retry = reset
                if alg == 2 and current > 0 then
                  retry = reset + math.max(0, math.ceil((1 - (limit - 1) / current) * period))
                end
              else
                -- The previous window's weight has to fall far enough within this one.
                retry = math.ceil((1 - (limit - current - 1) / previous) * period) - into
              end
            end
          end
          if allowed == 0 then all = false end
          out[#out + 1] = allowed
          out[#out + 1] = remaining
          out[#out + 1] = reset
          out[#out + 1] = retry
        end
        if all then
          for i = 1, n do
            local c = commits[i]
            if c[1] == 'gcra' then
              redis.call('SET', KEYS[i], string.format('%d', c[2]), 'PX', math.max(1, math.ceil(c[3] / 1000)))
            else
              redis.call('INCR', c[2])
              redis.call('PEXPIRE', c[2], math.ceil(c[3] / 1000))
            end
          end
        else
          -- A refused request counted nothing: the others' remaining is one more than computed.
          for i = 1, n do
            if out[i * 4 - 3] == 1 then out[i * 4 - 2] = out[i * 4 - 2] + 1 end
          end
        end
        -- Times go back in whole milliseconds, rounded up.
        for i = 1, n do
          out[i * 4 - 1] = math.ceil(out[i * 4 - 1] / 1000)
          out[i * 4] = math.ceil(out[i * 4] / 1000)
        end
        return out
        """)

    /// The script's reply as the policies' verdicts.
    static func rateLimitOutcome(_ checks: [RateLimitCheck], reply: RedisValue) throws -> RateLimitOutcome {
        guard case .array(let items?) = reply, items.count == checks.count * 4 else {
            throw RedisError(.protocolError, "unexpected reply to the rate limit script")
        }
        // Bounded, so that no reply (another script under the same name, a damaged server) can trap the sums.
        let numbers = items.map { min(max($0.integer ?? 0, 0), 1 << 46) }
        return RateLimitOutcome(
            members: checks.enumerated().map { index, check in
                .init(
                    rule: check.rule, allowed: numbers[index * 4] == 1, remaining: Int(numbers[index * 4 + 1]),
                    resetMilliseconds: numbers[index * 4 + 2], retryMilliseconds: numbers[index * 4 + 3])
            })
    }

    func leaseSlots(_ check: RateLimitCheck, slots: Int, on eventLoop: EventLoop) -> EventLoopFuture<RateLimitGrant> {
        let bucket = prefix + check.key
        let interval = check.rule.intervalMicroseconds
        return client.evalsha(
            Self.leaseScript, keys: [bucket, bucket + ":holders"],
            arguments: [
                .string(String(interval)), .string(String(Int64(max(1, check.policy.burst)) * interval)),
                .string(String(max(1, slots))), .bytes(lockOwner), .string(String(Self.holderWindowMilliseconds)),
            ], on: eventLoop
        ).flatMapThrowing { reply in
            guard case .array(let items?) = reply, items.count == 5 else {
                throw RedisError(.protocolError, "unexpected reply to the rate limit lease script")
            }
            // Bounded, so that no reply can trap the sums or grant more than was asked.
            let numbers = items.map { min(max($0.integer ?? 0, 0), 1 << 52) }
            return RateLimitGrant(
                slots: Int(min(numbers[0], Int64(max(1, slots)))), start: numbers[1], tail: numbers[2],
                retry: numbers[3], holders: Int(min(numbers[4], 1 << 20)))
        }
    }

    func returnSlots(_ check: RateLimitCheck, tail: Int64, slots: Int, on eventLoop: EventLoop)
        -> EventLoopFuture<Bool>
    {
        client.evalsha(
            Self.returnScript, keys: [prefix + check.key],
            arguments: [
                .string(String(tail)), .string(String(slots)), .string(String(check.rule.intervalMicroseconds)),
            ],
            on: eventLoop
        ).map { $0.integer == 1 }
    }

    /// How long an instance counts as a holder of a bucket after its last lease.
    static let holderWindowMilliseconds = 10_000

    /// A lease: KEYS are the bucket and its holders (instance id -> time of its last lease); ARGV are the interval
    /// and capacity (burst x interval) in µs, the slots wanted, this instance's id and the holder window in ms.
    /// Reserves as many slots as the bucket allows, up to the want and to a quarter of the burst shared by the
    /// holders, by advancing its stored time (GCRA's theoretical arrival time) that many intervals. Returns slots, µs from now to the stored time before, the stored time
    /// after (µs), µs until a request would pass when none was granted, and the number of holders.
    static let leaseScript = RedisScript(
        """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local interval = tonumber(ARGV[1])
        local capacity = tonumber(ARGV[2])
        local want = tonumber(ARGV[3])
        local window = tonumber(ARGV[5])
        redis.call('HSET', KEYS[2], ARGV[4], now)
        local holders = 0
        local seen = redis.call('HGETALL', KEYS[2])
        for i = 1, #seen, 2 do
          if tonumber(seen[i + 1]) < now - window * 1000 then
            redis.call('HDEL', KEYS[2], seen[i])
          else
            holders = holders + 1
          end
        end
        redis.call('PEXPIRE', KEYS[2], window)
        local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
        if tat < now then tat = now end
        -- At most a quarter of the burst, shared by the holders: what quiet instances hold is bounded.
        local cap = math.max(1, math.floor(capacity / interval / (4 * holders)))
        local n = math.min(want, cap, math.floor((now + capacity - tat) / interval))
        if n < 1 then
          return {0, tat - now, tat, tat + interval - now - capacity, holders}
        end
        local tail = tat + n * interval
        redis.call('SET', KEYS[1], string.format('%d', tail), 'PX', math.max(1, math.ceil((tail - now) / 1000)))
        return {n, tat - now, tail, 0, holders}
        """)

    /// A give-back: KEYS[1] is the bucket; ARGV are the stored time a lease left (µs), the slots to give back and
    /// the interval (µs). Only if the stored time is still that (nothing was reserved since, so those slots are the
    /// newest) is it moved back by the slots; returns 1 then, else 0.
    static let returnScript = RedisScript(
        """
        local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
        if tat ~= tonumber(ARGV[1]) then return 0 end
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local new = tat - tonumber(ARGV[2]) * tonumber(ARGV[3])
        if new <= now then
          redis.call('DEL', KEYS[1])
        else
          redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
        end
        return 1
        """)

    /// A fleet lock is `lock:<name>`, holding its owner's mark; only the owner removes it.
    private func lockKey(_ name: String) -> String { prefix + "lock:" + name }

    func lock(_ name: String, milliseconds: Int64, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        client.send(
            ["SET", .string(lockKey(name)), .bytes(lockOwner), "PX", .string(String(milliseconds)), "NX"],
            key: lockKey(name), on: eventLoop
        ).map { !$0.isNull }
    }

    func isLocked(_ name: String, on eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        client.send(["EXISTS", .string(lockKey(name))], key: lockKey(name), on: eventLoop).map { $0.integer == 1 }
    }

    func unlock(_ name: String, on eventLoop: EventLoop) {
        _ = client.evalsha(
            Self.deleteIfEqualScript, keys: [lockKey(name)], arguments: [.bytes(lockOwner)], on: eventLoop)
    }

    func watchCachePurges(
        onPurge: @escaping @Sendable (_ route: String, _ path: String?) -> Void,
        onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool {
        let watcher = RedisSubscription(
            configuration: client.configuration, channel: purgeChannel, eventLoop: group.next(), logger: logger,
            onMessage: { payload in
                let text = String(decoding: payload, as: UTF8.self)
                guard let newline = text.firstIndex(of: "\n") else { return }
                let path = text[text.index(after: newline)...]
                onPurge(String(text[..<newline]), path.isEmpty ? nil : String(path))
            }, onLive: onLive)
        subscriptions.withLock { $0.append(watcher) }
        return true
    }

    private var pauseChannel: String { prefix + "upstream:pause" }

    func announcePause(_ pause: TargetPause) {
        _ = client.send(["PUBLISH", .string(pauseChannel), .string(pause.encoded)], key: nil, on: group.next())
    }

    func watchPauses(
        onPause: @escaping @Sendable (TargetPause) -> Void, onLive: @escaping @Sendable (Bool) -> Void
    ) -> Bool {
        let watcher = RedisSubscription(
            configuration: client.configuration, channel: pauseChannel, eventLoop: group.next(), logger: logger,
            onMessage: { payload in
                if let pause = TargetPause(encoded: String(decoding: payload, as: UTF8.self)) { onPause(pause) }
            }, onLive: onLive)
        subscriptions.withLock { $0.append(watcher) }
        return true
    }

    func close() async {
        for watcher in subscriptions.withLock({ $0 }) { await watcher.close() }
        await client.close()
    }
}
