import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// Keeps one Redis connection up: opens it, serves until it closes, waits (25 ms doubling to 500 ms, jittered) and
/// opens it again, until closed. The one place connections are made and re-made, for the pool's slots and for
/// subscriptions.
final class Reconnector: Sendable {
    private struct State {
        var channel: Channel?
        var closed = false
        var task: Task<Void, Never>?
        var lastFailure: String?
    }

    private let state = Mutex(State())
    private let logger: Logger

    init(logger: Logger) {
        self.logger = logger
    }

    /// The connection while it is up, once `open` has prepared it (AUTH, SELECT, SUBSCRIBE...).
    var channel: Channel? { state.withLock { $0.channel } }

    /// Why the last attempt to connect failed, until one succeeds.
    var lastFailure: String? { state.withLock { $0.lastFailure } }

    /// Closed for good (shutdown): a connection lost now was not lost to an outage.
    var isClosed: Bool { state.withLock { $0.closed } }

    /// Starts keeping the connection up. `open` connects and prepares it; `opened` is told whether it is a
    /// reconnect; `lost` runs each time the connection goes away.
    func start(
        open: @escaping @Sendable () async throws -> Channel, opened: @escaping @Sendable (_ again: Bool) -> Void,
        lost: @escaping @Sendable () -> Void
    ) {
        let task = Task {
            var backoff = Duration.milliseconds(25)
            var connectedBefore = false
            while !state.withLock({ $0.closed }) {
                do {
                    let channel = try await open()
                    let closed = state.withLock { state in
                        state.channel = channel
                        state.lastFailure = nil
                        return state.closed
                    }
                    if closed {
                        state.withLock { $0.channel = nil }
                        try? await channel.close()
                        break
                    }
                    opened(connectedBefore)
                    connectedBefore = true
                    backoff = .milliseconds(25)
                    try await channel.closeFuture.get()
                } catch is CancellationError {
                    lost()
                    break
                } catch {
                    logger.debug("redis connection failed", metadata: ["error": "\(error)"])
                    state.withLock { $0.lastFailure = "\(error)" }
                }
                state.withLock { $0.channel = nil }
                lost()
                if state.withLock({ $0.closed }) { break }
                try? await Task.sleep(for: backoff * Double.random(in: 0.5...1.0))
                backoff = min(backoff * 2, .milliseconds(500))
            }
        }
        state.withLock { $0.task = task }
    }

    /// Closes the connection and stops reconnecting.
    func close() async {
        let (channel, task) = state.withLock { state -> (Channel?, Task<Void, Never>?) in
            state.closed = true
            return (state.channel, state.task)
        }
        try? await channel?.close()
        task?.cancel()
        await task?.value
    }

    /// Connects to the configured server (with Sentinel: to the master the sentinels name now), TLS first when
    /// configured, with the handler `makeHandler` builds as the rest of the pipeline.
    static func connect(
        _ configuration: RedisConfiguration, on eventLoop: EventLoop,
        makeHandler: @escaping @Sendable () throws -> any ChannelHandler
    ) async throws -> Channel {
        var address = configuration.address
        if let sentinel = configuration.sentinel {
            address = try await SentinelLookup.master(sentinel, configuration: configuration, on: eventLoop)
        }
        guard !configuration.clusterSeeds.isEmpty else {
            return try await open(address, configuration, on: eventLoop, makeHandler: makeHandler)
        }
        // Any node of a cluster will do (pub/sub reaches every node): the seeds in turn.
        var lastError: Error = RedisError(.unavailable, "no cluster seed")
        for seed in configuration.clusterSeeds {
            do {
                return try await open(seed, configuration, on: eventLoop, makeHandler: makeHandler)
            } catch {
                lastError = error
            }
        }
        throw lastError
    }

    /// Opens one connection to `address`.
    static func open(
        _ address: RedisConfiguration.Address, _ configuration: RedisConfiguration, on eventLoop: EventLoop,
        makeHandler: @escaping @Sendable () throws -> any ChannelHandler
    ) async throws -> Channel {
        let tls = configuration.tls
        var host: String?
        if case .tcp(let name, _) = address { host = name }
        // SNI takes a name only, never an address.
        let serverName =
            tls?.serverName ?? host.flatMap { (try? SocketAddress(ipAddress: $0, port: 0)) == nil ? $0 : nil }
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(configuration.connectTimeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: tls.context, serverHostname: serverName))
                    }
                    try channel.pipeline.syncOperations.addHandler(try makeHandler())
                }
            }
        switch address {
        case .tcp(let host, let port): return try await bootstrap.connect(host: host, port: port).get()
        case .unix(let path): return try await bootstrap.connect(unixDomainSocketPath: path).get()
        }
    }

    /// Sends `commands` on a connection whose pipeline ends in a ``RedisHandler``; returns the replies in order.
    static func ask(_ channel: Channel, _ commands: [[RedisArgument]]) async throws -> [RedisValue] {
        let futures = try await channel.eventLoop.submit { () -> [EventLoopFuture<RedisValue>] in
            let handler = try channel.pipeline.syncOperations.handler(type: RedisHandler.self)
            return commands.map { command in
                var buffer = channel.allocator.buffer(capacity: 64)
                RESPEncoder.encode(command, into: &buffer)
                let promise = channel.eventLoop.makePromise(of: RedisValue.self)
                handler.send(buffer, promise: promise)
                return promise.futureResult
            }
        }.get()
        var replies: [RedisValue] = []
        for future in futures { replies.append(try await future.get()) }
        return replies
    }

    /// `AUTH` for the configuration, if it has a password.
    static func authCommand(_ configuration: RedisConfiguration) -> [RedisArgument]? {
        guard let password = configuration.password else { return nil }
        return configuration.username.map { ["AUTH", .string($0), .string(password)] } ?? ["AUTH", .string(password)]
    }
}
