import Foundation
public import NIOCore
import NIOHTTP1
public import NIOPosix
import Synchronization

/// A small HTTP/1.1 server to put behind the gateway: used by `Scripts/serve` as the demo service and by the
/// tests as a real upstream.
///
/// | path                | answer                                                          |
/// |---------------------|-----------------------------------------------------------------|
/// | `/bytes/{n}`        | n bytes with Content-Length, written as the client takes them   |
/// | `/chunked/{n}`      | n bytes, chunked                                                |
/// | `/count` (POST/PUT) | `{"bytes":N}` after reading the whole body as it streams        |
/// | `/echo-body`        | the request body streamed back, chunked                         |
/// | `/delay/{ms}`       | an answer after ms milliseconds                                 |
/// | `/events/{n}`       | n server-sent events, 300 ms apart, then the end (SSE)          |
/// | `/status/{code}`    | an empty answer with that status                                |
/// | `/truncate/{n}`     | promises n bytes, sends half, closes                            |
/// | `/drop`             | closes the connection without answering                         |
/// | `/cache/...`        | a response shaped by the query, for cache tests (see below)     |
/// | `/document`         | ``document`` as JSON, `max-age=300` (a JWKS in the auth tests)  |
/// | `/oauth/token`      | a token for `demo-client`/`demo-secret` (Basic or form)         |
/// | `/protected`        | the echo, with the latest token as `Bearer`; else 401           |
/// | anything else       | JSON echo of method, path, query and headers                    |
///
/// Echo answers carry `X-Served-By: <port>`. While ``failure`` is set, every path but `/oauth/token` answers
/// with its status (and `Retry-After` when given).
///
/// `/cache/...` takes `cc` (Cache-Control), `etag`, `lm` (Last-Modified), `vary`, `cookie` (Set-Cookie),
/// `expires`, `age`, `status`, `delay` (ms) and `size` (body bytes, else a small JSON body with the request
/// number `n`); it answers 304 to a matching `If-None-Match` or `If-Modified-Since`.
public final class DemoUpstream: Sendable {
    public let channel: Channel
    private let counter: RequestCounter

    /// The port the server listens on.
    public var port: Int { channel.localAddress?.port ?? 0 }
    /// Requests received so far.
    public var requestCount: Int { counter.value.load(ordering: .relaxed) }

    /// What `/document` serves.
    public var document: String {
        get { counter.document.withLock { $0 } }
        set { counter.document.withLock { $0 = newValue } }
    }

    /// Requests for `/document` so far.
    public var documentRequests: Int { counter.documentRequests.load(ordering: .relaxed) }

    /// While set, every path but `/oauth/token` answers with this status and `Retry-After` value.
    public var failure: (status: Int, retryAfter: String?)? {
        get { counter.failure.withLock { $0 } }
        set { counter.failure.withLock { $0 = newValue } }
    }

    /// Tokens issued by `/oauth/token` so far.
    public var tokenRequests: Int { counter.tokenRequests.load(ordering: .relaxed) }

    /// Requests to `/oauth/token` so far, answered or refused.
    public var tokenAttempts: Int { counter.tokenAttempts.load(ordering: .relaxed) }

    /// The `expires_in` of the tokens `/oauth/token` issues, in seconds (3600 unless set).
    public var tokenLifetime: Int {
        get { counter.tokenLifetime.load(ordering: .relaxed) }
        set { counter.tokenLifetime.store(newValue, ordering: .relaxed) }
    }

    /// While set, `/oauth/token` answers with this status and issues nothing.
    public var tokenFailure: Int? {
        get { counter.tokenFailure.withLock { $0 } }
        set { counter.tokenFailure.withLock { $0 = newValue } }
    }

    /// The form fields of the last accepted token request, and whether its client authenticated by Basic.
    public var lastTokenRequest: (form: [String: String], basic: Bool)? { counter.lastTokenRequest.withLock { $0 } }

    /// Makes `/protected` refuse the token it accepts now, as if it had been revoked.
    public func revokeToken() { counter.acceptedToken.withLock { $0 = nil } }

    private let connections: ConnectionTracker

    private init(channel: Channel, counter: RequestCounter, connections: ConnectionTracker) {
        self.connections = connections
        self.channel = channel
        self.counter = counter
    }

