public import CoreMetrics
import Crypto
public import Logging
public import NIOCore
public import NIOPosix
import Synchronization

/// An async Redis client: a pool of connections owned by SwiftNIO event loops, with hiredis encoding commands
/// and parsing replies.
///
/// Commands from any thread are spread over the pool and pipelined on each connection. While a connection is down
/// its commands fail at once with `unavailable` (never an unbounded wait) and it reconnects by itself with capped,
/// jittered exponential backoff, sending `AUTH` and `SELECT` from the configuration first.
public final class RedisClient: Sendable {
    public let configuration: RedisConfiguration
    private let slots: [Slot]
    /// With Sentinel: follows failovers.
    private let sentinelWatch: SentinelWatch?
    private let next = Atomic<Int>(0)
    private let logger: Logger

    /// `metrics` records commands, errors by kind, reconnects and latency (nothing when nil).
    public init(
        configuration: RedisConfiguration, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "gatehouse.redis"), metrics: MetricsFactory? = nil
    ) {
        self.configuration = configuration
        self.logger = logger
        let recorder = metrics.map(RedisMetrics.init)
        let address: String
        switch (configuration.sentinel, configuration.address) {
        case (let sentinel?, _): address = "the master \"\(sentinel.master)\" of the sentinels"
        case (nil, .tcp(let host, let port)): address = "\(host):\(port)"
        case (nil, .unix(let path)): address = path
        }
        let watch = ConnectionWatch(address: address, logger: logger)
        let slots = (0..<max(1, configuration.poolSize)).map { _ in
            Slot(configuration: configuration, eventLoop: group.next(), logger: logger, metrics: recorder, watch: watch)
        }
        self.slots = slots
        sentinelWatch = configuration.sentinel.map { sentinel in
            SentinelWatch(sentinel, configuration: configuration, eventLoop: group.next(), logger: logger) {
                // A failover: every connection is made again, to the master the sentinels name now.
                for slot in slots { slot.dropConnection() }
            }
        }
        for slot in slots { slot.start() }
    }

    /// True while at least one connection is up.
    public var isConnected: Bool { slots.contains { $0.isConnected } }

    /// Nil while connected; else which server the client was last connected to and why it cannot connect now.
    public var problem: String? {
        guard !isConnected else { return nil }
        var text = "not connected"
        if let node = slots.lazy.compactMap(\.node).first { text += "; last connected to \(node)" }
        if let failure = slots.lazy.compactMap(\.lastFailure).first { text += "; " + failure }
        return text
    }

    /// Sends one command given as arguments; returns the reply. An error reply is thrown as `.server`.
    public func send(_ arguments: [RedisArgument]) async throws(RedisError) -> RedisValue {
        let start = next.wrappingAdd(1, ordering: .relaxed).oldValue
        // Prefer the next connection in turn, else any connection that is up.
        var chosen: Slot?
        for offset in 0..<slots.count {
            let slot = slots[(start + offset) % slots.count]
            if slot.isConnected {
                chosen = slot
                break
            }
        }
        guard let slot = chosen else { throw RedisError(.unavailable, "Redis is not connected") }
        let reply = try await slot.send(arguments)
        if case .error(let message) = reply { throw RedisError(.server, message) }
        return reply
    }

    /// Sends one command without leaving the event loops: the reply is delivered on `eventLoop`. A connection
    /// owned by that loop is preferred, so a caller on an event loop usually gets its reply without any thread
    /// hop. An error reply fails the future with `.server`.
    public func send(_ arguments: [RedisArgument], on eventLoop: EventLoop) -> EventLoopFuture<RedisValue> {
        let start = next.wrappingAdd(1, ordering: .relaxed).oldValue
        var chosen: Slot?
        for offset in 0..<slots.count {
            let slot = slots[(start + offset) % slots.count]
            guard slot.isConnected else { continue }
            if slot.eventLoop === eventLoop {
                chosen = slot
                break
            }
            if chosen == nil { chosen = slot }
        }
        guard let slot = chosen else {
            return eventLoop.makeFailedFuture(RedisError(.unavailable, "Redis is not connected"))
        }
        return slot.send(arguments).hop(to: eventLoop).flatMapThrowing { reply in
            if case .error(let message) = reply { throw RedisError(.server, message) }
            return reply
        }
    }

    public func send(_ arguments: RedisArgument...) async throws(RedisError) -> RedisValue {
        try await send(arguments)
    }

    @discardableResult
    public func del(_ keys: String...) async throws(RedisError) -> Int64 {
        try await send(["DEL"] + keys.map { .string($0) }).integer ?? 0
    }

    public func incr(_ key: String) async throws(RedisError) -> Int64 {
        try await send("INCR", .string(key)).integer ?? 0
    }

    @discardableResult
    public func expire(_ key: String, seconds: Int) async throws(RedisError) -> Bool {
        try await send("EXPIRE", .string(key), .string(String(seconds))).integer == 1
    }

    /// Closes every connection and stops reconnecting.
    public func close() async {
        await sentinelWatch?.close()
        for slot in slots { await slot.close() }
    }

    /// Sends `arguments` and `ASKING` before them on one connection (a cluster's redirection during a migration).
    func sendAsking(_ arguments: [RedisArgument], on eventLoop: EventLoop) -> EventLoopFuture<RedisValue> {
        guard
            let slot = slots.first(where: { $0.isConnected && $0.eventLoop === eventLoop })
                ?? slots.first(where: \.isConnected)
        else {
            return eventLoop.makeFailedFuture(RedisError(.unavailable, "Redis is not connected"))
        }
        let asking = slot.send(["ASKING"])
        return slot.send(arguments).and(asking).hop(to: eventLoop).flatMapThrowing { reply, _ in
            if case .error(let message) = reply { throw RedisError(.server, message) }
            return reply
        }
    }
}

