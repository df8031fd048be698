import Foundation

/// A span of time read from the config (`250ms`, `10s`, `5m`, `1h`), kept with its text.
public struct ConfigDuration: Sendable, Hashable, Encodable, CustomStringConvertible {
    /// The span in nanoseconds.
    public let nanoseconds: Int64
    /// The text the config gave, echoed by `/config` and `check`.
    public let text: String

    public init(nanoseconds: Int64, text: String) {
        self.nanoseconds = nanoseconds
        self.text = text
    }

    /// Builds a duration from whole milliseconds; its text is `<n>ms`.
    public static func milliseconds(_ ms: Int64) -> ConfigDuration {
        ConfigDuration(nanoseconds: ms * 1_000_000, text: "\(ms)ms")
    }

    /// Builds a duration from whole seconds; its text is `<n>s`.
    public static func seconds(_ s: Int64) -> ConfigDuration {
        ConfigDuration(nanoseconds: s * 1_000_000_000, text: "\(s)s")
    }

    public var milliseconds: Int64 { nanoseconds / 1_000_000 }
    public var seconds: Double { Double(nanoseconds) / 1e9 }
    public var description: String { text }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(text)
    }

    /// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h`; returns nil for anything else.
    public static func parse(_ text: String) -> ConfigDuration? {
        let units: [(String, Int64)] = [
            ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000),
        ]
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            let number = text.dropLast(suffix.count)
            // "5ms" also ends in "s": only accept a plain number before the unit.
            guard let value = Int64(number), value >= 0, value <= Int64.max / factor else { continue }
            return ConfigDuration(nanoseconds: value * factor, text: text)
        }
        return nil
    }
}

/// A byte count read from the config: an integer, or `64KiB`, `10MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1000).
public enum ConfigSize {
    /// Parses a size; returns nil for anything else.
    public static func parse(_ text: String) -> Int? {
        if let plain = Int(text), plain >= 0 { return plain }
        let units: [(String, Int)] = [
            ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30),
            ("KB", 1000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("B", 1),
        ]
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            guard let value = Int(text.dropLast(suffix.count)), value >= 0, value <= Int.max / factor else {
                return nil
            }
            return value * factor
        }
        return nil
    }
}

/// A `host:port` address to listen on. `[::1]:8080` for IPv6.
public struct ListenAddress: Sendable, Hashable, Encodable, CustomStringConvertible {
    public let host: String
    public let port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// True for 127.0.0.0/8, ::1 and `localhost`.
    public var isLoopback: Bool { host == "localhost" || host == "::1" || host.hasPrefix("127.") }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    /// Parses `host:port` or `[v6]:port`.
    public static func parse(_ text: String) -> ListenAddress? {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port) else { return nil }
        return ListenAddress(host: String(host), port: port)
    }
}

/// A secret from the config (a token, a password, a header value): usable in code, shown as `<redacted>`.
public struct Secret: Sendable, Hashable, Encodable, CustomStringConvertible {
    public let value: String

    public init(_ value: String) { self.value = value }

    public var description: String { "<redacted>" }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode("<redacted>")
    }
}

/// An IPv4 or IPv6 network in CIDR form, such as `10.0.0.0/8` or `::1/128`.
public struct CIDR: Sendable, Hashable, Encodable, CustomStringConvertible {
    /// The network address as 4 or 16 bytes.
    public let address: [UInt8]
    public let prefixLength: Int

    public var description: String { "\(IPAddressText.format(address))/\(prefixLength)" }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    /// Parses `addr/len`, or a bare address (a single host).
    public static func parse(_ text: String) -> CIDR? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let bytes = IPAddressText.parse(String(parts[0])) else { return nil }
        let maxLength = bytes.count * 8
        var length = maxLength
        if parts.count == 2 {
            guard let value = Int(parts[1]), (0...maxLength).contains(value) else { return nil }
            length = value
        }
        return CIDR(address: bytes, prefixLength: length)
    }

    /// True when `bytes` (4 or 16) lies in this network. IPv4-mapped IPv6 addresses match IPv4 networks.
    public func contains(_ bytes: [UInt8]) -> Bool {
        var candidate = bytes
        if address.count == 4, candidate.count == 16, candidate[0..<10].allSatisfy({ $0 == 0 }),
            candidate[10] == 0xff, candidate[11] == 0xff
        {
            candidate = Array(candidate[12..<16])
        }
        guard candidate.count == address.count else { return false }
        var remaining = prefixLength
        var index = 0
        while remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xff << (8 - bits))
            if candidate[index] & mask != address[index] & mask { return false }
            remaining -= bits
            index += 1
        }
        return true
    }
}

/// Text forms of IP addresses, without a dependency on the socket layer.
public enum IPAddressText {
    /// Parses dotted IPv4 (4 bytes) or IPv6 (16 bytes, `::` allowed, trailing dotted quad allowed).
    public static func parse(_ text: String) -> [UInt8]? {
        if !text.contains(":") { return parseV4(Substring(text)) }
        var head: [UInt8] = []
        var tail: [UInt8] = []
        let halves = text.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func groups(_ part: String) -> [UInt8]? {
            if part.isEmpty { return [] }
            var out: [UInt8] = []
            let pieces = part.split(separator: ":", omittingEmptySubsequences: false)
            for (i, piece) in pieces.enumerated() {
                if i == pieces.count - 1, piece.contains(".") {
                    guard let v4 = parseV4(piece) else { return nil }
                    out += v4
                } else {
                    guard (1...4).contains(piece.count), let value = UInt16(piece, radix: 16) else { return nil }
                    out += [UInt8(value >> 8), UInt8(value & 0xff)]
                }
            }
            return out
        }
        guard let first = groups(halves[0]) else { return nil }
        head = first
        if halves.count == 2 {
            guard let second = groups(halves[1]) else { return nil }
            tail = second
            guard head.count + tail.count <= 14 else { return nil }
            return head + [UInt8](repeating: 0, count: 16 - head.count - tail.count) + tail
        }
        return head.count == 16 ? head : nil
    }

    private static func parseV4(_ text: Substring) -> [UInt8]? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var out: [UInt8] = []
        for part in parts {
            guard (1...3).contains(part.count), let value = UInt8(part) else { return nil }
            out.append(value)
        }
        return out
    }

    /// Formats 4 or 16 bytes (IPv6 without `::` compression).
    public static func format(_ bytes: [UInt8]) -> String {
        if bytes.count == 4 { return bytes.map(String.init).joined(separator: ".") }
        var groups: [String] = []
        var i = 0
        while i + 1 < bytes.count {
            groups.append(String(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]), radix: 16))
            i += 2
        }
        return groups.joined(separator: ":")
    }
}
