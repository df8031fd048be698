import NIOCore
import UpstreamClient

/// One stored response: what is needed to answer from it and to judge its freshness, in a compact binary form.
///
/// Times are wall-clock Unix milliseconds, because every gateway instance reads the same entries.
struct CacheEntry: Sendable {
    var status: Int
    /// End-to-end headers as the upstream gave them (targeted fields included), without Content-Length, Age and the
    /// per-request ones.
    var headers: [(name: String, value: String)]
    var body: ByteBuffer
    /// When the response was received (`response_time`, RFC 9111 §4.2.3).
    var responseTime: Int64
    /// `corrected_initial_age` in milliseconds.
    var initialAge: Int64
    var freshness: Freshness
    /// The request headers named by the response's `Vary`, with the values this response was chosen for.
    var vary: [(name: String, value: String)]

    /// How long an entry may be used and what may be done with it once stale, all in milliseconds.
    struct Freshness: Sendable, Equatable {
        var lifetime: Int64
        var staleWhileRevalidate: Int64
        var staleIfError: Int64
        /// `no-cache`: validate before every use.
        var noCache: Bool
        /// `must-revalidate`/`proxy-revalidate`: never used stale.
        var mustRevalidate: Bool
        /// `s-maxage`, which carries proxy-revalidate (RFC 9111 §5.2.2.10): a client's `max-stale` does not reach
        /// past freshness; the origin's own `stale-*` windows still apply.
        var sharedMaxAge = false
    }

    /// The age now, in milliseconds (RFC 9111 §4.2.3 `current_age`).
    func age(now: Int64) -> Int64 {
        let resident = now.subtractingReportingOverflow(responseTime)
        let sum = initialAge.addingReportingOverflow(resident.overflow ? 0 : max(0, resident.partialValue))
        return sum.overflow ? Int64.max / 2 : sum.partialValue
    }

    /// Milliseconds of freshness left; negative once stale.
    func freshnessLeft(now: Int64) -> Int64 {
        let left = freshness.lifetime.subtractingReportingOverflow(age(now: now))
        return left.overflow ? Int64.min / 2 : left.partialValue
    }

    func header(_ name: String) -> String? {
        headers.first { $0.name.caseInsensitiveEquals(name) }?.value
    }

    var etag: String? { header("ETag") }
    var lastModified: String? { header("Last-Modified") }
    var hasValidator: Bool { etag != nil || lastModified != nil }

    /// How long the store should keep the entry: while fresh, while it may be served stale, and, when it can be
    /// revalidated, as long again (at least the route's `ttl` and ``validationMilliseconds``) so a 304 can refresh
    /// it instead of a full download.
    func storageMilliseconds(now: Int64, routeTTL: Int64) -> Int64 {
        let left = max(0, freshnessLeft(now: now))
        let staleUse = freshness.mustRevalidate ? 0 : max(freshness.staleWhileRevalidate, freshness.staleIfError)
        let keepForValidation = hasValidator ? max(freshness.lifetime, routeTTL, Self.validationMilliseconds) : 0
        return max(1000, left + max(staleUse, keepForValidation))
    }

    /// The least time a stale entry with a validator is kept for revalidation (10 minutes, like nginx's
    /// `inactive`): a resource that changes rarely but is fresh only briefly is then revalidated, not refetched.
    static let validationMilliseconds: Int64 = 600_000

    // MARK: encoding

    static let entryTag: UInt8 = 0x45  // "E"
    /// The largest time a decoded entry may carry, in milliseconds (2^46: about 2,200 years).
    static let maxMilliseconds: Int64 = 1 << 46
    static let version: UInt8 = 1

    func encoded() -> [UInt8] {
        var out = ByteBuffer()
        out.reserveCapacity(body.readableBytes + 64 + headers.count * 32)
        out.writeInteger(Self.entryTag)
        out.writeInteger(Self.version)
        out.writeInteger(UInt16(clamping: status))
        out.writeInteger(responseTime)
        out.writeInteger(initialAge)
        out.writeInteger(freshness.lifetime)
        out.writeInteger(freshness.staleWhileRevalidate)
        out.writeInteger(freshness.staleIfError)
        out.writeInteger(
            UInt8((freshness.noCache ? 1 : 0) | (freshness.mustRevalidate ? 2 : 0) | (freshness.sharedMaxAge ? 4 : 0)))
        Self.write(headers, to: &out)
        Self.write(vary, to: &out)
        var body = body
        out.writeBuffer(&body)
        return Array(out.readableBytesView)
    }

    /// Decodes an entry; nil for anything else (a Vary marker, another version, damage).
    static func decode(_ bytes: [UInt8]) -> CacheEntry? {
        var input = ByteBuffer(bytes: bytes)
        guard input.readInteger(as: UInt8.self) == entryTag, input.readInteger(as: UInt8.self) == version,
            let status = input.readInteger(as: UInt16.self),
            let responseTime = input.readInteger(as: Int64.self),
            let initialAge = input.readInteger(as: Int64.self),
            let lifetime = input.readInteger(as: Int64.self),
            let swr = input.readInteger(as: Int64.self),
            let sie = input.readInteger(as: Int64.self),
            let flags = input.readInteger(as: UInt8.self),
            let headers = read(from: &input),
            let vary = read(from: &input),
            // What Redis hands back is checked like any input: numbers past ~2,000 years would overflow the
            // arithmetic on them.
            [responseTime, initialAge, lifetime, swr, sie].allSatisfy({ (0...Self.maxMilliseconds).contains($0) })
        else { return nil }
        return CacheEntry(
            status: Int(status), headers: headers, body: input, responseTime: responseTime, initialAge: initialAge,
            freshness: Freshness(
                lifetime: lifetime, staleWhileRevalidate: swr, staleIfError: sie, noCache: flags & 1 != 0,
                mustRevalidate: flags & 2 != 0, sharedMaxAge: flags & 4 != 0),
            vary: vary)
    }

    private static func write(_ pairs: [(name: String, value: String)], to out: inout ByteBuffer) {
        out.writeInteger(UInt16(clamping: pairs.count))
        for (name, value) in pairs.prefix(Int(UInt16.max)) {
            out.writeInteger(UInt32(name.utf8.count))
            out.writeString(name)
            out.writeInteger(UInt32(value.utf8.count))
            out.writeString(value)
        }
    }

    private static func read(from input: inout ByteBuffer) -> [(name: String, value: String)]? {
        guard let count = input.readInteger(as: UInt16.self) else { return nil }
        var pairs: [(name: String, value: String)] = []
        pairs.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let nameLength = input.readInteger(as: UInt32.self),
                let name = input.readString(length: Int(nameLength)),
                let valueLength = input.readInteger(as: UInt32.self),
                let value = input.readString(length: Int(valueLength))
            else { return nil }
            pairs.append((name, value))
        }
        return pairs
    }
}

/// Stored at a resource's base key when its responses vary: the request headers that pick the variant.
enum VaryMarker {
    static let tag: UInt8 = 0x56  // "V"

    static func encoded(_ names: [String]) -> [UInt8] { [tag] + Array(names.joined(separator: ",").utf8) }

    static func decode(_ bytes: [UInt8]) -> [String]? {
        guard bytes.first == tag else { return nil }
        return String(decoding: bytes.dropFirst(), as: UTF8.self).split(separator: ",").map(String.init)
    }
}
