import Crypto
import Foundation
import GatehouseConfig
import NIOHTTP1

/// The credentials a request carries, read as SPEC §2 `auth` says: an API key from the configured header,
/// `Authorization: Bearer <key>` or (when configured) the query parameter; a JWT from `Authorization: Bearer`.
struct Credentials {
    var apiKey: String?
    var jwt: String?
    /// The API key came in `Authorization: Bearer`.
    var apiKeyInAuthorization = false

    var isEmpty: Bool { apiKey == nil && jwt == nil }

    init(headers: HTTPHeaders, query: Substring?, config: APIKeyAuthConfig) {
        if let bearer = headers.first(name: "Authorization").flatMap(Self.bearerToken) {
            // A JWT is three base64url parts; anything else sent as a bearer token is an API key.
            var dots = 0
            for byte in bearer.utf8 where byte == UInt8(ascii: ".") { dots += 1 }
            if dots == 2 {
                jwt = bearer
            } else {
                apiKey = bearer
                apiKeyInAuthorization = true
            }
        }
        if let key = headers.first(name: config.header), !key.isEmpty {
            apiKey = key
            apiKeyInAuthorization = false
        }
        if apiKey == nil, let parameter = config.queryParam, let query {
            for pair in query.split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                if parts.first == Substring(parameter), parts.count == 2 {
                    apiKey = String(parts[1]).removingPercentEncoding ?? String(parts[1])
                }
            }
        }
    }

    /// The token of `Bearer <token>` (scheme case-insensitive), or nil. Works on the UTF-8 bytes: tokens are long
    /// and this runs for every request.
    static func bearerToken(_ value: String) -> String? {
        let bytes = value.utf8
        var index = bytes.startIndex
        for expected in "bearer ".utf8 {
            guard index < bytes.endIndex, bytes[index] | 0x20 == expected | 0x20 else { return nil }
            index = bytes.index(after: index)
        }
        var end = bytes.endIndex
        while index < end, bytes[index] == UInt8(ascii: " ") || bytes[index] == UInt8(ascii: "\t") {
            index = bytes.index(after: index)
        }
        while end > index {
            let last = bytes.index(before: end)
            guard bytes[last] == UInt8(ascii: " ") || bytes[last] == UInt8(ascii: "\t") else { break }
            end = last
        }
        guard index < end else { return nil }
        return String(value[index..<end])
    }
}

/// Who a request's credentials proved the caller to be: a configured consumer, or a JWT subject that is its own
/// identity under its issuer (`maps_to_consumers: false`), which never becomes a consumer of the same name.
struct Caller: Sendable, Hashable {
    /// The consumer's id or the token's subject: `X-Consumer-ID` upstream.
    let id: String
    /// The issuer of a subject that is its own identity (`X-Consumer-Issuer` upstream); nil for a consumer.
    let issuer: String?

    static func consumer(_ id: String) -> Caller { Caller(id: id, issuer: nil) }

    /// What keys this caller's own state (cache entries, limit buckets, pauses). A subject's key holds its issuer
    /// and a space, which no consumer id has, so the two can never meet.
    var key: String { issuer.map { "jwt " + $0 + " " + id } ?? id }
}

/// Consumer ids, as passed upstream in `X-Consumer-ID`: 1 to 128 letters, digits and `._:@-` (a JWT claim that is
/// anything else is refused, so no header can be smuggled through it).
enum ConsumerID {
    static func isValid(_ id: String) -> Bool {
        (1...128).contains(id.utf8.count)
            && id.utf8.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"):
                    true
                default: "._:@-".utf8.contains(byte)
                }
            }
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
        let hex = Array((text.hasPrefix("sha256:") ? text.dropFirst(7) : Substring(text)).utf8)
        guard hex.count == 64 else { return nil }
        func value(_ digit: UInt8) -> UInt8? {
            switch digit {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(32)
        for pair in stride(from: 0, to: 64, by: 2) {
            guard let high = value(hex[pair]), let low = value(hex[pair + 1]) else { return nil }
            bytes.append(high << 4 | low)
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
