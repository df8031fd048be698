import Crypto
import GatehouseConfig
import NIOHTTP1

/// The credentials a request carries, read as SPEC §2 `auth` says: an API key from the configured header,
/// `Authorization: Bearer <key>` or (when configured) the query parameter; a JWT from `Authorization: Bearer`.
struct Credentials {
    var apiKey: String?
    var jwt: String?

    var isEmpty: Bool { apiKey == nil && jwt == nil }

    init(headers: HTTPHeaders, query: Substring?, config: APIKeyAuthConfig) {
        if let bearer = headers.first(name: "Authorization").flatMap(Self.bearerToken) {
            // A JWT is three base64url parts; anything else sent as a bearer token is an API key.
            if bearer.utf8.lazy.filter({ $0 == UInt8(ascii: ".") }).count == 2 {
                jwt = bearer
            } else {
                apiKey = bearer
            }
        }
        if let key = headers.first(name: config.header), !key.isEmpty { apiKey = key }
        if apiKey == nil, let parameter = config.queryParam, let query {
            for pair in query.split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                if parts.first == Substring(parameter), parts.count == 2 {
                    apiKey = String(parts[1]).removingPercentEncoding ?? String(parts[1])
                }
            }
        }
    }

    /// The token of `Bearer <token>` (scheme case-insensitive), or nil.
    static func bearerToken(_ value: String) -> String? {
        guard value.count > 7, value.prefix(7).lowercased() == "bearer " else { return nil }
        let token = value.dropFirst(7).trimmingCharacters(in: .whitespaces)
        return token.isEmpty ? nil : token
    }
}

/// An API key's SHA-256 digest: what is stored and compared, never the key.
struct KeyDigest: Hashable, Sendable {
    let bytes: [UInt8]

    init(key: String) {
        bytes = Array(SHA256.hash(data: Array(key.utf8)))
    }

    /// From `sha256:<hex>` or bare hex; nil when not 32 bytes of hex.
    init?(text: String) {
        let hex = text.hasPrefix("sha256:") ? text.dropFirst(7) : Substring(text)
        guard hex.utf8.count == 64 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(32)
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        self.bytes = bytes
    }

    var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(64)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Compares every byte, whatever differs first.
    func constantTimeEquals(_ other: KeyDigest) -> Bool {
        guard bytes.count == other.bytes.count else { return false }
        var difference: UInt8 = 0
        for (a, b) in zip(bytes, other.bytes) { difference |= a ^ b }
        return difference == 0
    }
}

/// The API keys of `consumers[].api_keys`: looked up by the first bytes of the digest, then compared whole in
/// constant time.
struct ConfigKeyTable: Sendable {
    private var buckets: [UInt64: [(digest: KeyDigest, consumer: String)]] = [:]

    init(_ consumers: [ConsumerConfig]) {
        for consumer in consumers {
            for text in consumer.apiKeys {
                guard let digest = KeyDigest(text: text) else { continue }
                buckets[Self.bucket(digest), default: []].append((digest, consumer.id))
            }
        }
    }

    var isEmpty: Bool { buckets.isEmpty }

    func consumer(for digest: KeyDigest) -> String? {
        var found: String?
        for candidate in buckets[Self.bucket(digest)] ?? [] where candidate.digest.constantTimeEquals(digest) {
            found = candidate.consumer
        }
        return found
    }

    private static func bucket(_ digest: KeyDigest) -> UInt64 {
        digest.bytes.prefix(8).reduce(0) { $0 << 8 | UInt64($1) }
    }
}
