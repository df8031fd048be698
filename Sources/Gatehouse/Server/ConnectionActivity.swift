import GatehouseConfig
import NIOCore

/// Sits below the HTTP codec and watches raw bytes to enforce `header_timeout` (408) and `idle_timeout`.
///
/// `GatewayHandler` tells it when a request head is complete and when the connection waits for the next request;
/// between those, the first byte starts the head clock, and no byte at all lets the idle clock close the connection.
/// The clocks are deadlines checked by one repeating tick per connection, so a request costs no timer scheduling;
/// a timeout fires up to a quarter of its length late.
final class ConnectionActivity: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private enum Clock {
        /// Waiting for the first byte of a request.
        case idle
        /// Part of a request head has arrived.
        case head
        /// A request is being served.
        case stopped
    }

    private let headerTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private var context: ChannelHandlerContext?
    private var clock = Clock.idle
    private var deadline = NIODeadline.distantFuture
    private var ticker: RepeatedTask?

    init(limits: ServerLimits) {
        headerTimeout = .nanoseconds(limits.headerTimeout.nanoseconds)
        idleTimeout = .nanoseconds(limits.idleTimeout.nanoseconds)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { start(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        ticker?.cancel()
        ticker = nil
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        start(context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        ticker?.cancel()
        ticker = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if clock == .idle {
            clock = .head
            deadline = .now() + headerTimeout
        }
        context.fireChannelRead(data)
    }

    /// A whole request head has been decoded.
    func headComplete() {
        clock = .stopped
    }

    /// The previous exchange is over; the connection waits for the next request.
    func awaitingNextRequest() {
        clock = .idle
        deadline = .now() + idleTimeout
    }

    /// Whether the connection is between requests with nothing of the next one received.
    var isIdle: Bool { clock == .idle }

    private func start(_ context: ChannelHandlerContext) {
        guard ticker == nil else { return }
        deadline = .now() + idleTimeout
        let tick = TimeAmount.nanoseconds(max(min(headerTimeout.nanoseconds, idleTimeout.nanoseconds) / 4, 1_000_000))
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        ticker = context.eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in
            bound.value.check()
        }
    }

    private func check() {
        guard let context, clock != .stopped, NIODeadline.now() >= deadline else { return }
        switch clock {
        case .idle:
            context.close(promise: nil)
        case .head:
            clock = .stopped
            let answer = ProblemResponse.raw(for: .requestTimeout(), requestID: RequestID.make())
            let channel = context.channel
            context.writeAndFlush(NIOAny(channel.allocator.buffer(string: answer))).whenComplete { _ in
                channel.close(promise: nil)
            }
        case .stopped:
            break
        }
    }
}
