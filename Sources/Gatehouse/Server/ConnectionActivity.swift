import GatehouseConfig
import NIOCore

/// Sits below the HTTP codec and watches raw bytes to enforce `header_timeout` (408) and `idle_timeout`.
///
/// `GatewayHandler` tells it when a request head is complete and when the connection waits for the next request;
/// between those, the first byte starts the head clock, and no byte at all lets the idle clock close the connection.
final class ConnectionActivity: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let headerTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private var context: ChannelHandlerContext?
    private var waitingForHead = true
    private var bytesSinceHead = false
    private var timer: Scheduled<Void>?

    init(limits: ServerLimits) {
        headerTimeout = .nanoseconds(limits.headerTimeout.nanoseconds)
        idleTimeout = .nanoseconds(limits.idleTimeout.nanoseconds)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { startIdleClock() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        startIdleClock()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if waitingForHead, !bytesSinceHead {
            bytesSinceHead = true
            startHeadClock()
        }
        context.fireChannelRead(data)
    }

    /// A whole request head has been decoded.
    func headComplete() {
        waitingForHead = false
        bytesSinceHead = false
        timer?.cancel()
        timer = nil
    }

    /// The previous exchange is over; the connection waits for the next request.
    func awaitingNextRequest() {
        waitingForHead = true
        if bytesSinceHead { startHeadClock() } else { startIdleClock() }
    }

    /// Whether the connection is between requests with nothing of the next one received.
    var isIdle: Bool { waitingForHead && !bytesSinceHead }

    private func startIdleClock() {
        guard let context else { return }
        timer?.cancel()
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: idleTimeout) {
            let handler = bound.value
            guard handler.isIdle, let context = handler.context else { return }
            context.close(promise: nil)
        }
    }

    private func startHeadClock() {
        guard let context else { return }
        timer?.cancel()
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: headerTimeout) {
            let handler = bound.value
            guard handler.waitingForHead, let context = handler.context else { return }
            let answer = ProblemResponse.raw(for: .requestTimeout(), requestID: RequestID.make())
            let channel = context.channel
            context.writeAndFlush(NIOAny(channel.allocator.buffer(string: answer))).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
    }
}