extension RedisClient: RedisCommands {
    /// One server holds every key.
    public var crossesSlots: Bool { true }

    public func send(_ arguments: [RedisArgument], key: String?) async throws(RedisError) -> RedisValue {
        try await send(arguments)
    }

    public func send(_ arguments: [RedisArgument], key: String?, on eventLoop: EventLoop) -> EventLoopFuture<RedisValue>
    {
        send(arguments, on: eventLoop)
    }
}

/// One argument of a command: text or raw bytes (binary-safe).
public enum RedisArgument: Sendable, ExpressibleByStringLiteral {
    case string(String)
    case bytes([UInt8])

    public init(stringLiteral value: String) { self = .string(value) }

    var byteCount: Int {
        switch self {
        case .string(let text): text.utf8.count
        case .bytes(let bytes): bytes.count
        }
    }
}

/// A Lua script with its SHA1, for `EVALSHA`.
public struct RedisScript: Sendable {
    public let source: String
    public let sha1: String

    public init(_ source: String) {
        self.source = source
        sha1 = Insecure.SHA1.hash(data: Array(source.utf8)).map { byte in
            let hex = String(byte, radix: 16)
            return hex.count == 1 ? "0" + hex : hex
        }.joined()
    }
}

/// The client's metrics, made once.
final class RedisMetrics: Sendable {
    let commands: CoreMetrics.Counter
    let reconnects: CoreMetrics.Counter
    let latency: CoreMetrics.Timer
    private let errors: [RedisError.Kind: CoreMetrics.Counter]

    init(_ factory: MetricsFactory) {
        self.factory = factory
        commands = CoreMetrics.Counter(label: "gatehouse_redis_commands_total", factory: factory)
        reconnects = CoreMetrics.Counter(label: "gatehouse_redis_reconnects_total", factory: factory)
        latency = CoreMetrics.Timer(label: "gatehouse_redis_command_duration_seconds", factory: factory)
        let kinds: [(RedisError.Kind, String)] = [
            (.unavailable, "unavailable"), (.connectionLost, "connection_lost"), (.timeout, "timeout"),
            (.overloaded, "overloaded"), (.server, "server"), (.protocolError, "protocol"),
        ]
        var errors: [RedisError.Kind: CoreMetrics.Counter] = [:]
        for (kind, name) in kinds {
            errors[kind] = CoreMetrics.Counter(
                label: "gatehouse_redis_errors_total", dimensions: [("kind", name)], factory: factory)
        }
        self.errors = errors
    }

