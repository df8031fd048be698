import Logging
import NIOCore
import NIOPosix
import Synchronization

/// A subscription to one pub/sub channel on a connection of its own, kept up across Redis outages.
///
/// `onMessage` gets each message's payload; `onLive` says when the subscription starts (true, after every
/// reconnect) and when it is lost (false): messages sent while it was down are gone, so a receiver that keeps
/// state in step with them must start afresh. Both are called on the subscription's event loop.
public final class RedisSubscription: Sendable {
    private struct State {
        var channel: Channel?
        var closed = false
        var task: Task<Void, Never>?
    }

    private let configuration: RedisConfiguration
    private let name: String
    private let eventLoop: EventLoop
    private let logger: Logger
    private let onMessage: @Sendable ([UInt8]) -> Void
    private let onLive: @Sendable (Bool) -> Void
    private let state = Mutex(State())
    private let live = Atomic<Bool>(false)

    public init(
        configuration: RedisConfiguration, channel: String, eventLoop: EventLoop,
        logger: Logger = Logger(label: "gatehouse.redis"), onMessage: @escaping @Sendable ([UInt8]) -> Void,
        onLive: @escaping @Sendable (Bool) -> Void
    ) {
        self.configuration = configuration
        self.name = channel
        self.eventLoop = eventLoop
        self.logger = logger
        self.onMessage = onMessage
        self.onLive = onLive
        let task = Task { await self.maintain() }
        state.withLock { $0.task = task }
    }

    /// Whether the subscription is up now.
    public var isLive: Bool { live.load(ordering: .acquiring) }

    private func maintain() async {
        var backoff = Duration.milliseconds(25)
        while !state.withLock({ $0.closed }) {
            do {
                let channel = try await connect()
                backoff = .milliseconds(25)
                try await channel.closeFuture.get()
            } catch {
                logger.debug("redis subscription failed", metadata: ["error": "\(error)"])
            }
            state.withLock { $0.channel = nil }
            setLive(false)
            if state.withLock({ $0.closed }) { break }
            try? await Task.sleep(for: backoff * Double.random(in: 0.5...1.0))
            backoff = min(backoff * 2, .milliseconds(500))
        }
    }

    private func setLive(_ value: Bool) {
        guard live.exchange(value, ordering: .acquiringAndReleasing) != value else { return }
        onLive(value)
    }

    private func connect() async throws -> Channel {
        let deliver: @Sendable (RedisValue) -> Void = { [weak self] value in self?.received(value) }
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(configuration.connectTimeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try PushHandler(deliver: deliver))
                }
            }
        let channel: Channel
        switch configuration.address {
        case .tcp(let host, let port): channel = try await bootstrap.connect(host: host, port: port).get()
        case .unix(let path): channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
        }
        var commands: [[[UInt8]]] = []
        if let password = configuration.password {
            commands.append(
                configuration.username.map { [Array("AUTH".utf8), Array($0.utf8), Array(password.utf8)] }
                    ?? [Array("AUTH".utf8), Array(password.utf8)])
        }
        commands.append([Array("SUBSCRIBE".utf8), Array(name.utf8)])
        var buffer = channel.allocator.buffer(capacity: 64)
        for command in commands { RESPEncoder.encode(command, into: &buffer) }
        try await channel.writeAndFlush(buffer)
        state.withLock { $0.channel = channel }
        if state.withLock({ $0.closed }) { try? await channel.close() }
        return channel
    }

    /// A reply or push on the subscription's connection.
    private func received(_ value: RedisValue) {
        guard case .array(let items?) = value, let kind = items.first?.string else {
            if case .error(let message) = value {
                logger.warning("redis subscription refused", metadata: ["error": "\(message)"])
                state.withLock { $0.channel }?.close(promise: nil)
            }
            return
        }
        switch kind {
        case "subscribe": setLive(true)
        case "message": if items.count == 3, let payload = items[2].bytes { onMessage(payload) }
        default: break
        }
    }

    /// Stops the subscription and does not reconnect.
    public func close() async {
        let (channel, task) = state.withLock { state -> (Channel?, Task<Void, Never>?) in
            state.closed = true
            return (state.channel, state.task)
        }
        try? await channel?.close()
        task?.cancel()
        await task?.value
    }
}

/// Decodes everything a subscription connection receives and hands it on.
private final class PushHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let decoder: RESPDecoder
    private let deliver: @Sendable (RedisValue) -> Void

    init(deliver: @escaping @Sendable (RedisValue) -> Void) throws {
        guard let decoder = RESPDecoder() else { throw RedisError(.protocolError, "cannot create a hiredis reader") }
        self.decoder = decoder
        self.deliver = deliver
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        decoder.feed(unwrapInboundIn(data))
        do {
            while let value = try decoder.next() { deliver(value) }
        } catch {
            context.close(promise: nil)
        }
    }
}
