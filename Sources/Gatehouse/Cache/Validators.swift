/// An entity tag (RFC 9110 §8.8.3) as a field carries it: `"xyz"` or `W/"xyz"`.
///
/// An unquoted tag (`xyz`, invalid but common) is read as `"xyz"`, so that it matches itself either way.
struct EntityTag: Equatable {
    var isWeak: Bool
    /// The opaque part, without its quotes.
    var opaque: Substring

    init(_ text: Substring) {
        var text = text.trimmedSpaces
        isWeak = text.hasPrefix("W/")
        if isWeak { text = text.dropFirst(2) }
        if text.count >= 2, text.hasPrefix("\""), text.hasSuffix("\"") { text = text.dropFirst().dropLast() }
        opaque = text
    }

    /// Weak comparison: the opaque parts match, whatever their weakness (If-None-Match, 304 updates).
    func weaklyMatches(_ other: EntityTag) -> Bool { opaque == other.opaque }

    /// Strong comparison: both strong and the same (If-Range, If-Match).
    func stronglyMatches(_ other: EntityTag) -> Bool { !isWeak && !other.isWeak && opaque == other.opaque }

    /// The tags of an `If-None-Match` or `If-Match` line; nil for `*`. Commas inside a quoted tag do not separate.
    static func list(_ value: String) -> [EntityTag]? {
        let members = CacheControl.members(of: value)
        if members.count == 1, members[0] == "*" { return nil }
        return members.map(EntityTag.init)
    }
}

/// A `Range` request a stored complete response can answer (RFC 9110 §14.2): one range of bytes. Several ranges,
/// other units and malformed values are not served as ranges (the whole response is, as RFC 9110 allows).
enum ByteRange: Equatable {
    /// `bytes=first-last` (`last` nil: to the end).
    case from(Int, to: Int?)
    /// `bytes=-length`: the last `length` bytes.
    case suffix(Int)

    init?(_ value: String) {
        let value = value.trimmedSpaces
        guard value.lowercased().hasPrefix("bytes=") else { return nil }
        let spec = value.dropFirst(6).trimmedSpaces
        guard !spec.contains(","), let dash = spec.firstIndex(of: "-") else { return nil }
        let first = spec[..<dash].trimmedSpaces
        let last = spec[spec.index(after: dash)...].trimmedSpaces
        func number(_ text: Substring) -> Int? {
            guard !text.isEmpty, text.count <= 18, text.allSatisfy(\.isASCIIDigit) else { return nil }
            return Int(text)
        }
        if first.isEmpty {
            guard let length = number(last) else { return nil }
            self = .suffix(length)
        } else {
            guard let start = number(first) else { return nil }
            if last.isEmpty {
                self = .from(start, to: nil)
            } else {
                guard let end = number(last), end >= start else { return nil }
                self = .from(start, to: end)
            }
        }
    }

    /// The bytes this range selects in a body of `length` bytes; nil when it is unsatisfiable (416).
    func bounds(length: Int) -> ClosedRange<Int>? {
        switch self {
        case .from(let start, let end):
            guard start < length else { return nil }
            return start...min(end ?? length - 1, length - 1)
        case .suffix(let count):
            guard count > 0, length > 0 else { return nil }
            return max(0, length - count)...(length - 1)
        }
    }
}
