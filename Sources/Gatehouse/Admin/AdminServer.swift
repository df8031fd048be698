import Foundation
import GatehouseConfig
import NIOCore
import NIOHTTP1
import NIOPosix

/// The admin listener (SPEC §5): health, readiness, metrics, the running config and reloads.
enum AdminServer {
    static func bind(gateway: Gateway, group: EventLoopGroup, address: ListenAddress) async throws -> Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(
                        NIOHTTPServerRequestAggregator(maxContentLength: 1 << 20))
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(gateway: gateway))
                }
            }
            .bind(host: address.host, port: address.port).get()
    }
}

/// Answers one admin request at a time.
final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = NIOHTTPServerRequestFull
    typealias OutboundOut = HTTPServerResponsePart

    /// An admin answer: status, content type and body.
    struct Answer: Sendable {
        var status: HTTPResponseStatus
        var contentType = "application/json"
        var body: String
        var headers: [(String, String)] = []

        static func problem(_ status: HTTPResponseStatus, _ detail: String, headers: [(String, String)] = []) -> Answer
        {
            let error = GatewayError(status: status, detail: detail, origin: .client)
            return Answer(
                status: status, contentType: "application/problem+json",
                body: ProblemResponse.body(for: error, requestID: RequestID.make()), headers: headers)
        }
    }

    private let gateway: Gateway

    init(gateway: Gateway) { self.gateway = gateway }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let request = unwrapInboundIn(data)
        let keepAlive = request.head.isKeepAlive
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        answer(request, on: loop).whenComplete { result in
            let (handler, context) = bound.value
            let answer = (try? result.get()) ?? .problem(.internalServerError, "The admin request failed.")
            handler.write(answer, keepAlive: keepAlive, context: context)
        }
    }

    private func answer(_ request: NIOHTTPServerRequestFull, on eventLoop: EventLoop) -> EventLoopFuture<Answer> {
        let path = request.head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? "/"
        let method = request.head.method
        if path == "/healthz", method == .GET || method == .HEAD {
            return eventLoop.makeSucceededFuture(Answer(status: .ok, body: "{\"status\":\"ok\"}"))
        }
        let config = gateway.core.runtime.config
        // DNS rebinding: a browser that was made to resolve an attacker's name to this address sends that name.
        guard Self.hostAllowed(request.head.headers, admin: config.admin) else {
            return eventLoop.makeSucceededFuture(
                .problem(.forbidden, "The admin API does not answer this Host; see admin.hosts."))
        }
        // A page from another origin may send simple POSTs here: state changes come only from trusted origins.
        if ![.GET, .HEAD, .OPTIONS].contains(method), let origin = request.head.headers.first(name: "Origin"),
            !config.admin.allowedOrigins.contains(origin.lowercased())
        {
            return eventLoop.makeSucceededFuture(
                .problem(.forbidden, "The admin API takes no state-changing request from this Origin."))
        }
        if let token = config.admin.token, !Self.authorized(request.head.headers, token: token.value) {
            return eventLoop.makeSucceededFuture(
                .problem(
                    .unauthorized, "This endpoint needs the admin bearer token.",
                    headers: [("WWW-Authenticate", "Bearer realm=\"gatehouse-admin\"")]))
        }
        switch (method, path) {
        case (.GET, "/readyz"):
            if let problem = gateway.readinessProblem {
                return eventLoop.makeSucceededFuture(
                    Answer(
                        status: .serviceUnavailable,
                        body: "{\"status\":\"degraded\",\"problems\":[\(Self.quoted(problem))]}"))
            }
            return eventLoop.makeSucceededFuture(Answer(status: .ok, body: "{\"status\":\"ready\"}"))
        case (.GET, "/metrics"):
            return eventLoop.makeSucceededFuture(
                Answer(
                    status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                    body: gateway.core.metrics.render()))
        case (.GET, "/upstreams"):
            return eventLoop.makeSucceededFuture(Answer(status: .ok, body: upstreams()))
        case (.GET, "/config"):
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let body = (try? encoder.encode(config)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
            return eventLoop.makeSucceededFuture(Answer(status: .ok, body: body))
        case (.POST, "/reload"):
            // Reading and checking the file is blocking work: keep it off the event loop.
            let promise = eventLoop.makePromise(of: Answer.self)
            let gateway = self.gateway
            DispatchQueue.global().async {
                do {
                    try gateway.reload()
                    promise.succeed(Answer(status: .ok, body: "{\"status\":\"reloaded\"}"))
                } catch let errors as ConfigErrors {
                    let list = errors.issues.map { Self.quoted($0.description) }.joined(separator: ",")
                    let error = GatewayError(
                        status: .badRequest, detail: "The config has errors; the old one is kept.", origin: .client)
                    var body = ProblemResponse.body(for: error, requestID: RequestID.make())
                    body.removeLast()
                    body += ",\"errors\":[\(list)]}"
                    promise.succeed(Answer(status: .badRequest, contentType: "application/problem+json", body: body))
                } catch {
                    promise.succeed(.problem(.badRequest, "Reload failed: \(error)"))
                }
            }
            return promise.futureResult
        case (.POST, "/cache/purge"):
            return purge(request.body, on: eventLoop)
        case (.POST, _) where path.hasPrefix("/consumers/"), (.DELETE, _) where path.hasPrefix("/consumers/"):
            return consumerKeys(method: method, path: path, on: eventLoop)
        case (_, _) where path.hasPrefix("/consumers/"):
            let allow = path.split(separator: "/").count == 3 ? "POST" : "DELETE"
            return eventLoop.makeSucceededFuture(
                .problem(
                    .methodNotAllowed, "This endpoint does not accept \(method.rawValue).", headers: [("Allow", allow)])
            )
        case (_, "/readyz"), (_, "/metrics"), (_, "/config"), (_, "/reload"), (_, "/cache/purge"), (_, "/upstreams"):
            return eventLoop.makeSucceededFuture(
                .problem(.methodNotAllowed, "This endpoint does not accept \(method.rawValue)."))
        default:
            return eventLoop.makeSucceededFuture(.problem(.notFound, "No admin endpoint at this path."))
        }
    }

    /// Whether the request's one Host is in `admin.hosts` (by name, or exactly as host:port) or names the admin
    /// listen address itself.
    static func hostAllowed(_ headers: HTTPHeaders, admin: AdminConfig) -> Bool {
        let values = headers["Host"]
        guard values.count == 1, let host = values.first?.lowercased(), AcceptPhase.isValidHost(host) else {
            return false
        }
        let name = AcceptPhase.hostName(host)
        let listen = admin.listen.host.lowercased()
        let listenName = listen.contains(":") ? "[" + listen + "]" : listen
        return name == listenName || admin.hosts.contains { $0 == host || $0 == name }
    }

    /// `GET /upstreams`: each upstream's targets with their state (healthy, unhealthy, ejected, circuit-open,
    /// circuit-half-open, paused) and requests in flight.
    private func upstreams() -> String {
        let upstreams = gateway.core.runtime.pools.map { pool in
            let targets = pool.snapshot().map { target in
                "{\"url\":\(Self.quoted(target.url)),\"weight\":\(target.weight),\"state\":\(Self.quoted(target.state)),"
                    + "\"in_flight\":\(target.inFlight)}"
            }
            return Self.quoted(pool.config.name) + ":{\"targets\":[" + targets.joined(separator: ",") + "]}"
        }
        return "{" + upstreams.joined(separator: ",") + "}"
    }

    /// `POST /consumers/{id}/keys` issues a key (returned once, stored hashed); `DELETE
    /// /consumers/{id}/keys/{sha256}` revokes one. Every instance sees a revocation within a second.
    private func consumerKeys(method: HTTPMethod, path: String, on eventLoop: EventLoop) -> EventLoopFuture<Answer> {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        // ["", "consumers", id, "keys"] or ["", "consumers", id, "keys", digest]
        guard parts.count >= 4, parts[3] == "keys", let consumer = parts[2].removingPercentEncoding,
            ConsumerID.isValid(consumer)
        else {
            return eventLoop.makeSucceededFuture(.problem(.notFound, "No admin endpoint at this path."))
        }
        // Keys belong to consumers of the config, where their rate limits live.
        guard gateway.core.runtime.config.consumers.contains(where: { $0.id == consumer }) else {
            return eventLoop.makeSucceededFuture(
                .problem(.notFound, "No consumer \(Self.quoted(consumer)) in the running config."))
        }
        let keys = gateway.core.authenticator.runtimeKeys
        switch (method, parts.count) {
        case (.POST, 4):
            return eventLoop.makeFutureWithTask {
                do {
                    let (key, digest) = try await keys.issue(consumer: consumer)
                    return Answer(
                        status: .created,
                        body: "{\"consumer\":\(Self.quoted(consumer)),\"key\":\(Self.quoted(key)),"
                            + "\"sha256\":\"sha256:\(digest.hex)\"}")
                } catch {
                    return .problem(.serviceUnavailable, "The key could not be stored: \(error)")
                }
            }
        case (.DELETE, 5):
            guard let digest = KeyDigest(text: parts[4]) else {
                return eventLoop.makeSucceededFuture(
                    .problem(.badRequest, "The key is named by its sha256 digest: 64 hex digits."))
            }
            return eventLoop.makeFutureWithTask {
                do {
                    guard try await keys.revoke(consumer: consumer, digest: digest) else {
                        return .problem(.notFound, "This consumer has no such key.")
                    }
                    return Answer(status: .ok, body: "{\"revoked\":\"sha256:\(digest.hex)\"}")
                } catch {
                    return .problem(.serviceUnavailable, "The key could not be revoked: \(error)")
                }
            }
        default:
            return eventLoop.makeSucceededFuture(.problem(.notFound, "No admin endpoint at this path."))
        }
    }

    /// `POST /cache/purge` with `{"route": id}` or `{"route": id, "path": "/v1/users/7"}`: removes the route's
    /// entries, or those of one path (every variant, host and consumer); answers `{"purged": N}`.
    private func purge(_ body: ByteBuffer?, on eventLoop: EventLoop) -> EventLoopFuture<Answer> {
        struct Request: Decodable {
            var route: String
            var path: String?
        }
        guard let body, let request = try? JSONDecoder().decode(Request.self, from: Data(body.readableBytesView))
        else {
            return eventLoop.makeSucceededFuture(
                .problem(.badRequest, "The body must be JSON: {\"route\": \"id\"} with an optional \"path\"."))
        }
        let runtime = gateway.core.runtime
        guard runtime.routes.contains(where: { $0.config.id == request.route && $0.config.cache != nil }) else {
            return eventLoop.makeSucceededFuture(
                .problem(.notFound, "No route \(Self.quoted(request.route)) with a cache in the running config."))
        }
        var path: String?
        if let given = request.path {
            // The same normalisation as requests get, so "/v1/./users/7?x=1" purges "/v1/users/7".
            let target = given.split(separator: "?", maxSplits: 1).first ?? ""
            guard target.hasPrefix("/"), let normalised = PathNormalizer.normalize(target) else {
                return eventLoop.makeSucceededFuture(.problem(.badRequest, "The path must start with \"/\"."))
            }
            path = normalised
        }
        let cache = gateway.core.cache
        let purgedPath = path
        return eventLoop.makeFutureWithTask {
            do {
                let purged = try await cache.purge(route: request.route, path: purgedPath)
                return Answer(status: .ok, body: "{\"purged\":\(purged)}")
            } catch {
                return .problem(.serviceUnavailable, "The cache store could not be reached: \(error)")
            }
        }
    }

    private func write(_ answer: Answer, keepAlive: Bool, context: ChannelHandlerContext) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: answer.contentType)
        headers.add(name: "Content-Length", value: String(answer.body.utf8.count))
        for (name, value) in answer.headers { headers.add(name: name, value: value) }
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: answer.status, headers: headers))),
            promise: nil)
        context.write(
            wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: answer.body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        let channel = context.channel
        if !keepAlive { done.whenComplete { _ in channel.close(promise: nil) } }
    }

    /// Compares the bearer token in constant time.
    static func authorized(_ headers: HTTPHeaders, token: String) -> Bool {
        guard let value = headers.first(name: "Authorization"), value.hasPrefix("Bearer ") else { return false }
        let given = Array(value.dropFirst(7).utf8)
        let expected = Array(token.utf8)
        var difference = UInt8(given.count == expected.count ? 0 : 1)
        for index in 0..<expected.count { difference |= expected[index] ^ (index < given.count ? given[index] : 0) }
        return difference == 0
    }

    static func quoted(_ text: String) -> String {
        var out = ""
        JSONText.appendString(text, to: &out)
        return out
    }
}
