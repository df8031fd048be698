import CoreFoundation
import Foundation
import RawStructuredFieldValues

/// Cache directives (RFC 9111 §5.2) from every value of `Cache-Control`, a request's or a response's, or from an
/// RFC 9213 targeted field such as `CDN-Cache-Control`.
///
/// Qualified forms (`private="Set-Cookie"`, `no-cache="X"`) are read as their unqualified, stricter meaning. A
/// malformed or repeated-and-conflicting `max-age` or `s-maxage` (`max-age = 5`, `max-age=5a`, `max-age=1.5`,
/// two different values) reads as 0: the response is stale (RFC 9111 §4.2.1, §5.2).
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
    /// Request only: stale answers are acceptable up to this many seconds (``maxDeltaSeconds`` when unbounded).
    var maxStale: Int64?
    /// Request only: the answer must stay fresh for at least this many seconds more.
    var minFresh: Int64?
    /// Request only: answer from the cache or with 504.
    var onlyIfCached = false
    /// `must-understand`: stored only when the status is understood, and then despite `no-store`.
    var mustUnderstand = false

    init() {}

    init(_ values: some Sequence<String>) {
        for value in values {
            for item in Self.members(of: value) {
                let name: Substring
                var argument: Substring?
                if let equals = item.firstIndex(of: "=") {
                    name = item[..<equals]
                    argument = item[item.index(after: equals)...]
                } else {
                    name = item
                }
                // No whitespace may surround "=" (RFC 9110 §5.6.2's token "=" token / quoted-string).
                let spaced = name.last == " " || name.last == "\t" || argument?.first == " " || argument?.first == "\t"
                let seconds = spaced ? nil : argument.flatMap(Self.seconds)
                apply(name.trimmedSpaces.lowercased(), seconds: seconds, hasArgument: argument != nil)
            }
        }
    }

    /// An RFC 9213 targeted field's value, a Structured Fields dictionary; nil when it does not parse or is empty,
    /// so that `Cache-Control` applies instead. A directive with a value of another type than it takes reads as its
    /// stricter meaning: `private="Set-Cookie"` as `private`, `max-age=1.5` as stale; `?0` turns a directive off.
    init?(targeted value: String) {
        var parser = StructuredFieldValueParser(Array(value.utf8))
        guard let dictionary = try? parser.parseDictionaryFieldValue(), !dictionary.isEmpty else { return nil }
        for (name, member) in dictionary {
            guard case .item(let item) = member else {
                apply(name, seconds: nil, hasArgument: true)
                continue
            }
            switch item.rfc9651BareItem {
            case .bool(false): continue
            case .bool(true): apply(name, seconds: nil, hasArgument: false)
            case .integer(let value) where value >= 0:
                apply(name, seconds: min(value, Self.maxDeltaSeconds), hasArgument: true)
            default: apply(name, seconds: nil, hasArgument: true)
            }
        }
    }

    private mutating func apply(_ name: String, seconds: Int64?, hasArgument: Bool) {
        switch name {
        case "no-store": noStore = true
        case "no-cache": noCache = true
        case "private": isPrivate = true
        case "public": isPublic = true
        case "must-revalidate", "proxy-revalidate": mustRevalidate = true
        case "only-if-cached": onlyIfCached = true
        case "must-understand": mustUnderstand = true
        case "max-age": maxAge = Self.merged(maxAge, seconds ?? 0)
        case "s-maxage": sharedMaxAge = Self.merged(sharedMaxAge, seconds ?? 0)
        case "stale-while-revalidate": staleWhileRevalidate = seconds
        case "stale-if-error": staleIfError = seconds
        // Without an argument, any staleness is acceptable.
        case "max-stale": maxStale = hasArgument ? seconds : Self.maxDeltaSeconds
        case "min-fresh": minFresh = seconds
        default: break
        }
    }

    /// A freshness directive seen twice: both values when they agree, else 0 (stale).
    private static func merged(_ earlier: Int64?, _ value: Int64) -> Int64 {
        guard let earlier else { return value }
        return earlier == value ? value : 0
    }

    /// The comma-separated members of a field value, trimmed; commas inside quoted strings do not separate.
    static func members(of value: String) -> [Substring] {
        var members: [Substring] = []
        var start = value.startIndex
        var quoted = false
        var escaped = false
        var index = value.startIndex
        while index < value.endIndex {
            let character = value[index]
            if escaped {
                escaped = false
            } else if quoted, character == "\\" {
                escaped = true
            } else if character == "\"" {
                quoted.toggle()
            } else if character == ",", !quoted {
                members.append(value[start..<index])
                start = value.index(after: index)
            }
            index = value.index(after: index)
        }
        members.append(value[start...])
        // A quote that is never closed: split at every comma, so that no directive hides inside it.
        if quoted { members = value.split(separator: ",", omittingEmptySubsequences: false) }
        return members.map(\.trimmedSpaces).filter { !$0.isEmpty }
    }

    /// A delta-seconds argument, quoted or not; nil when malformed.
    private static func seconds(_ text: Substring) -> Int64? {
        var digits = text
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

    /// A response's `Age` in seconds (RFC 9111 §5.1): the first member of the first line (`Age: 50, 70` is 50);
    /// nil (ignored) when that is not a non-negative integer (`50.0`, `50;x=1`, `50a`).
    static func age(_ lines: [String]) -> Int64? {
        guard let first = lines.first else { return nil }
        let member = first.split(separator: ",", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        return deltaSeconds(member.trimmedSpaces)
    }
}

extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}

