/// Turns a request path into the one form routes are matched against.
///
/// Percent-encoded unreserved characters are decoded (`%7E` -> `~`, `%2e` -> `.`), other escapes are kept with
/// upper-case hex (so `%2F` never becomes a separator), duplicate slashes are folded and dot-segments removed.
/// `/v1/../admin`, `/v1/%2e%2e/admin` and `//admin` all become `/admin`. A segment whose encoded slashes
/// would make a dot-segment for an upstream that decodes them (`..%2F..%2Fadmin`, `..%5Cadmin`) is refused, and
/// so is a dot-segment with path parameters (`..;/`, `.;x/`), which servlet containers read as `..` and `.`.
enum PathNormalizer {
    /// The normalised path, or nil when the path is malformed (not starting with `/`, or a bad escape).
    static func normalize(_ raw: Substring) -> String? {
        let bytes = Array(raw.utf8)
        guard bytes.first == UInt8(ascii: "/") else { return nil }
        // Fast path: nothing to decode, no dot segment, no empty segment.
        if !bytes.contains(UInt8(ascii: "%")), !bytes.contains(UInt8(ascii: "\\")), !hasSpecialSegment(bytes) {
            return String(raw)
        }

        var segments: [[UInt8]] = []
        var current: [UInt8] = []
        var index = 1
        var endsWithSlash = false
        func closeSegment() {
            switch current {
            case [UInt8(ascii: ".")]:
                endsWithSlash = true
            case [UInt8(ascii: "."), UInt8(ascii: ".")]:
                if !segments.isEmpty { segments.removeLast() }
                endsWithSlash = true
            case []:
                endsWithSlash = true
            default:
                segments.append(current)
                endsWithSlash = false
            }
            current.removeAll(keepingCapacity: true)
        }
        while index < bytes.count {
            let byte = bytes[index]
            if byte == UInt8(ascii: "/") {
                closeSegment()
                endsWithSlash = true
                index += 1
                continue
            }
            if byte == UInt8(ascii: "%") {
                guard index + 2 < bytes.count, let high = hexValue(bytes[index + 1]),
                    let low = hexValue(bytes[index + 2])
                else { return nil }
                let decoded = high << 4 | low
                if isUnreserved(decoded) {
                    current.append(decoded)
                } else {
                    current += [UInt8(ascii: "%"), hexDigit(high), hexDigit(low)]
                }
                index += 3
                continue
            }
            current.append(byte)
            index += 1
        }
        if !current.isEmpty { closeSegment() }
        for segment in segments where hasEncodedDotSegment(segment) || isDotSegmentWithParameters(segment) {
            return nil
        }
        var out: [UInt8] = [UInt8(ascii: "/")]
        for (i, segment) in segments.enumerated() {
            if i > 0 { out.append(UInt8(ascii: "/")) }
            out += segment
        }
        if endsWithSlash, !segments.isEmpty { out.append(UInt8(ascii: "/")) }
        return String(decoding: out, as: UTF8.self)
    }

    /// True when splitting `segment` at `%2F`, `%5C` or `\` would leave a `.` or `..` piece.
    private static func hasEncodedDotSegment(_ segment: [UInt8]) -> Bool {
        guard segment.count >= 2, segment.contains(UInt8(ascii: ".")) else { return false }
        var pieces: [[UInt8]] = [[]]
        var index = 0
        var sawSeparator = false
        while index < segment.count {
            if segment[index] == UInt8(ascii: "%"), index + 2 < segment.count,
                segment[index + 1] == UInt8(ascii: "2")
                    || segment[index + 1] == UInt8(ascii: "5"),
                [UInt8(ascii: "F"), UInt8(ascii: "C")].contains(segment[index + 2])
            {
                let isSlash = segment[index + 1] == UInt8(ascii: "2") && segment[index + 2] == UInt8(ascii: "F")
                let isBackslash = segment[index + 1] == UInt8(ascii: "5") && segment[index + 2] == UInt8(ascii: "C")
                if isSlash || isBackslash {
                    pieces.append([])
                    sawSeparator = true
                    index += 3
                    continue
                }
            }
            if segment[index] == UInt8(ascii: "\\") {
                pieces.append([])
                sawSeparator = true
                index += 1
                continue
            }
            pieces[pieces.count - 1].append(segment[index])
            index += 1
        }
        return sawSeparator
            && pieces.contains {
                $0 == [UInt8(ascii: ".")] || $0 == [UInt8(ascii: "."), UInt8(ascii: ".")]
                    || isDotSegmentWithParameters($0)
            }
    }

    /// `.;...` or `..;...` (also with `;` as `%3B`): a dot-segment to a server that strips path parameters.
    private static func isDotSegmentWithParameters(_ segment: [UInt8]) -> Bool {
        var rest = segment[...]
        guard rest.first == UInt8(ascii: ".") else { return false }
        rest = rest.dropFirst()
        if rest.first == UInt8(ascii: ".") { rest = rest.dropFirst() }
        return rest.first == UInt8(ascii: ";") || rest.starts(with: Array("%3B".utf8))
    }

    private static func hasSpecialSegment(_ bytes: [UInt8]) -> Bool {
        var previous = UInt8(ascii: "/")
        var index = 1
        while index < bytes.count {
            let byte = bytes[index]
            if byte == UInt8(ascii: "/"), previous == UInt8(ascii: "/") { return true }
            if byte == UInt8(ascii: "."), previous == UInt8(ascii: "/") {
                let next = index + 1 < bytes.count ? bytes[index + 1] : UInt8(ascii: "/")
                if next == UInt8(ascii: "/") || next == UInt8(ascii: ";") { return true }
                if next == UInt8(ascii: ".") {
                    let after = index + 2 < bytes.count ? bytes[index + 2] : UInt8(ascii: "/")
                    if after == UInt8(ascii: "/") || after == UInt8(ascii: ";") { return true }
                }
            }
            previous = byte
            index += 1
        }
        return false
    }

    private static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    private static func hexDigit(_ value: UInt8) -> UInt8 {
        value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "A") + value - 10
    }
}
