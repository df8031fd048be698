import GatehouseConfig
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOSSL
import NIOTLS

/// Sets up a client connection for the protocol it speaks: HTTP/1.1, or HTTP/2 (h2 chosen by ALPN on a TLS
/// listener, h2c with prior knowledge on a plain one, when `server.http2` is on). Either way each request ends in a
/// ``GatewayHandler`` that runs the corridor: one per connection for HTTP/1.1, one per stream for HTTP/2.
enum ClientPipelines {
    /// The protocols a TLS listener offers by ALPN, best first.
    static let alpnProtocols = ["h2", "http/1.1"]

    static func configure(_ channel: Channel, core: GatewayCore, tls sslContext: NIOSSLContext?) throws {
        // Limits come from the config of the moment, so a reload applies to new connections.
        let server = core.runtime.config.server
        let activity = ConnectionActivity(limits: server.limits)
        let pipeline = channel.pipeline.syncOperations
        let tls = sslContext != nil
        if let sslContext { try pipeline.addHandler(NIOSSLServerHandler(context: sslContext)) }
        // The header and idle clocks run from the first byte, also while the protocol is being decided.
        try pipeline.addHandler(activity)
        guard server.http2 else {
            try http1(channel, core: core, activity: activity, tls: tls)
            return
        }
        let watching = NIOLoopBound(activity, eventLoop: channel.eventLoop)
        let choose: @Sendable (Channel, Bool) throws -> Void = { channel, http2 in
            if http2 {
                // HTTP/2 has its own idle timeout (the connection manager) and no request heads to time.
                channel.pipeline.syncOperations.removeHandler(watching.value, promise: nil)
                try Self.http2(channel, core: core, tls: tls)
            } else {
                try Self.http1(channel, core: core, activity: watching.value, tls: tls)
            }
        }
        if tls {
            try pipeline.addHandler(
                ApplicationProtocolNegotiationHandler { result, channel in
                    channel.eventLoop.makeCompletedFuture {
                        if case .negotiated("h2") = result {
                            try choose(channel, true)
                        } else {
                            try choose(channel, false)
                        }
                    }
                })
        } else {
            try pipeline.addHandler(PrefaceSniffer(choose))
        }
    }

    /// HTTP/1.1: the request decoder and response encoder, then one ``GatewayHandler`` for the connection.
    private static func http1(_ channel: Channel, core: GatewayCore, activity: ConnectionActivity, tls: Bool) throws {
        let limits = core.runtime.config.server.limits
        // GatewayHandler orders pipelined requests itself (see its queue). Response headers are checked where they
        // are made (upstream header lines are validated as they are parsed, the gateway's own come from the checked
        // config), so NIO's per-response validator is left out. The decoder forwards what it holds when removed:
        // after an upgrade request (which stops it) GatewayHandler puts a fresh one behind it, and the connection
        // goes on. The encoder frames nothing itself (RespondPhase does), so it needs no pairing with the decoder
        // of the moment.
        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
        decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
        let makeDecoder = {
            ByteToMessageHandler(
                HTTPRequestDecoder(
                    leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .drop,
                    limitConfiguration: decoderLimits))
        }
        var encoder = HTTPResponseEncoder.Configuration()
        encoder.automaticallySetFramingHeaders = false
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(HTTPResponseEncoder(configuration: encoder))
        try pipeline.addHandler(makeDecoder())
        try pipeline.addHandler(
            GatewayHandler(
                core: core, activity: activity, tls: tls, eventLoop: channel.eventLoop, makeDecoder: makeDecoder))
    }

    /// HTTP/2: NIOHTTP2's connection handler (flow control, and its defences against rapid reset, CONTINUATION,
    /// SETTINGS and PING floods), a connection manager for the idle timeout and a graceful GOAWAY on drain, and per
    /// stream the HTTP/1-shaped codec and a ``GatewayHandler``.
    private static func http2(_ channel: Channel, core: GatewayCore, tls: Bool) throws {
        let limits = core.runtime.config.server.limits
        var connection = NIOHTTP2Handler.ConnectionConfiguration()
        connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: limits.maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: limits.maxHeaderBytes),
            HTTP2Setting(parameter: .initialWindowSize, value: 256 * 1024),
        ]
        connection.targetWindowSize = 1 << 20
        var stream = NIOHTTP2Handler.StreamConfiguration()
        stream.targetWindowSize = 256 * 1024
        let manager = NIOHTTP2ServerConnectionManagementHandler(
            eventLoop: channel.eventLoop,
            configuration: .init(
                maxIdleTime: .nanoseconds(limits.idleTimeout.nanoseconds), maxAge: nil,
                maxGraceTime: .nanoseconds(core.runtime.config.server.drainTimeout.nanoseconds), keepalive: nil))
        _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .server, connectionConfiguration: connection, streamConfiguration: stream,
            streamDelegate: manager.http2StreamDelegate
        ) { stream in
            stream.eventLoop.makeCompletedFuture {
                let pipeline = stream.pipeline.syncOperations
                try pipeline.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                try pipeline.addHandler(
                    GatewayHandler(core: core, activity: nil, tls: tls, eventLoop: stream.eventLoop, makeDecoder: nil))
            }
        }
        try channel.pipeline.syncOperations.addHandler(manager)
        try channel.pipeline.syncOperations.addHandler(CloseOnConnectionError())
        // Streams answered in one event-loop turn leave in one write.
        let handler = try channel.pipeline.syncOperations.handler(type: NIOHTTP2Handler.self)
        try channel.pipeline.syncOperations.addHandler(FlushAtEndOfTurn(), position: .before(handler))
        // The manager starts its idle clock when the channel becomes active, which happened before HTTP/2 was
        // chosen: tell it (and only the handlers after it) again.
        try channel.pipeline.syncOperations.addHandler(ReplayChannelActive(), position: .before(manager))
    }
}

