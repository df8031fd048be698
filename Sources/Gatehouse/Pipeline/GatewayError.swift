import NIOHTTP1
import UpstreamClient

/// An answer the gateway makes itself instead of forwarding: always RFC 9457 problem+json.
///
/// It carries where the failure came from, whether the request may go out again, and whether the connection must
/// close afterwards. `GatewayHandler.respondError` is the one place that turns it into the client's answer (or a
/// stale entry when stale-if-error allows, for a failure on the upstream's side); ``ProblemResponse`` renders it.
struct GatewayError: Error, Sendable {
    /// Who caused the failure, for logs and metrics.
    enum Origin: String, Sendable {
        case client, upstream, gateway, redis
    }

    var status: HTTPResponseStatus
    var detail: String
    var origin: Origin
    /// Extra headers such as `Allow`, `WWW-Authenticate` or `Retry-After`.
    var headers: [(String, String)] = []
    /// The connection cannot be trusted or reused after this answer.
    var closeConnection = false
    /// The upstream never took the request (no connection was made), so sending it again repeats nothing.
    var retryAllowed = false

    /// The answer for an upstream exchange that ended without a complete answer.
    init(upstream error: UpstreamError) {
        switch error.kind {
        case .timeout:
            self = .upstreamTimeout
        case .connectTimeout, .connect:
            self.init(status: .badGateway, detail: "The upstream could not be reached.", origin: .upstream)
            retryAllowed = true
        case .tls:
            self.init(status: .badGateway, detail: "The TLS handshake with the upstream failed.", origin: .upstream)
        case .requestBody:
            self.init(
                status: .badRequest, detail: "The request body could not be read.", origin: .client,
                closeConnection: true)
        case .cancelled:
            self.init(status: .serviceUnavailable, detail: "The gateway is shutting down.", origin: .gateway)
        case .reset, .other:
            self.init(status: .badGateway, detail: "The upstream connection failed.", origin: .upstream)
        }
    }

    init(
        status: HTTPResponseStatus, detail: String, origin: Origin, headers: [(String, String)] = [],
        closeConnection: Bool = false
    ) {
        self.status = status
        self.detail = detail
        self.origin = origin
        self.headers = headers
        self.closeConnection = closeConnection
    }

    static func badRequest(_ detail: String) -> GatewayError {
        GatewayError(status: .badRequest, detail: detail, origin: .client, closeConnection: true)
    }

    static func notFound() -> GatewayError {
        GatewayError(status: .notFound, detail: "No route matches this request.", origin: .client)
    }

    static func methodNotAllowed(allow: [String]) -> GatewayError {
        GatewayError(
            status: .methodNotAllowed, detail: "This path does not accept this method.", origin: .client,
            headers: [("Allow", allow.joined(separator: ", "))])
    }

    static func headersTooLarge(limit: Int) -> GatewayError {
        GatewayError(
            status: .requestHeaderFieldsTooLarge, detail: "The request head is larger than \(limit) bytes.",
            origin: .client,
            closeConnection: true)
    }

    static func bodyTooLarge(limit: Int) -> GatewayError {
        GatewayError(
            status: .payloadTooLarge, detail: "The request body is larger than \(limit) bytes.", origin: .client,
            closeConnection: true)
    }

    static let upstreamTimeout = GatewayError(
        status: .gatewayTimeout, detail: "The upstream did not answer in time.", origin: .upstream)

    /// `only-if-cached` and nothing stored may answer (RFC 9111 §5.2.1.7).
    static func onlyIfCached() -> GatewayError {
        GatewayError(
            status: .gatewayTimeout, detail: "The request asks for a cached answer only, and none is stored.",
            origin: .client)
    }

    /// A `Range` no byte of the stored response falls in.
    static func rangeNotSatisfiable(length: Int) -> GatewayError {
        GatewayError(
            status: .rangeNotSatisfiable,
            detail: "The range asked for is not within the \(length) bytes of the answer.",
            origin: .client, headers: [("Content-Range", "bytes */\(length)")])
    }

    static func requestTimeout() -> GatewayError {
        GatewayError(
            status: .requestTimeout, detail: "The request head did not arrive in time.", origin: .client,
            closeConnection: true)
    }
}

/// Renders ``GatewayError`` as `application/problem+json`.
enum ProblemResponse {
    static func body(for error: GatewayError, requestID: String) -> String {
        var json = "{\"type\":\"about:blank\",\"title\":"
        JSONText.appendString(error.status.reasonPhrase, to: &json)
        json += ",\"status\":\(error.status.code),\"detail\":"
        JSONText.appendString(error.detail, to: &json)
        json += ",\"request_id\":"
        JSONText.appendString(requestID, to: &json)
        json += "}"
        return json
    }

    static func head(for error: GatewayError, requestID: String, bodyLength: Int, version: HTTPVersion)
        -> HTTPResponseHead
    {
        var headers = HTTPHeaders()
        headers.reserveCapacity(6 + error.headers.count)
        headers.add(name: "Content-Type", value: "application/problem+json")
        headers.add(name: "Content-Length", value: String(bodyLength))
        headers.add(name: "X-Request-ID", value: requestID)
        for (name, value) in error.headers { headers.add(name: name, value: value) }
        if error.closeConnection { headers.add(name: "Connection", value: "close") }
        return HTTPResponseHead(version: version, status: error.status, headers: headers)
    }

    /// A complete HTTP/1.1 answer as raw bytes, for the few places that sit below the HTTP codec.
    static func raw(for error: GatewayError, requestID: String) -> String {
        let body = body(for: error, requestID: requestID)
        var text = "HTTP/1.1 \(error.status.code) \(error.status.reasonPhrase)\r\n"
        text += "Content-Type: application/problem+json\r\nContent-Length: \(body.utf8.count)\r\n"
        text += "X-Request-ID: \(requestID)\r\nConnection: close\r\n\r\n"
        return text + body
    }
}

/// Minimal JSON string escaping for hand-built JSON on hot paths.
enum JSONText {
    static func appendString(_ value: String, to out: inout String) {
        out.append("\"")
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out.append("\\\"")
            case "\\": out.append("\\\\")
            case "\n": out.append("\\n")
            case "\r": out.append("\\r")
            case "\t": out.append("\\t")
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out.append("\\u" + String(repeating: "0", count: 4 - hex.count) + hex)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out.append("\"")
    }
}
