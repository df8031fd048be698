import GatehouseConfig
import NIOCore
import NIOHTTP1
import NIOSSL
import UpstreamClient

/// One client connection over HTTP/1.1: its I/O, backpressure and pipelining. Each request is an ``Exchange``,
/// which runs the corridor; this handler feeds it the request's parts and writes what it answers.
///
/// Backpressure both ways: a full upstream queue stops reading the client, and a client that cannot take more
/// pauses the upstream transfer. Requests that arrive while one is being answered wait in a small queue and are
/// answered in order; reading stops only when that queue is full, so a connection without pipelining never
/// toggles its read interest.
final class GatewayHandler: ChannelDuplexHandler, RemovableChannelHandler, ClientConnection {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let core: GatewayCore
    /// The connection's header and idle clocks (HTTP/1.1; an HTTP/2 stream has none of its own).
    private let activity: ConnectionActivity?
    private var connection: ConnectionInfo?
    let eventLoop: EventLoop
    /// The upstream worker paired with this connection's event loop.
    let workerIndex: Int?
    private let tls: Bool
    /// The request being answered.
    private var exchange: Exchange?
    private var channelContext: ChannelHandlerContext?
    /// Reading the client is held back (request body backpressure, or a full queue of pipelined requests).
    private var readBlocked = false
    /// A read was asked for while reading was held back.
    private var readPending = false
    private var draining = false
    private var closed = false
    /// Parts of pipelined requests that arrived while the current one is answered.
    private var queued = CircularBuffer<HTTPServerRequestPart>()
    private var queuedBytes = 0
    private var servingQueue = false
    /// Queued pipelined bytes past which the client is not read until the queue drains.
    private static let queueLimit = 64 * 1024

    /// Makes the request decoder this connection restarts after an upgrade request (HTTP/1.1 only).
    private let makeDecoder: (() -> ByteToMessageHandler<HTTPRequestDecoder>)?
    /// The last request head received was an upgrade request (see ``isUpgradeRequest(_:)``).
    private var receivedUpgrade = false
    /// The client certificate (if any) has been read into ``connection``.
    private var certificateChecked = false
    /// The decoder restarts when the current exchange (a WebSocket upgrade that may not happen) is over.
    private var restartAfterExchange = false

    init(
        core: GatewayCore, activity: ConnectionActivity?, tls: Bool, eventLoop: EventLoop,
        makeDecoder: (() -> ByteToMessageHandler<HTTPRequestDecoder>)?
    ) {
        self.core = core
        self.activity = activity
        self.tls = tls
        self.eventLoop = eventLoop
        workerIndex = core.workerIndex(for: eventLoop)
        self.makeDecoder = makeDecoder
    }

