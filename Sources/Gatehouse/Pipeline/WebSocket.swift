import NIOCore
import NIOHTTP1
import UpstreamClient

/// WebSocket through the gateway (SPEC §7.1): on a route with `websocket: true`, an HTTP/1.1 `Upgrade: websocket`
/// request passes the corridor up to the rate limit like any other; then the gateway opens a libcurl tunnel to a
/// target, sends the upgrade request itself, and relays the upstream's answer. A 101 turns both connections into a
/// byte pipe (``TunnelHandler`` on the client's side); any other answer goes to the client as an ordinary one.
enum WebSocket {
    /// Whether `head` asks to switch to WebSocket: HTTP/1.1 GET with `Upgrade: websocket` and `Connection: upgrade`.
    static func isUpgrade(_ head: HTTPRequestHead) -> Bool {
        guard head.method == .GET, head.version == .http1_1 else { return false }
        let upgrades = head.headers["Upgrade"].flatMap { $0.split(separator: ",") }
        return upgrades.contains { $0.trimmedSpaces.lowercased() == "websocket" }
            && ForwardPhase.connectionTokens(head.headers).contains("upgrade")
    }

    /// The upgrade request sent through the tunnel: the forwarded request's target and headers (as any request
    /// gets them), `Host` of the target, and the upgrade's own hop-by-hop headers back in place.
    static func upgradeRequest(_ request: UpstreamRequest) -> ByteBuffer {
        let (authority, target) = split(request.url)
        var text = "GET " + target + " HTTP/1.1\r\nHost: " + authority + "\r\n"
        for (name, value) in request.headers { text += name + ": " + value + "\r\n" }
        text += "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        return ByteBuffer(string: text)
    }

    /// `scheme://authority/target` -> (authority, target).
    static func split(_ url: String) -> (authority: Substring, target: String) {
        guard let schemeEnd = url.firstRange(of: "://") else { return ("", "/") }
        let rest = url[schemeEnd.upperBound...]
        guard let slash = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) else { return (rest, "/") }
        let target = rest[slash...]
        return (rest[..<slash], target.first == "?" ? "/" + target : String(target))
    }

    /// The most an upgrade answer's head and a refusal's body may take.
    static let maxHandshakeBytes = 64 * 1024

    /// A parsed answer head and the bytes that followed it.
    struct Answer {
        var head: UpstreamResponseHead
        var rest: ByteBuffer
    }

    /// Parses the upstream's answer head once it is complete: nil while more is needed, a failure when it is not a
    /// valid HTTP/1.1 head (or is too large).
    static func parseAnswer(_ buffer: ByteBuffer) -> Result<Answer, GatewayError>? {
        let bytes = buffer.readableBytesView
        guard let end = headEnd(bytes) else {
            return bytes.count > maxHandshakeBytes ? .failure(invalid("is too large")) : nil
        }
        let text = String(decoding: bytes[bytes.startIndex..<(bytes.startIndex + end)], as: UTF8.self)
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false)
        guard !lines.isEmpty else { return .failure(invalid("is empty")) }
        let statusLine = lines.removeFirst()
        let parts = statusLine.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count >= 2, parts[0] == "HTTP/1.1" || parts[0] == "HTTP/1.0", parts[1].utf8.count == 3,
            let status = Int(parts[1]), (101...599).contains(status)
        else { return .failure(invalid("has no valid status line")) }
        var headers: [(name: String, value: String)] = []
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex,
                line[..<colon].allSatisfy(isTokenCharacter),
                line.utf8.allSatisfy({ $0 >= 0x20 || $0 == 0x09 }), !line.utf8.contains(0x7F)
            else { return .failure(invalid("has a malformed header line")) }
            headers.append(
                (String(line[..<colon]), String(line[line.index(after: colon)...].trimmedSpaces)))
        }
        var rest = buffer
        rest.moveReaderIndex(forwardBy: end + 4)
        return .success(Answer(head: UpstreamResponseHead(status: status, headers: headers), rest: rest))
    }

    /// RFC 9110 tchar.
    private static func isTokenCharacter(_ character: Character) -> Bool {
        character.isASCII && (character.isLetter || character.isNumber || "-_!#$%&'*+.^`|~".contains(character))
    }

    private static func headEnd(_ bytes: ByteBufferView) -> Int? {
        guard bytes.count >= 4 else { return nil }
        var index = bytes.startIndex
        while index + 3 < bytes.endIndex {
            if bytes[index] == 13, bytes[index + 1] == 10, bytes[index + 2] == 13, bytes[index + 3] == 10 {
                return index - bytes.startIndex
            }
            index += 1
        }
        return nil
    }

    private static func invalid(_ what: String) -> GatewayError {
        GatewayError(
            status: .badGateway, detail: "The upstream's answer to the WebSocket upgrade \(what).", origin: .upstream)
    }
}

/// Receives an upstream tunnel's events on the exchange's event loop: the handshake goes to the ``Exchange``, the
/// bytes after a 101 to the client's ``TunnelHandler``.
final class WebSocketBridge: UpstreamTunnelDelegate {
    let eventLoop: EventLoop
    private let exchange: NIOLoopBound<Exchange>
    /// The client's side once the tunnel is established.
    private let client: NIOLoopBoundBox<TunnelHandler?>

    init(_ exchange: Exchange) {
        eventLoop = exchange.eventLoop
        self.exchange = NIOLoopBound(exchange, eventLoop: exchange.eventLoop)
        client = NIOLoopBoundBox(nil, eventLoop: exchange.eventLoop)
    }

    /// From now on the tunnel's bytes go to `handler`.
    func attach(_ handler: TunnelHandler) { client.value = handler }

    func tunnelConnected(_ tunnel: UpstreamTunnel) {
        exchange.value.webSocketConnected(tunnel)
    }

    func tunnel(_ tunnel: UpstreamTunnel, received bytes: [ByteBuffer]) {
        if let handler = client.value {
            handler.fromUpstream(bytes)
        } else {
            exchange.value.webSocketHandshake(received: bytes, from: tunnel)
        }
    }

    func tunnelWantsMore(_ tunnel: UpstreamTunnel) {
        client.value?.upstreamWantsMore()
    }

    func tunnelClosed(_ tunnel: UpstreamTunnel, error: UpstreamError?) {
        if let handler = client.value {
            handler.upstreamClosed()
        } else {
            exchange.value.webSocketFailed(error ?? UpstreamError(kind: .reset, detail: "closed during the upgrade"))
        }
    }
}