/// Coalesces an HTTP/2 connection's flushes: every stream that finishes an answer flushes the connection, so the
/// first flush of an event-loop turn is put off to the end of that turn and the others join it. The answers of
/// all the streams one turn completes (a worker hands over a whole round at once) go out in one write.
final class FlushAtEndOfTurn: ChannelOutboundHandler {
    typealias OutboundIn = Any

    private var scheduled = false

    func flush(context: ChannelHandlerContext) {
        guard !scheduled else { return }
        scheduled = true
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.execute {
            let (handler, context) = bound.value
            handler.scheduled = false
            context.flush()
        }
    }

    /// What waits for the end of the turn goes out before the connection closes.
    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if scheduled { context.flush() }
        context.close(mode: mode, promise: promise)
    }
}

/// Sends an answer without a body as one HEADERS frame that ends the stream, as gRPC's trailers-only answers must
/// be: the HTTP/1 codec writes a head and then an empty DATA frame with END_STREAM, so a HEADERS frame is held until
/// the next write or flush, and merged with that empty end when it comes.
final class EndStreamOnHeaders: ChannelOutboundHandler {
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var held: (headers: HTTP2Frame.FramePayload.Headers, promise: EventLoopPromise<Void>?)?

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let payload = unwrapOutboundIn(data)
        if let (headers, heldPromise) = held {
            held = nil
            if case .data(let data) = payload, data.endStream, data.data.readableBytes == 0 {
                var merged = headers
                merged.endStream = true
                heldPromise?.futureResult.cascade(to: promise)
                context.write(wrapOutboundOut(.headers(merged)), promise: heldPromise ?? promise)
                return
            }
            context.write(wrapOutboundOut(.headers(headers)), promise: heldPromise)
        }
        if case .headers(let headers) = payload, !headers.endStream {
            held = (headers, promise)
            return
        }
        context.write(data, promise: promise)
    }

    func flush(context: ChannelHandlerContext) {
        if let (headers, promise) = held {
            held = nil
            context.write(wrapOutboundOut(.headers(headers)), promise: promise)
        }
        context.flush()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        held?.promise?.fail(ChannelError.ioOnClosedChannel)
        held = nil
    }
}

/// Tells the handlers after it that the channel is active, once, and steps aside: for handlers added to a
/// connection that was already active.
final class ReplayChannelActive: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Any

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { context.fireChannelActive() }
        context.pipeline.syncOperations.removeHandler(self, promise: nil)
    }
}

/// Closes an HTTP/2 connection that floods or sends what cannot be parsed: NIOHTTP2 answers with a GOAWAY but leaves
/// closing to the pipeline, and an attacker that ignores the GOAWAY must not keep the connection. Other errors (a
/// stream's bad header, a length mismatch) reset that stream only; the connection and its other streams go on.
final class CloseOnConnectionError: ChannelInboundHandler {
    typealias InboundIn = Any

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if Self.endsConnection(error) { context.close(promise: nil) }
    }

    static func endsConnection(_ error: Error) -> Bool {
        error is NIOHTTP2Errors.ExcessiveRSTFrames || error is NIOHTTP2Errors.ExcessiveContinuationFrames
            || error is NIOHTTP2Errors.ExcessiveControlFrames || error is NIOHTTP2Errors.ExcessiveStreamErrors
            || error is NIOHTTP2Errors.ExcessiveNumberOfGlitches || error is NIOHTTP2Errors.ExcessiveEmptyDataFrames
            || error is NIOHTTP2Errors.ExcessiveOutboundFrameBuffering
            || error is NIOHTTP2Errors.ExcessivelyLargeHeaderBlock || error is NIOHTTP2Errors.BadClientMagic
            || error is NIOHTTP2Errors.UnableToParseFrame
    }
}

/// On a plain listener: reads the first bytes and sets the connection up for HTTP/2 when they are the client
/// preface (h2c with prior knowledge, RFC 9113 §3.3), else for HTTP/1.1; then steps aside and passes on what it
/// read.
final class PrefaceSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    private let choose: (Channel, Bool) throws -> Void
    private var received: ByteBuffer?

    init(_ choose: @escaping (Channel, Bool) throws -> Void) {
        self.choose = choose
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if received == nil {
            received = buffer
        } else {
            received?.writeBuffer(&buffer)
        }
        guard let received else { return }
        let head = received.readableBytesView.prefix(Self.preface.count)
        let http2 = head.elementsEqual(Self.preface.prefix(head.count))
        // A prefix of the preface so far: wait for the rest.
        if http2, head.count < Self.preface.count { return }
        self.received = nil
        do {
            try choose(context.channel, http2)
        } catch {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(wrapInboundOut(received))
        context.fireChannelReadComplete()
        context.pipeline.syncOperations.removeHandler(self, promise: nil)
    }

    /// A drain closes a connection that has not said a byte yet; one that has waits for its protocol's handler.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is DrainEvent, received == nil {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}