    /// Starts listening on `host:port` (port 0 picks a free port).
    public static func start(
        host: String = "127.0.0.1", port: Int = 0, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> DemoUpstream {
        let stats = RequestCounter()
        let connections = ConnectionTracker()
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                connections.add(channel)
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(DemoHandler(stats: stats))
                }
            }
            .bind(host: host, port: port).get()
        return DemoUpstream(channel: channel, counter: stats, connections: connections)
    }

    /// Stops listening and closes every open connection, as a killed server would.
    public func stop() async {
        try? await channel.close()
        for connection in connections.all() { try? await connection.close() }
    }
}

/// The server's open connections.
final class ConnectionTracker: Sendable {
    private let channels = Mutex<[ObjectIdentifier: Channel]>([:])

    func add(_ channel: Channel) {
        let id = ObjectIdentifier(channel)
        channels.withLock { $0[id] = channel }
        channel.closeFuture.whenComplete { _ in _ = self.channels.withLock { $0.removeValue(forKey: id) } }
    }

    func all() -> [Channel] { channels.withLock { Array($0.values) } }
}

/// Counts the requests a server received.
final class RequestCounter: Sendable {
    let value = Atomic<Int>(0)
    let document = Mutex("{}")
    let documentRequests = Atomic<Int>(0)
    let failure = Mutex<(status: Int, retryAfter: String?)?>(nil)
    let tokenRequests = Atomic<Int>(0)
    let tokenAttempts = Atomic<Int>(0)
    let tokenLifetime = Atomic<Int>(3600)
    let tokenFailure = Mutex<Int?>(nil)
    let acceptedToken = Mutex<String?>(nil)
    let lastTokenRequest = Mutex<(form: [String: String], basic: Bool)?>(nil)
    func increment() { value.wrappingAdd(1, ordering: .relaxed) }
}