/// HTTP dates (RFC 9110 §5.6.7) as Unix seconds: exactly IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or the
/// obsolete RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`) forms. Anything
/// else (a one-digit hour, a two-digit year in IMF-fixdate, another zone, missing or extra spaces) is invalid:
/// an `Expires` that does not parse means already expired (RFC 9111 §5.3).
enum HTTPDate {
    private static let months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    private static let shortDays = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    private static let longDays = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]

    /// Names are compared without regard to case (`THU`, `aug`, `gmt`), as lenient caches do; the layout is strict.
    static func parse(_ text: String) -> Int64? {
        let lowered = text.lowercased()
        let text = lowered.trimmedSpaces
        // IMF-fixdate and RFC 850 differ by the day name's length before the comma.
        if let comma = text.firstIndex(of: ",") {
            let day = String(text[..<comma])
            let rest = text[text.index(after: comma)...]
            if shortDays.contains(day) {
                // " 06 Nov 1994 08:49:37 GMT"
                let parts = rest.split(separator: " ", omittingEmptySubsequences: false)
                guard rest.utf8.count == 25, parts.count == 6, parts[0].isEmpty, parts[5] == "gmt",
                    parts[3].count == 4
                else { return nil }
                return make(day: parts[1], month: parts[2], year: Int(parts[3]), clock: parts[4])
            }
            if longDays.contains(day) {
                // " 06-Nov-94 08:49:37 GMT"
                let parts = rest.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 4, parts[0].isEmpty, parts[3] == "gmt" else { return nil }
                let date = parts[1].split(separator: "-", omittingEmptySubsequences: false)
                guard date.count == 3, date[2].count == 2, date[2].allSatisfy(\.isASCIIDigit), let short = Int(date[2])
                else { return nil }
                // A two-digit year more than 50 years ahead is in the past century (RFC 9110 §5.6.7).
                let thisYear = Calendar(identifier: .gregorian).component(.year, from: Date())
                var year = thisYear / 100 * 100 + short
                if year > thisYear + 50 { year -= 100 }
                return make(day: date[0], month: date[1], year: year, clock: parts[2])
            }
            return nil
        }
        // asctime: "Sun Nov  6 08:49:37 1994", a one-digit day padded with a space.
        let parts = text.split(separator: " ", omittingEmptySubsequences: false)
        let padded = parts.count == 6 && parts[2].isEmpty && parts[3].count == 1
        let fields: [Substring] = padded ? [parts[0], parts[1], Substring("0" + parts[3]), parts[4], parts[5]] : parts
        guard fields.count == 5, shortDays.contains(String(fields[0])), fields[4].count == 4,
            padded || fields[2].count == 2
        else { return nil }
        return make(day: fields[2], month: fields[1], year: Int(fields[4]), clock: fields[3])
    }

    /// Builds the time from two-digit day, month name, year and `HH:MM:SS`.
    private static func make(day: Substring, month: Substring, year: Int?, clock: Substring) -> Int64? {
        let time = clock.split(separator: ":", omittingEmptySubsequences: false)
        guard day.count == 2, day.allSatisfy(\.isASCIIDigit), let day = Int(day),
            let month = months.firstIndex(of: String(month)), let year, (1900...9999).contains(year),
            time.count == 3, time.allSatisfy({ $0.count == 2 && $0.allSatisfy(\.isASCIIDigit) }),
            let hour = Int(time[0]), let minute = Int(time[1]), let second = Int(time[2]),
            (1...31).contains(day), hour < 24, minute < 60, second < 61
        else { return nil }
        var fields = tm()
        (fields.tm_year, fields.tm_mon, fields.tm_mday) = (Int32(year - 1900), Int32(month), Int32(day))
        (fields.tm_hour, fields.tm_min, fields.tm_sec) = (Int32(hour), Int32(minute), Int32(second))
        let seconds = timegm(&fields)
        // timegm moves 31 Feb to 3 Mar: a day the month does not have is not a date.
        guard fields.tm_mday == Int32(day), fields.tm_mon == Int32(month) else { return nil }
        return Int64(seconds)
    }

    /// Now, in Unix milliseconds (wall clock: entries are shared by instances on different machines).
    static func nowMilliseconds() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
    }
}
