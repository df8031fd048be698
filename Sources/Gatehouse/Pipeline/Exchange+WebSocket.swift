import GatehouseConfig
import NIOCore
import NIOHTTP1
import UpstreamClient

/// The corridor's WebSocket branch (see ``WebSocket``): after the rate limit, an upgrade on a route with
/// `websocket: true` is tunnelled instead of forwarded.
extension Exchange {
    /// An upgrade to WebSocket on a route that allows it: tunnelled instead of forwarded.
    var wantsWebSocket: Bool { context.route?.config.websocket == true && WebSocket.isUpgrade(context.head) }

    /// pick target, then a tunnel to it; the route's timeout bounds the connection and the upstream's answer.
    func openWebSocket() {
        do throws(GatewayError) {
            try PickTargetPhase.run(&context)
        } catch {
            respondError(error)
            return
        }
        let request = ForwardPhase.upstreamRequest(for: context, runtime: runtime)
        let bridge = WebSocketBridge(self)
        let tunnel = core.upstream.openTunnel(
            TunnelRequest(
                url: request.url, connectTimeoutMilliseconds: request.connectTimeoutMilliseconds,
                verifyTLS: request.verifyTLS, caFile: request.caFile),
            delegate: bridge, worker: workerIndex)
        webSocket = WebSocketState(tunnel: tunnel, bridge: bridge, upgrade: WebSocket.upgradeRequest(request))
        state.waitingFor = .attempt
        waitTimer = after(.milliseconds(Int64(context.timeoutMilliseconds)), waitingFor: .attempt) { exchange in
            exchange.webSocketFailed(UpstreamError(kind: .timeout, detail: "no answer to the WebSocket upgrade"))
        }
    }

    /// The tunnel is connected: the upgrade request goes out.
    func webSocketConnected(_ tunnel: UpstreamTunnel) {
        guard isLive, let webSocket, webSocket.tunnel === tunnel else {
            tunnel.close()
            return
        }
        tunnel.send(webSocket.upgrade)
    }

    /// The upstream's answer to the upgrade, as it arrives: a 101 makes the tunnel; anything else is relayed.
    func webSocketHandshake(received chunks: [ByteBuffer], from tunnel: UpstreamTunnel) {
        guard isLive, var webSocket, webSocket.tunnel === tunnel else {
            tunnel.close()
            return
        }
        for var chunk in chunks { webSocket.answer.writeBuffer(&chunk) }
        self.webSocket = webSocket
        guard let parsed = WebSocket.parseAnswer(webSocket.answer) else { return }
        switch parsed {
        case .failure(let error):
            tunnel.close()
            self.webSocket = nil
            context.lease?.record(.failure)
            respondError(error)
        case .success(let answer) where answer.head.status == 101:
            establishWebSocket(answer, webSocket)
        case .success(let answer):
            // A refusal (401, 404, ...) with a body of up to 64 KiB: relayed once the body is in.
            let length =
                answer.head.headers.first { $0.name.caseInsensitiveEquals("Content-Length") }
                .flatMap { Int($0.value) } ?? 0
            guard length <= WebSocket.maxHandshakeBytes else {
                tunnel.close()
                respondError(
                    GatewayError(
                        status: .badGateway, detail: "The upstream refused the WebSocket upgrade with a large body.",
                        origin: .upstream))
                return
            }
            guard answer.rest.readableBytes >= length else { return }
            tunnel.close()
            self.webSocket = nil
            waitTimer?.cancel()
            state.waitingFor = nil
            context.lease?.record(.of(status: answer.head.status))
            context.status = answer.head.status
            var head = RespondPhase.head(for: answer.head, context)
            head.headers.remove(name: "Transfer-Encoding")
            head.headers.replaceOrAdd(name: "Content-Length", value: String(length))
            respond(head, body: answer.rest.getSlice(at: answer.rest.readerIndex, length: length))
        }
    }

    /// 101: the client gets the upstream's answer, and both connections become one byte pipe.
    private func establishWebSocket(_ answer: WebSocket.Answer, _ webSocket: WebSocketState) {
        waitTimer?.cancel()
        state.waitingFor = nil
        context.lease?.record(.of(status: 101))
        context.status = 101
        var head = RespondPhase.head(for: answer.head, context)
        head.headers.replaceOrAdd(name: "Upgrade", value: "websocket")
        head.headers.replaceOrAdd(name: "Connection", value: "Upgrade")
        state.answerBegan()
        connection?.write(.head(head), flush: true)
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        let handler = TunnelHandler(
            tunnel: webSocket.tunnel,
            idleTimeout: .nanoseconds(runtime.config.server.limits.websocketIdleTimeout.nanoseconds)
        ) { bytesIn, bytesOut in
            let exchange = bound.value
            exchange.context.bytesIn += bytesIn
            exchange.context.bytesOut += bytesOut
            exchange.state.abandoned()
            exchange.log()
        }
        webSocket.bridge.attach(handler)
        connection?.becomeTunnel(handler)
        if answer.rest.readableBytes > 0 { handler.fromUpstream([answer.rest]) }
    }

    /// The tunnel failed before the upgrade was answered.
    func webSocketFailed(_ error: UpstreamError) {
        guard isLive, let webSocket else { return }
        webSocket.tunnel.close()
        self.webSocket = nil
        waitTimer?.cancel()
        state.waitingFor = nil
        context.lease?.record(.failure)
        upstreamFailed(error)
    }
}