    func failed(_ kind: RedisError.Kind) { errors[kind]?.increment() }

    /// `gatehouse_redis_up{node}`: 1 while a connection to that server is up, 0 once one is lost.
    func nodeUp(_ node: String, _ up: Bool) {
        let gauge = nodes.withLock { nodes in
            if let gauge = nodes[node] { return gauge }
            let gauge = CoreMetrics.Gauge(label: "gatehouse_redis_up", dimensions: [("node", node)], factory: factory)
            nodes[node] = gauge
            return gauge
        }
        gauge.record(up ? 1 : 0)
    }

    private let factory: MetricsFactory
    private let nodes = Mutex<[String: CoreMetrics.Gauge]>([:])
}

/// Whether any of a client's connections is up, told once in the log when that changes: a warning when Redis goes
/// away (or cannot be reached at first), an info line when it is back. Metrics count every reconnect; the log
/// says only what an operator needs to know.
final class ConnectionWatch: Sendable {
    private enum Reach { case unknown, up, down }
    private struct State {
        var connections = 0
        var reach = Reach.unknown
    }

    private let state = Mutex(State())
    private let address: String
    private let logger: Logger

    init(address: String, logger: Logger) {
        self.address = address
        self.logger = logger
    }

    // Each line is logged under the lock, so lines from two connections' threads come in the order of the changes.
    func connectionUp() {
        state.withLock { state in
            state.connections += 1
            if state.reach == .down {
                logger.info(
                    "redis is back; cache, shared limits and runtime keys use it again",
                    metadata: ["redis": "\(address)"])
            }
            state.reach = .up
        }
    }

    func connectionDown() {
        state.withLock { state in
            state.connections = max(0, state.connections - 1)
            guard state.connections == 0, state.reach == .up else { return }
            state.reach = .down
            logger.warning("redis went away; serving without it until it is back", metadata: ["redis": "\(address)"])
        }
    }

    func connectFailed() {
        state.withLock { state in
            guard state.reach == .unknown else { return }
            state.reach = .down
            logger.warning("redis cannot be reached; serving without it until it is", metadata: ["redis": "\(address)"])
        }
    }
}

/// One pooled connection, kept up by a ``Reconnector``; commands go to its handler.
final class Slot: Sendable {

    private let configuration: RedisConfiguration
    /// The loop that owns this connection.
    let eventLoop: EventLoop
    private let logger: Logger
    private let metrics: RedisMetrics?
    private let reconnector: Reconnector
    private let watch: ConnectionWatch
    /// Whether this connection is up, as told to ``watch``.
    private let up = Atomic<Bool>(false)
    /// The connection's handler, set as soon as it is connected (AUTH and SELECT go through it).
    private let handler = Mutex<NIOLoopBound<RedisHandler>?>(nil)

    init(
        configuration: RedisConfiguration, eventLoop: EventLoop, logger: Logger, metrics: RedisMetrics?,
        watch: ConnectionWatch
    ) {
        self.configuration = configuration
        self.eventLoop = eventLoop
        self.logger = logger
        self.metrics = metrics
        self.watch = watch
        reconnector = Reconnector(logger: logger)
    }

    /// Offered to callers only once AUTH and SELECT have passed.
    var isConnected: Bool { reconnector.channel != nil }
    /// The server this connection was last made to (with Sentinel, the master of the moment).
    var node: String? { connectedNode.withLock { $0 } }
    private let connectedNode = Mutex<String?>(nil)
    var lastFailure: String? { reconnector.lastFailure }

    func start() {
        let metrics = self.metrics
        reconnector.start(
            open: { try await self.connect() },
            opened: { again in
                if again { metrics?.reconnects.increment() }
                if let node = self.node { metrics?.nodeUp(node, true) }
                if !self.up.exchange(true, ordering: .relaxed) { self.watch.connectionUp() }
            },
            lost: {
                self.handler.withLock { $0 = nil }
                if let node = self.node { metrics?.nodeUp(node, false) }
                if self.reconnector.isClosed {
                    self.up.store(false, ordering: .relaxed)
                } else if self.up.exchange(false, ordering: .relaxed) {
                    self.watch.connectionDown()
                } else {
                    self.watch.connectFailed()
                }
            })
    }