final class DemoHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum Mode {
        case echo
        case count
        case echoBody
    }

    private let stats: RequestCounter
    private var head: HTTPRequestHead?
    private var mode = Mode.echo
    private var received = 0
    /// The body of a token request (a small form).
    private var form = ByteBuffer()
    private var remaining = 0
    private var chunk = ByteBuffer()
    private var streaming = false
    private var pumping = false

    init(stats: RequestCounter) { self.stats = stats }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            stats.increment()
            self.head = head
            received = 0
            form.clear()
            let path = head.uri.split(separator: "?").first.map(String.init) ?? "/"
            mode = path == "/count" ? .count : (path == "/echo-body" ? .echoBody : .echo)
            if mode == .echoBody {
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: "application/octet-stream")
                headers.add(name: "Transfer-Encoding", value: "chunked")
                context.writeAndFlush(
                    wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))),
                    promise: nil)
            }
        case .body(let buffer):
            received += buffer.readableBytes
            if head?.uri == "/oauth/token", form.readableBytes + buffer.readableBytes <= 8192 {
                form.writeImmutableBuffer(buffer)
            }
            if mode == .echoBody {
                context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            }
        case .end:
            guard let head else { return }
            respond(head, context: context)
        }
    }

    private func respond(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let parts = head.uri.split(separator: "?", maxSplits: 1)
        let path = parts.first.map(String.init) ?? "/"
        let segments = path.split(separator: "/").map(String.init)
        if path != "/oauth/token", let failure = stats.failure.withLock({ $0 }) {
            var headers = HTTPHeaders()
            if let retryAfter = failure.retryAfter { headers.add(name: "Retry-After", value: retryAfter) }
            send(
                status: HTTPResponseStatus(statusCode: failure.status), body: "{\"failure\":true}", head: head,
                context: context, extra: headers)
            return
        }
        switch (segments.first, segments.count) {
        case ("oauth", 2) where segments[1] == "token":
            issueToken(head, context: context)
        case ("protected", _):
            let accepted = stats.acceptedToken.withLock { $0 }
            if let accepted, head.headers["Authorization"].first == "Bearer " + accepted {
                send(status: .ok, body: echo(head, path: path, query: nil), head: head, context: context)
            } else {
                var headers = HTTPHeaders()
                headers.add(name: "WWW-Authenticate", value: "Bearer error=\"invalid_token\"")
                send(
                    status: .unauthorized, body: "{\"error\":\"invalid_token\"}", head: head, context: context,
                    extra: headers)
            }
        case ("count", _):
            send(status: .ok, body: "{\"bytes\":\(received)}", head: head, context: context)
        case ("echo-body", _):
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        case ("bytes", 2), ("chunked", 2):
            let total = Int(segments[1]) ?? 0
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/octet-stream")
            if segments[0] == "bytes" { headers.add(name: "Content-Length", value: String(total)) }
            context.write(
                wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))),
                promise: nil)
            remaining = total
            chunk = context.channel.allocator.buffer(repeating: UInt8(ascii: "x"), count: 64 * 1024)
            streaming = true
            pump(context: context)
        case ("delay", 2):
            let milliseconds = Int64(segments[1]) ?? 0
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            context.eventLoop.scheduleTask(in: .milliseconds(milliseconds)) {
                let (handler, context) = bound.value
                handler.send(status: .ok, body: "{\"delayed_ms\":\(milliseconds)}", head: head, context: context)
            }
        case ("events", 2):
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "text/event-stream")
            headers.add(name: "Cache-Control", value: "no-cache")
            context.writeAndFlush(
                wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))),
                promise: nil)
            sendEvents(max(0, min(Int(segments[1]) ?? 0, 100)), number: 1, context: context)
        case ("status", 2):
            let code = Int(segments[1]) ?? 500
            send(status: HTTPResponseStatus(statusCode: code), body: "", head: head, context: context)
        case ("truncate", 2):
            let total = Int(segments[1]) ?? 0
            var headers = HTTPHeaders()
            headers.add(name: "Content-Length", value: String(total))
            context.write(
                wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))),
                promise: nil)
            let half = context.channel.allocator.buffer(repeating: UInt8(ascii: "x"), count: total / 2)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(half)))).whenComplete { _ in
                channel.close(promise: nil)
            }
        case ("drop", _):
            context.close(promise: nil)
        case ("document", _):
            stats.documentRequests.wrappingAdd(1, ordering: .relaxed)
            let body = stats.document.withLock { $0 }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Cache-Control", value: "max-age=300")
            headers.add(name: "Content-Length", value: String(body.utf8.count))
            context.write(
                wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))),
                promise: nil)
            context.write(
                wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        case ("cache", _):
            let query = Self.queryItems(parts.count > 1 ? parts[1] : "")
            let delay = Int64(query["delay"] ?? "") ?? 0
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            context.eventLoop.scheduleTask(in: .milliseconds(delay)) {
                let (handler, context) = bound.value
                handler.cacheable(head, path: path, query: query, context: context)
            }
        default:
            send(
                status: .ok, body: echo(head, path: path, query: parts.count > 1 ? String(parts[1]) : nil), head: head,
                context: context)
        }
    }

    /// The `/cache/...` answer.
    private func cacheable(
        _ head: HTTPRequestHead, path: String, query: [String: String], context: ChannelHandlerContext
    ) {
        var headers = HTTPHeaders()
        let fields = [
            ("cc", "Cache-Control"), ("etag", "ETag"), ("lm", "Last-Modified"), ("vary", "Vary"),
            ("cookie", "Set-Cookie"), ("expires", "Expires"), ("age", "Age"),
        ]
        for (parameter, name) in fields { if let value = query[parameter] { headers.add(name: name, value: value) } }
        let etagMatches = query["etag"].map { head.headers["If-None-Match"].contains($0) } ?? false
        let dateMatches = query["lm"].map { head.headers["If-Modified-Since"].contains($0) } ?? false
        if etagMatches || dateMatches {
            context.write(
                wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .notModified, headers: headers))),
                promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            return
        }
        let body: String
        if let size = query["size"].flatMap(Int.init) {
            body = String(repeating: "c", count: max(0, min(size, 16 << 20)))
        } else {
            let vary = head.headers["Accept"].first ?? ""
            body = "{\"n\":\(stats.value.load(ordering: .relaxed)),\"path\":\"\(path)\",\"accept\":\"\(vary)\"}"
        }
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: String(body.utf8.count))
        let status = HTTPResponseStatus(statusCode: Int(query["status"] ?? "") ?? 200)
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
            promise: nil)
        if head.method != .HEAD, !body.isEmpty {
            context.write(
                wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    /// `a=1&b=x%20y` as a dictionary, percent-decoded.
    static func queryItems(_ query: Substring) -> [String: String] {
        var items: [String: String] = [:]
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map { part in
                String(part).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(part)
            }
            if let name = parts.first { items[name] = parts.count > 1 ? parts[1] : "" }
        }
        return items
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if streaming, context.channel.isWritable { pump(context: context) }
        context.fireChannelWritabilityChanged()
    }

    /// Writes the streamed body while the client keeps up.
    private func pump(context: ChannelHandlerContext) {
        // A flush can report writability again from inside this loop: never run it twice at once.
        guard streaming, !pumping else { return }
        pumping = true
        defer { pumping = false }
        while remaining > 0, context.channel.isWritable {
            let size = min(remaining, chunk.readableBytes)
            remaining -= size
            context.write(
                wrapOutboundOut(.body(.byteBuffer(chunk.getSlice(at: chunk.readerIndex, length: size) ?? chunk))),
                promise: nil)
            context.flush()
        }
        if remaining == 0 {
            streaming = false
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    /// The OAuth2 token endpoint: client credentials by Basic auth or in the form (RFC 6749 §2.3.1), a new token
    /// each time (after 100 ms, so that concurrent callers overlap), which becomes the one `/protected` accepts.
    private func issueToken(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        stats.tokenAttempts.wrappingAdd(1, ordering: .relaxed)
        if let status = stats.tokenFailure.withLock({ $0 }) {
            send(
                status: HTTPResponseStatus(statusCode: status), body: "{\"error\":\"temporarily_unavailable\"}",
                head: head, context: context)
            return
        }
        var fields: [String: String] = [:]
        for pair in String(buffer: form).split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map {
                $0.replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? ""
            }
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        let basic = head.headers["Authorization"].first
        let byBasic = basic == "Basic " + Data("demo-client:demo-secret".utf8).base64EncodedString()
        let byForm = basic == nil && fields["client_id"] == "demo-client" && fields["client_secret"] == "demo-secret"
        guard head.method == .POST, fields["grant_type"] == "client_credentials", byBasic || byForm else {
            send(status: .unauthorized, body: "{\"error\":\"invalid_client\"}", head: head, context: context)
            return
        }
        stats.lastTokenRequest.withLock { $0 = (fields, byBasic) }
        let number = stats.tokenRequests.wrappingAdd(1, ordering: .relaxed).newValue
        let token = "token-\(number)-\(UInt32.random(in: 0...UInt32.max))"
        stats.acceptedToken.withLock { $0 = token }
        let lifetime = stats.tokenLifetime.load(ordering: .relaxed)
        let body = "{\"access_token\":\"\(token)\",\"token_type\":\"Bearer\",\"expires_in\":\(lifetime)}"
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: .milliseconds(100)) {
            let (handler, context) = bound.value
            handler.send(status: .ok, body: body, head: head, context: context)
        }
    }

    private func send(
        status: HTTPResponseStatus, body: String, head: HTTPRequestHead, context: ChannelHandlerContext,
        extra: HTTPHeaders = HTTPHeaders()
    ) {
        var headers = extra
        headers.add(name: "X-Served-By", value: String(context.channel.localAddress?.port ?? 0))
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: String(body.utf8.count))
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
            promise: nil)
        if !body.isEmpty {
            context.write(
                wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    /// Writes event `number` of `count` at once, the next 300 ms later, and ends the answer after the last.
    private func sendEvents(_ count: Int, number: Int, context: ChannelHandlerContext) {
        guard number <= count else {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            return
        }
        let event = context.channel.allocator.buffer(string: "id: \(number)\ndata: event \(number)\n\n")
        context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(event))), promise: nil)
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: .milliseconds(300)) {
            let (handler, context) = bound.value
            handler.sendEvents(count, number: number + 1, context: context)
        }
    }

    private func echo(_ head: HTTPRequestHead, path: String, query: String?) -> String {
        func quoted(_ text: String) -> String {
            var out = "\""
            for scalar in text.unicodeScalars {
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                default: out.unicodeScalars.append(scalar.value < 0x20 ? " " : scalar)
                }
            }
            return out + "\""
        }
        var headers: [String] = []
        var seen: [String: Int] = [:]
        for (name, value) in head.headers {
            let lower = name.lowercased()
            if let index = seen[lower] {
                headers[index] = headers[index].dropLast() + ", " + quoted(value).dropFirst()
            } else {
                seen[lower] = headers.count
                headers.append("\(quoted(lower)):\(quoted(value))")
            }
        }
        return "{\"method\":\(quoted(head.method.rawValue)),\"path\":\(quoted(path)),\"query\":"
            + (query.map(quoted) ?? "null")
            + ",\"body_bytes\":\(received),\"headers\":{\(headers.joined(separator: ","))}}"
    }
}
