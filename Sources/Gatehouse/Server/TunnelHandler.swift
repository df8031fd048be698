import NIOCore
import UpstreamClient

/// The client's side of a WebSocket tunnel once the upstream switched protocols: it replaces the HTTP handlers and
/// moves bytes both ways with backpressure (a full upstream queue stops reading the client; a client that does not
/// read pauses the upstream), and closes the tunnel after `websocket_idle_timeout` without a byte either way.
final class TunnelHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let tunnel: UpstreamTunnel
    private let idleTimeout: TimeAmount
    /// Called once when the tunnel is over, with the bytes from and to the client.
    private let ended: (_ bytesIn: Int, _ bytesOut: Int) -> Void
    private var channelContext: ChannelHandlerContext?
    private var lastActivity = NIODeadline.now()
    private var idleCheck: RepeatedTask?
    private var readBlocked = false
    private var readPending = false
    private var bytesIn = 0
    private var bytesOut = 0
    private var done = false

    init(tunnel: UpstreamTunnel, idleTimeout: TimeAmount, ended: @escaping (Int, Int) -> Void) {
        self.tunnel = tunnel
        self.idleTimeout = idleTimeout
        self.ended = ended
    }

    func handlerAdded(context: ChannelHandlerContext) {
        channelContext = context
        let every = TimeAmount.nanoseconds(max(idleTimeout.nanoseconds / 4, 50_000_000))
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        idleCheck = context.eventLoop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in
            let handler = bound.value
            guard NIODeadline.now() - handler.lastActivity >= handler.idleTimeout else { return }
            handler.channelContext?.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        channelContext = nil
        end()
    }

    // MARK: client -> upstream

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        bytesIn += buffer.readableBytes
        lastActivity = .now()
        if !tunnel.send(buffer) { readBlocked = true }
    }

    func read(context: ChannelHandlerContext) {
        if readBlocked {
            readPending = true
        } else {
            context.read()
        }
    }

    /// The upstream took what was queued: read the client again.
    func upstreamWantsMore() {
        readBlocked = false
        if readPending, let context = channelContext {
            readPending = false
            context.read()
        }
    }

    // MARK: upstream -> client

    func fromUpstream(_ chunks: [ByteBuffer]) {
        guard let context = channelContext else { return }
        for chunk in chunks {
            bytesOut += chunk.readableBytes
            context.write(wrapOutboundOut(chunk), promise: nil)
        }
        context.flush()
        lastActivity = .now()
        if !context.channel.isWritable { tunnel.setReceivePaused(true) }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { tunnel.setReceivePaused(false) }
        context.fireChannelWritabilityChanged()
    }

    /// The upstream closed its side: the client's connection closes once what was written has gone out.
    func upstreamClosed() {
        guard let context = channelContext else { return }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(ByteBuffer())).whenComplete { _ in channel.close(promise: nil) }
    }

    // MARK: the end

    func channelInactive(context: ChannelHandlerContext) {
        end()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    private func end() {
        guard !done else { return }
        done = true
        idleCheck?.cancel()
        tunnel.close()
        ended(bytesIn, bytesOut)
    }
}