    func send(_ argv: [RedisArgument]) async throws(RedisError) -> RedisValue {
        do {
            return try await send(argv).get()
        } catch let error as RedisError {
            throw error
        } catch {
            throw RedisError(.connectionLost, "\(error)")
        }
    }

    /// Sends a command on this connection; the future completes on this slot's event loop, with the reply (an
    /// error reply included) or a ``RedisError``.
    func send(_ argv: [RedisArgument]) -> EventLoopFuture<RedisValue> {
        let started = NIODeadline.now()
        guard let handler = handler.withLock({ $0 }) else {
            metrics?.failed(.unavailable)
            return eventLoop.makeFailedFuture(RedisError(.unavailable, "Redis is not connected"))
        }
        var buffer = ByteBufferAllocator().buffer(capacity: argv.reduce(16) { $0 + $1.byteCount + 16 })
        RESPEncoder.encode(argv, into: &buffer)
        let promise = eventLoop.makePromise(of: RedisValue.self)
        let limit = configuration.maxInFlightPerConnection
        let encoded = buffer
        if eventLoop.inEventLoop {
            Self.submit(encoded, to: handler.value, limit: limit, promise: promise)
        } else {
            eventLoop.execute { Self.submit(encoded, to: handler.value, limit: limit, promise: promise) }
        }
        let metrics = self.metrics
        promise.futureResult.whenComplete { result in
            switch result {
            case .success(let reply):
                metrics?.commands.increment()
                metrics?.latency.recordNanoseconds((NIODeadline.now() - started).nanoseconds)
                if case .error(let message) = reply {
                    metrics?.failed(.server)
                    // The server became a replica (a failover): never write there; connect anew to the master.
                    if message.hasPrefix("READONLY") { self.dropConnection() }
                }
            case .failure(let error):
                metrics?.failed((error as? RedisError)?.kind ?? .connectionLost)
            }
        }
        return promise.futureResult
    }

    private static func submit(
        _ command: ByteBuffer, to handler: RedisHandler, limit: Int, promise: EventLoopPromise<RedisValue>
    ) {
        if handler.inFlight >= limit {
            promise.fail(RedisError(.overloaded, "too many commands in flight"))
        } else {
            handler.send(command, promise: promise)
        }
    }

    private func connect() async throws -> Channel {
        let timeout = TimeAmount(configuration.commandTimeout)
        let channel = try await Reconnector.connect(configuration, on: eventLoop) {
            try RedisHandler(commandTimeout: timeout)
        }
        let bound = try await channel.eventLoop.submit {
            NIOLoopBound(
                try channel.pipeline.syncOperations.handler(type: RedisHandler.self), eventLoop: channel.eventLoop)
        }.get()
        handler.withLock { $0 = bound }
        if let remote = channel.remoteAddress {
            let node = remote.ipAddress.map { "\($0):\(remote.port ?? 0)" } ?? "\(remote)"
            connectedNode.withLock { $0 = node }
        }
        do {
            // One round trip at least before the connection is offered: over TLS, the handshake is done only then.
            if case .error(let message) = try await send(Reconnector.authCommand(configuration) ?? ["PING"]) {
                throw RedisError(.server, message)
            }
            if configuration.database != 0 {
                let select: [RedisArgument] = ["SELECT", .string(String(configuration.database))]
                if case .error(let message) = try await send(select) { throw RedisError(.server, message) }
            }
            if configuration.sentinel != nil {
                // What the sentinels named may already be a replica again: only a master is used.
                let role = try await send(["ROLE"])
                guard case .array(let items?) = role, items.first?.string == "master" else {
                    throw RedisError(.unavailable, "the server the sentinels named is not a master")
                }
            }
        } catch {
            handler.withLock { $0 = nil }
            try? await channel.close()
            throw error
        }
        return channel
    }

    func close() async { await reconnector.close() }

    /// Closes the connection; the reconnector makes it again (resolving the master anew with Sentinel).
    func dropConnection() {
        reconnector.channel?.close(promise: nil)
    }
}

extension TimeAmount {
    /// The same span as a NIO time amount (nanosecond precision).
    init(_ duration: Duration) {
        self = .nanoseconds(
            duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000)
    }
}
