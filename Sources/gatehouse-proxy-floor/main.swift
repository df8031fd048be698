import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix

// The least an event-loop-only reverse proxy costs, for Scripts/bench: a SwiftNIO HTTP/1.1 server that forwards
// each request over a keep-alive SwiftNIO HTTP/1.1 client connection on its own event loop (one per client
// connection), with no routing, no header rewriting and no hand-over to another thread. It is what the other
// design for the gateway's upstream side (no libcurl, no worker thread) could reach at best; not the gateway.
//
// Usage: gatehouse-proxy-floor PORT UPSTREAM_PORT

/// One client connection: its requests go to its own upstream connection, the answers come back.
final class ProxyHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let upstreamPort: Int
    private var upstream: Channel?
    /// Request parts that came before the upstream connection was up.
    private var waiting: [HTTPClientRequestPart] = []
    private var context: ChannelHandlerContext?

    init(upstreamPort: Int) { self.upstreamPort = upstreamPort }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        ClientBootstrap(group: context.eventLoop)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(AnswerHandler(proxy: bound))
                }
            }
            .connect(host: "127.0.0.1", port: upstreamPort)
            .whenComplete { result in
                let proxy = bound.value
                switch result {
                case .success(let channel):
                    proxy.upstream = channel
                    for part in proxy.waiting { channel.write(part, promise: nil) }
                    proxy.waiting = []
                    channel.flush()
                case .failure:
                    proxy.context?.close(promise: nil)
                }
            }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        upstream?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part: HTTPClientRequestPart
        switch unwrapInboundIn(data) {
        case .head(let head): part = .head(head)
        case .body(let buffer): part = .body(.byteBuffer(buffer))
        case .end(let trailers): part = .end(trailers)
        }
        guard let upstream else {
            waiting.append(part)
            return
        }
        if case .end = part {
            upstream.writeAndFlush(part, promise: nil)
        } else {
            upstream.write(part, promise: nil)
        }
    }

    /// An answer part from upstream, for the client.
    func answer(_ part: HTTPClientResponsePart) {
        guard let context else { return }
        switch part {
        case .head(let head):
            context.write(wrapOutboundOut(.head(head)), promise: nil)
        case .body(let buffer):
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        case .end(let trailers):
            context.writeAndFlush(wrapOutboundOut(.end(trailers)), promise: nil)
        }
    }
}

/// The upstream connection's end: hands each answer part to the client connection's handler.
final class AnswerHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let proxy: NIOLoopBound<ProxyHandler>

    init(proxy: NIOLoopBound<ProxyHandler>) { self.proxy = proxy }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        proxy.value.answer(unwrapInboundIn(data))
    }
}

let arguments = CommandLine.arguments.dropFirst().compactMap { Int($0) }
guard arguments.count == 2 else {
    print("usage: gatehouse-proxy-floor PORT UPSTREAM_PORT")
    exit(2)
}
let upstreamPort = arguments[1]
let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
let server = try await ServerBootstrap(group: group)
    .serverChannelOption(.backlog, value: 1024)
    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.configureHTTPServerPipeline()
            try channel.pipeline.syncOperations.addHandler(ProxyHandler(upstreamPort: upstreamPort))
        }
    }
    .bind(host: "127.0.0.1", port: arguments[0]).get()
print("proxy floor listening on 127.0.0.1:\(arguments[0]), forwarding to 127.0.0.1:\(upstreamPort)")
try await server.closeFuture.get()
