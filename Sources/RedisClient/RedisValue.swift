/// One RESP2 reply.
public enum RedisValue: Sendable, Hashable {
    case simple(String)
    case error(String)
    case integer(Int64)
    /// A bulk string; nil is RESP's null bulk string.
    case bulk([UInt8]?)
    /// An array; nil is RESP's null array.
    case array([RedisValue]?)

    /// The value as text, for simple and bulk strings.
    public var string: String? {
        switch self {
        case .simple(let text): return text
        case .bulk(let bytes?): return String(decoding: bytes, as: UTF8.self)
        default: return nil
        }
    }

    public var bytes: [UInt8]? {
        switch self {
        case .bulk(let bytes): return bytes
        case .simple(let text): return Array(text.utf8)
        default: return nil
        }
    }

    public var integer: Int64? {
        if case .integer(let value) = self { return value }
        return nil
    }

    public var isNull: Bool {
        switch self {
        case .bulk(nil), .array(nil): return true
        default: return false
        }
    }
}

/// Why a Redis command failed.
public struct RedisError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// No connection is up (Redis is away or still connecting): the command was not sent.
        case unavailable
        /// The connection broke while the command was in flight.
        case connectionLost
        /// No reply within `command_timeout`.
        case timeout
        /// Too many commands are queued; the command was not sent.
        case overloaded
        /// Redis answered with an error reply.
        case server
        /// The reply could not be parsed.
        case protocolError
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { "\(kind): \(message)" }
}
