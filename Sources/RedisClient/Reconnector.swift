import Logging
import NIOCore
import NIOPosix
import Synchronization

/// Keeps one Redis connection up: opens it, serves until it closes, waits (25 ms doubling to 500 ms, jittered) and
/// opens it again, until closed. The one place connections are made and re-made, for the pool's slots and for
/// subscriptions.
final class Reconnector: Sendable {
    private struct State {
        var channel: Channel?
        var closed = false
        var task: Task<Void, Never>?
    }

    private let state = Mutex(State())
    private let logger: Logger

    init(logger: Logger) {
        self.logger = logger
    }

    /// The connection while it is up, once `open` has prepared it (AUTH, SELECT, SUBSCRIBE...).
    var channel: Channel? { state.withLock { $0.channel } }

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

    /// Connects to the configured address with the handler `makeHandler` builds as the whole pipeline.
    static func connect(
        _ configuration: RedisConfiguration, on eventLoop: EventLoop,
        makeHandler: @escaping @Sendable () throws -> any ChannelHandler
    ) async throws -> Channel {
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(configuration.connectTimeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try makeHandler())
                }
            }
        switch configuration.address {
        case .tcp(let host, let port): return try await bootstrap.connect(host: host, port: port).get()
        case .unix(let path): return try await bootstrap.connect(unixDomainSocketPath: path).get()
        }
    }

    /// `AUTH` for the configuration, if it has a password.
    static func authCommand(_ configuration: RedisConfiguration) -> [RedisArgument]? {
        guard let password = configuration.password else { return nil }
        return configuration.username.map { ["AUTH", .string($0), .string(password)] } ?? ["AUTH", .string(password)]
    }
}
