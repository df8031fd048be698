import CoreFoundation
import Foundation

/// The `Cache-Control` directives the cache acts on (RFC 9111 §5.2), from every value of the header.
///
/// Qualified forms (`private="Set-Cookie"`, `no-cache="X"`) are read as their unqualified, stricter meaning.
struct CacheControl: Equatable {
    var noStore = false
    var noCache = false
    var isPrivate = false
    var isPublic = false
    var mustRevalidate = false
    var maxAge: Int64?
    var sharedMaxAge: Int64?
    var staleWhileRevalidate: Int64?
    var staleIfError: Int64?

    init() {}

    init(_ values: some Sequence<String>) {
        for value in values {
            for item in value.split(separator: ",") {
                let parts = item.split(separator: "=", maxSplits: 1)
                let name = (parts.first ?? "").trimmedSpaces.lowercased()
                let argument = parts.count > 1 ? Self.seconds(parts[1]) : nil
                switch name {
                case "no-store": noStore = true
                case "no-cache": noCache = true
                case "private": isPrivate = true
                case "public": isPublic = true
                case "must-revalidate", "proxy-revalidate": mustRevalidate = true
                // A malformed delta-seconds makes the response stale (RFC 9111 §4.2.1).
                case "max-age": maxAge = argument ?? 0
                case "s-maxage": sharedMaxAge = argument ?? 0
                case "stale-while-revalidate": staleWhileRevalidate = argument
                case "stale-if-error": staleIfError = argument
                default: break
                }
            }
        }
    }

    /// A delta-seconds argument, quoted or not; nil when malformed.
    private static func seconds(_ text: Substring) -> Int64? {
        var digits = text.trimmedSpaces
        if digits.hasPrefix("\""), digits.hasSuffix("\""), digits.count >= 2 { digits = digits.dropFirst().dropLast() }
        return deltaSeconds(digits)
    }

    /// Decimal seconds, digits only; values beyond 2^31 are capped to it, as RFC 9111 §1.2.2 asks.
    static func deltaSeconds(_ text: Substring) -> Int64? {
        guard !text.isEmpty, text.allSatisfy(\.isASCIIDigit) else { return nil }
        let significant = text.drop { $0 == "0" }
        guard significant.count <= 10, let value = Int64(significant.isEmpty ? "0" : significant) else {
            return maxDeltaSeconds
        }
        return min(value, maxDeltaSeconds)
    }

    static let maxDeltaSeconds: Int64 = 1 << 31
}

extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}

/// HTTP dates (RFC 9110 §5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime forms, as Unix seconds.
enum HTTPDate {
    private static let months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]

    static func parse(_ text: String) -> Int64? {
        // Tokens of the three forms: "Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
        // "Sun Nov  6 08:49:37 1994".
        let tokens = text.split(whereSeparator: { $0 == " " || $0 == "," || $0 == "-" }).map { $0.lowercased() }
        guard tokens.count >= 5 else { return nil }
        var day: Int?
        var month: Int?
        var year: Int?
        var clock: [Int]?
        for token in tokens.dropFirst() {
            if token.contains(":") {
                let parts = token.split(separator: ":").compactMap { Int($0) }
                if parts.count == 3 { clock = parts }
            } else if let index = months.firstIndex(of: String(token.prefix(3))), token.count == 3 {
                month = index + 1
            } else if let number = Int(token) {
                if day == nil, token.count <= 2 {
                    day = number
                } else {
                    year = token.count == 2 ? (number < 70 ? 2000 + number : 1900 + number) : number
                }
            }
        }
        guard let day, let month, let year, let clock, (1...31).contains(day), (1900...9999).contains(year),
            clock[0] < 24, clock[1] < 60, clock[2] < 61
        else { return nil }
        var fields = tm()
        (fields.tm_year, fields.tm_mon, fields.tm_mday) = (Int32(year - 1900), Int32(month - 1), Int32(day))
        (fields.tm_hour, fields.tm_min, fields.tm_sec) = (Int32(clock[0]), Int32(clock[1]), Int32(clock[2]))
        return Int64(timegm(&fields))
    }

    /// Now, in Unix milliseconds (wall clock: entries are shared by instances on different machines).
    static func nowMilliseconds() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
    }
}
