import NIOHTTP1

/// What the corridor does differently for a gRPC call (`Content-Type: application/grpc*`, SPEC §7.1): the answers
/// the gateway makes are gRPC statuses, not problem+json; `grpc-timeout` can shorten the route's timeout; the
/// upstream is asked for trailers; nothing is cached.
enum GRPC {
    /// Whether the request is a gRPC call.
    static func isCall(_ headers: HTTPHeaders) -> Bool {
        guard let type = headers.first(name: "Content-Type") else { return false }
        let lower = type.lowercased()
        return lower == "application/grpc" || lower.hasPrefix("application/grpc+")
            || lower.hasPrefix("application/grpc;")
    }

    /// The call's `grpc-timeout` in milliseconds (at least 1), or nil when absent or malformed: up to eight digits
    /// and a unit, H M S m u n (the gRPC over HTTP/2 protocol).
    static func timeoutMilliseconds(_ headers: HTTPHeaders) -> Int? {
        guard let value = headers.first(name: "grpc-timeout"), let unit = value.utf8.last,
            (2...9).contains(value.utf8.count), let amount = Int(value.dropLast()), amount >= 0
        else { return nil }
        let milliseconds: Int
        switch unit {
        case UInt8(ascii: "H"): milliseconds = amount * 3_600_000
        case UInt8(ascii: "M"): milliseconds = amount * 60_000
        case UInt8(ascii: "S"): milliseconds = amount * 1000
        case UInt8(ascii: "m"): milliseconds = amount
        case UInt8(ascii: "u"): milliseconds = amount / 1000
        case UInt8(ascii: "n"): milliseconds = amount / 1_000_000
        default: return nil
        }
        return max(milliseconds, 1)
    }

    /// The gRPC status code for an answer the gateway makes (SPEC §7.1, else gRPC's HTTP-to-status mapping).
    static func status(for httpStatus: HTTPResponseStatus) -> Int {
        switch httpStatus.code {
        case 400: 13  // INTERNAL
        case 401: 16  // UNAUTHENTICATED
        case 403: 7  // PERMISSION_DENIED
        case 404, 405: 12  // UNIMPLEMENTED
        case 413, 429, 431: 8  // RESOURCE_EXHAUSTED
        case 502, 503: 14  // UNAVAILABLE
        case 504: 4  // DEADLINE_EXCEEDED
        default: 2  // UNKNOWN
        }
    }

    /// `grpc-message`: percent-encoded UTF-8, printable ASCII other than `%` kept as is.
    static func encodeMessage(_ message: String) -> String {
        var out = ""
        out.reserveCapacity(message.utf8.count)
        for byte in message.utf8 {
            if byte >= 0x20, byte <= 0x7E, byte != UInt8(ascii: "%") {
                out.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                let hex = String(byte, radix: 16, uppercase: true)
                out += byte < 16 ? "%0" + hex : "%" + hex
            }
        }
        return out
    }
}