    func handlerAdded(context: ChannelHandlerContext) {
        channelContext = context
        connection = ConnectionInfo(remote: context.channel.remoteAddress, tls: tls)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        channelContext = nil
    }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch part {
        case .head(let head): receivedUpgrade = Self.isUpgradeRequest(head)
        case .end where receivedUpgrade:
            // The decoder stopped at this request's end, whether it is served now or waits in the queue.
            receivedUpgrade = false
            if queued.isEmpty, exchange?.wantsWebSocket == true {
                // A WebSocket upgrade is being tunnelled: nothing more is read until the upstream answers (101:
                // the connection becomes a tunnel; else the decoder restarts when the exchange is over).
                restartAfterExchange = true
                readBlocked = true
            } else {
                restartDecoder(context: context)
            }
        default: break
        }
        if !queued.isEmpty || exchange?.state.requestEnded == true || (exchange == nil && !context.channel.isWritable) {
            // A pipelined request: it is answered after the current one, and only once the client takes answers
            // again (a client that sends and never reads must not fill the gateway's memory with answers).
            queued.append(part)
            queuedBytes += Self.size(of: part)
            if queuedBytes > Self.queueLimit { readBlocked = true }
            return
        }
        serve(part, context: context)
    }

    private func serve(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            activity?.headComplete()
            requestHead(head, context: context)
        case .body(let buffer):
            exchange?.receivedBody(buffer)
        case .end:
            exchange?.receivedEnd()
        }
    }

    /// Whether the HTTP parser takes `head` for a protocol switch (llhttp's rule: CONNECT, or `Upgrade` with
    /// `Connection: upgrade`): it then stops parsing, and everything the client sends after it would pile up.
    static func isUpgradeRequest(_ head: HTTPRequestHead) -> Bool {
        head.method == .CONNECT
            || (head.headers.contains(name: "Upgrade")
                && ForwardPhase.connectionTokens(head.headers).contains("upgrade"))
    }

    /// The gateway switches no protocol, so after an upgrade request a fresh decoder takes over the bytes the
    /// stopped one holds (it forwards them when removed, after the parts it delivered) and the connection goes on
    /// with HTTP/1.1.
    private func restartDecoder(context: ChannelHandlerContext) {
        guard let makeDecoder else { return }
        let loopBound = NIOLoopBound((context, makeDecoder), eventLoop: context.eventLoop)
        context.eventLoop.execute {
            let (context, makeDecoder) = loopBound.value
            let pipeline = context.pipeline.syncOperations
            guard let old = try? pipeline.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self) else { return }
            do {
                try pipeline.addHandler(makeDecoder(), position: .after(old))
                pipeline.removeHandler(old, promise: nil)
            } catch {
                context.close(promise: nil)
            }
        }
    }

    private static func size(of part: HTTPServerRequestPart) -> Int {
        switch part {
        case .head(let head):
            return head.uri.utf8.count + head.headers.reduce(0) { $0 + $1.name.utf8.count + $1.value.utf8.count }
        case .body(let buffer): return buffer.readableBytes
        case .end: return 0
        }
    }

    /// Serves queued pipelined parts until one of them starts an exchange that is still being answered.
    private func serveQueue(context: ChannelHandlerContext) {
        guard !servingQueue else { return }
        servingQueue = true
        defer { servingQueue = false }
        while !closed, exchange?.state.requestEnded != true, exchange != nil || context.channel.isWritable,
            let part = queued.popFirst()
        {
            queuedBytes -= Self.size(of: part)
            serve(part, context: context)
        }
    }

    private func requestHead(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let runtime = core.runtime
        if tls, !certificateChecked { lookUpClientCertificate(context) }
        let connection = self.connection ?? ConnectionInfo(remote: context.channel.remoteAddress, tls: tls)
        let clientID = head.headers.first(name: "X-Request-ID")
        let requestID = clientID.flatMap { RequestID.isAcceptable($0) ? $0 : nil } ?? RequestID.make()
        var requestContext = RequestContext(
            requestID: requestID, head: head, connection: connection, trusted: runtime.trustedProxies)
        if draining { requestContext.keepAlive = false }
        // A gRPC call over HTTP/2 may be answered trailers-only: one HEADERS frame that ends the stream.
        if requestContext.isGRPC, head.version.major == 2 {
            try? context.pipeline.syncOperations.addHandler(EndStreamOnHeaders(), position: .first)
        }
        let exchange = Exchange(context: requestContext, runtime: runtime, core: core, connection: self)
        self.exchange = exchange
        exchange.start()
    }

    /// Reads the certificate the client presented from the connection's TLS handler (an HTTP/2 stream's parent),
    /// once: the handshake is over by the first request.
    private func lookUpClientCertificate(_ context: ChannelHandlerContext) {
        certificateChecked = true
        // An HTTP/1.1 connection holds the TLS handler itself; an HTTP/2 stream's parent does (a connection's
        // parent is the listener).
        let tls =
            (try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self))
            ?? (try? context.channel.parent?.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self))
        guard let certificate = tls?.peerCertificate else { return }
        connection?.clientCertificate = EdgeTLS.fingerprint(certificate)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        exchange?.clientGone()
        exchange = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let parserError = error as? HTTPParserError {
            let answer: GatewayError
            switch parserError {
            case .headerOverflow:
                answer = .headersTooLarge(limit: core.runtime.config.server.limits.maxHeaderBytes)
            default:
                answer = .badRequest("The request is malformed (\(parserError)).")
            }
            if let exchange, exchange.state.requestEnded {
                // The bad bytes belong to a later, pipelined request: answer the current one, then close.
                exchange.context.keepAlive = false
                queued.removeAll()
                queuedBytes = 0
                return
            }
            if let exchange {
                // Answers the request whose body was malformed, or closes when its answer already started.
                exchange.respondError(answer)
            } else {
                let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
                let requestContext = RequestContext(
                    requestID: RequestID.make(), head: head,
                    connection: connection ?? ConnectionInfo(remote: nil, tls: tls), trusted: [])
                let exchange = Exchange(context: requestContext, runtime: core.runtime, core: core, connection: self)
                self.exchange = exchange
                exchange.respondError(answer)
            }
            return
        }
        if let exchange {
            exchange.abort(nil)
        } else {
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is DrainEvent {
            draining = true
            if exchange == nil, activity?.isIdle ?? true { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        let writable = context.channel.isWritable
        exchange?.writabilityChanged(writable: writable)
        if writable, exchange == nil {
            serveQueue(context: context)
            // A request served from the queue decides about reading itself (its body may hold reads back).
            if exchange == nil, queuedBytes <= Self.queueLimit { resumeReading(context: context) }
        }
        context.fireChannelWritabilityChanged()
    }

    // MARK: outbound

    func read(context: ChannelHandlerContext) {
        // Between requests, nothing more is read while the client does not take the answers already written.
        if readBlocked || (!context.channel.isWritable && (exchange == nil || exchange?.state.requestEnded == true)) {
            readPending = true
        } else {
            context.read()
        }
    }

    private func resumeReading(context: ChannelHandlerContext) {
        readBlocked = false
        if readPending {
            readPending = false
            context.read()
        }
    }

    // MARK: ClientConnection (what the exchange asks of this connection)

    var isWritable: Bool { channelContext?.channel.isWritable ?? false }
    var readingStopped: Bool { readBlocked }

    func isServing(_ exchange: Exchange) -> Bool {
        channelContext != nil && self.exchange === exchange && !closed
    }

    func write(_ part: HTTPServerResponsePart, flush: Bool) {
        guard let context = channelContext else { return }
        if flush {
            context.writeAndFlush(wrapOutboundOut(part), promise: nil)
        } else {
            context.write(wrapOutboundOut(part), promise: nil)
        }
    }

    func flush() { channelContext?.flush() }

    func resumeReading() {
        guard let context = channelContext else { return }
        resumeReading(context: context)
    }

    func stopReading() { readBlocked = true }

    /// The exchange is over: write the answer's end, then serve any pipelined request that waited, and read on;
    /// or close.
    func exchangeFinished(_ exchange: Exchange, endWritten: Bool) {
        guard let context = channelContext, self.exchange === exchange else { return }
        let keepAlive = exchange.context.keepAlive && !draining
        self.exchange = nil
        readBlocked = false
        if restartAfterExchange {
            restartAfterExchange = false
            restartDecoder(context: context)
        }
        if keepAlive {
            activity?.awaitingNextRequest()
            if !endWritten { context.writeAndFlush(wrapOutboundOut(.end(exchange.answerTrailers)), promise: nil) }
            serveQueue(context: context)
            if queuedBytes > Self.queueLimit { readBlocked = true }
            if readPending, !readBlocked {
                readPending = false
                context.read()
            }
        } else if endWritten {
            context.close(promise: nil)
        } else {
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(exchange.answerTrailers))).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
    }

    /// Hands the connection to a WebSocket tunnel: the HTTP handlers leave, and the bytes the stopped decoder holds
    /// go to `handler` as it leaves.
    func becomeTunnel(_ handler: TunnelHandler) {
        guard let context = channelContext else { return }
        exchange = nil
        restartAfterExchange = false
        let pipeline = context.pipeline.syncOperations
        do {
            try pipeline.addHandler(handler)
            if let activity { pipeline.removeHandler(activity, promise: nil) }
            pipeline.removeHandler(try pipeline.handler(type: HTTPResponseEncoder.self), promise: nil)
            let decoder = try pipeline.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self)
            pipeline.removeHandler(self, promise: nil)
            pipeline.removeHandler(decoder, promise: nil)
            context.channel.read()
        } catch {
            context.close(promise: nil)
        }
    }

    func exchangeAborted(_ exchange: Exchange) {
        guard self.exchange === exchange else { return }
        self.exchange = nil
        channelContext?.close(promise: nil)
    }
}

/// Asks a connection to close once its current request is done (graceful shutdown).
struct DrainEvent: Sendable {}
