public import Logging
public import NIOCore
import NIOPosix
import Synchronization

/// A subscription to one pub/sub channel on a connection of its own, kept up across Redis outages.
///
/// `onMessage` gets each message's payload; `onLive` says when the subscription starts (true, after every
/// reconnect) and when it is lost (false): messages sent while it was down are gone, so a receiver that keeps
/// state in step with them must start afresh. Both are called on the subscription's event loop.
public final class RedisSubscription: Sendable {
    private let configuration: RedisConfiguration
    private let name: String
    private let eventLoop: EventLoop
    private let logger: Logger
    private let onMessage: @Sendable ([UInt8]) -> Void
    private let onLive: @Sendable (Bool) -> Void
    private let reconnector: Reconnector
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
        reconnector = Reconnector(logger: logger)
        reconnector.start(
            open: { [weak self] in
                // Released without close(): stop reconnecting.
                guard let self else { throw CancellationError() }
                return try await self.connect()
            },
            opened: { _ in },
            lost: { [weak self] in self?.setLive(false) })
    }

    /// Whether the subscription is up now.
    public var isLive: Bool { live.load(ordering: .acquiring) }

    private func setLive(_ value: Bool) {
        guard live.exchange(value, ordering: .acquiringAndReleasing) != value else { return }
        onLive(value)
    }

    private func connect() async throws -> Channel {
        let deliver: @Sendable (RedisValue) -> Void = { [weak self] value in self?.received(value) }
        let channel = try await Reconnector.connect(configuration, on: eventLoop) {
            try PushHandler(deliver: deliver)
        }
        var buffer = channel.allocator.buffer(capacity: 64)
        if let auth = Reconnector.authCommand(configuration) { RESPEncoder.encode(auth, into: &buffer) }
        RESPEncoder.encode(["SUBSCRIBE", .string(name)], into: &buffer)
        try await channel.writeAndFlush(buffer)
        return channel
    }

    /// A reply or push on the subscription's connection.
    private func received(_ value: RedisValue) {
        guard case .array(let items?) = value, let kind = items.first?.string else {
            if case .error(let message) = value {
                logger.warning("redis subscription refused", metadata: ["error": "\(message)"])
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
    public func close() async { await reconnector.close() }
}

/// Decodes everything a subscription connection receives and hands it on.
final class PushHandler: ChannelInboundHandler {
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
            while let value = try decoder.next() {
                deliver(value)
                // A refused AUTH or SUBSCRIBE: close, so the connection is made again (and the refusal logged).
                if case .error = value { context.close(promise: nil) }
            }
        } catch {
            context.close(promise: nil)
        }
    }
}
