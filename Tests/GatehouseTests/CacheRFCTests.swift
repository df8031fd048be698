import Foundation
import GatehouseConfig
import Testing

@testable import Gatehouse

/// RFC 9111 and RFC 9213 edge cases end to end: a real gateway caching in a real Redis, in front of a scripted
/// origin (`Tests/peers/cache_origin.py`) whose every answer a test writes.
@Suite struct CacheRFCTests {
    /// One answer of the scripted origin.
    struct Answer: Encodable {
        var status = 200
        var headers: [[String]] = []
        var body = ""
        var interim: [Interim] = []

        init(_ status: Int = 200, _ headers: [(String, String)] = [], body: String = "", interim: [Interim] = []) {
            self.status = status
            self.headers = headers.map { [$0.0, $0.1] }
            self.body = body
            self.interim = interim
        }
    }

    struct Interim: Encodable {
        var status: Int
        var headers: [[String]]
    }

    /// The scripted origin and the gateway in front of it.
    struct Setup {
        let h: Harness
        let originPort: Int

        /// Sets what `path` answers, in order (the last answer repeats).
        func script(_ path: String, _ answers: Answer...) async throws {
            let body = String(decoding: try JSONEncoder().encode(answers), as: UTF8.self)
            let response = try await request(port: originPort, "/_script" + path, method: "PUT", body: body)
            #expect(response.status == 200)
        }

        /// The requests `path` received, each a list of header name and value pairs with its method first.
        func received(_ path: String) async throws -> [(method: String, headers: [(String, String)])] {
            let response = try await request(port: originPort, "/_log" + path)
            let list = (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [[String: Any]] ?? []
            return list.map { item in
                let pairs = (item["headers"] as? [[String]] ?? []).map { ($0[0], $0[1]) }
                return (item["method"] as? String ?? "", pairs)
            }
        }

        /// A request through the gateway; afterwards the store write of a stored answer has landed.
        func get(_ path: String, method: String = "GET", _ headers: [(String, String)] = []) async throws
            -> RawResponse
        {
            let response = try await request(port: h.port, path, method: method, headers: headers)
            try await Task.sleep(for: .milliseconds(60))
            return response
        }
    }

    static func run(cache: String = "ttl: 30s", route: String = "", _ body: (Setup) async throws -> Void)
        async throws
    {
        try await PythonPeer.with("cache_origin.py") { origin in
            let (url, server) = try await StoreTests.sharedRedisURL()
            let prefix = "gh-rfc-\(UUID().uuidString.prefix(8)):"
            let yaml = { (port: Int) in
                Harness.config(
                    upstreamPort: port,
                    upstream: """
                          origin:
                            targets: [{ url: "http://127.0.0.1:\(origin.port)" }]
                        """, redis: url, redisKeyPrefix: prefix,
                    routes: """
                          - id: c
                            match: { path_prefix: "/" }
                            upstream: origin
                            cache: { \(cache) }
                        \(route)
                        """)
            }
            try await Harness.run(yaml) { h in
                try await waitUntil { h.gateway.readinessProblem == nil && h.gateway.core.cache.hot?.epoch != nil }
                try await body(Setup(h: h, originPort: origin.port))
            }
            _ = server
        }
    }

    static func isHit(_ response: RawResponse) -> Bool {
        response.header("Cache-Status")?.hasPrefix("gatehouse; hit") == true
    }

    /// The seconds of freshness left a hit reports (`ttl=` of `Cache-Status`); nil for anything but a hit.
    static func ttl(_ response: RawResponse) -> Int? {
        guard isHit(response), let status = response.header("Cache-Status"),
            let range = status.range(of: "ttl=")
        else { return nil }
        return Int(status[range.upperBound...].prefix { $0 == "-" || $0.isNumber })
    }

    // MARK: parsing freshness

    @Test func invalidFreshnessInformationMakesAResponseStale() async throws {
        try await Self.run { s in
            // RFC 9111 §5.3: an Expires that is not an HTTP-date means already expired, however close it comes.
            let badExpires = [
                "Sun, 06 Nov 2094 8:49:37 GMT", "Sat, 06 Nov 60 08:49:37 GMT", "Sun, 06-Nov-2094 08:49:37 GMT",
                "Sun, 06 Nov 2094  08:49:37 GMT", "Sun 06 Nov 2094 08:49:37 GMT", "Sun, 06 Nov 2094 08:49:37 UTC",
                "Sun, 06 Nov 2094 08:49:37 AEST", "0",
            ]
            var cases: [(String, [(String, String)])] = badExpires.enumerated().map { index, value in
                ("/expires/\(index)", [("Expires", value)])
            }
            // Two Expires lines, even both in the future.
            cases.append(
                (
                    "/expires/twice",
                    [("Expires", "Sun, 06 Nov 2094 08:49:37 GMT"), ("Expires", "Mon, 07 Nov 2094 08:49:37 GMT")]
                ))
            // max-age with spaces around "=", a suffix, a decimal, or two values that disagree (RFC 9111 §4.2.1).
            for (index, value) in ["max-age = 100", "max-age=100a", "max-age=1.5", "max-age=100, max-age=200"]
                .enumerated()
            {
                cases.append(("/max-age/\(index)", [("Cache-Control", value)]))
            }
            for (path, headers) in cases {
                try await s.script(path, Answer(200, headers, body: "x"))
                _ = try await s.get(path)
                let second = try await s.get(path)
                #expect(!Self.isHit(second), "\(headers) was used fresh")
                #expect(try await s.received(path).count == 2, "\(headers)")
            }
            // The valid forms are fresh: the obsolete date forms, a directive in capitals, agreeing duplicates.
            let good: [(String, String)] = [
                ("Expires", "Sun, 06 Nov 2094 08:49:37 GMT"), ("Expires", "Saturday, 06-Nov-60 08:49:37 GMT"),
                ("Expires", "Sun Nov  6 08:49:37 2094"), ("Cache-Control", "MAX-AGE=100"),
                ("Cache-Control", "max-age=100, max-age=100"),
            ]
            for (index, header) in good.enumerated() {
                try await s.script("/good/\(index)", Answer(200, [header], body: "x"))
                _ = try await s.get("/good/\(index)")
                #expect(Self.isHit(try await s.get("/good/\(index)")), "\(header) was not used")
            }
        }
    }

    @Test func ageIsItsFirstMemberWhenThatIsAnInteger() async throws {
        try await Self.run { s in
            // A list: its first member; a parameter, a suffix or a decimal: not a valid Age, ignored.
            for (path, age, expectAtLeast) in [
                ("/age/param", "50;x=1", false), ("/age/suffix", "50a", false), ("/age/float", "50.0", false),
                ("/age/list", "50, 70", true),
            ] {
                try await s.script(path, Answer(200, [("Cache-Control", "max-age=100"), ("Age", age)], body: "x"))
                _ = try await s.get(path)
                let hit = try await s.get(path)
                #expect(Self.isHit(hit))
                let value = hit.header("Age").flatMap(Int.init) ?? -1
                #expect(expectAtLeast ? (50..<60).contains(value) : (0..<5).contains(value), "Age: \(age) -> \(value)")
            }
            // Two Age lines: the first counts.
            try await s.script(
                "/age/lines", Answer(200, [("Cache-Control", "max-age=100"), ("Age", "40"), ("Age", "90")], body: "x"))
            _ = try await s.get("/age/lines")
            let value = try await s.get("/age/lines").header("Age").flatMap(Int.init) ?? -1
            #expect((40..<50).contains(value))
        }
    }

    @Test func varyMatchesValuesUpToWhitespace() async throws {
        try await Self.run { s in
            try await s.script(
                "/vary", Answer(200, [("Cache-Control", "max-age=100"), ("Vary", "Accept-Language")], body: "v"))
            _ = try await s.get("/vary", [("Accept-Language", "en,de")])
            #expect(Self.isHit(try await s.get("/vary", [("Accept-Language", "en , de")])))
            #expect(Self.isHit(try await s.get("/vary", [("Accept-Language", " en, de ")])))
            // Order is meaning: another variant.
            #expect(!Self.isHit(try await s.get("/vary", [("Accept-Language", "de, en")])))
        }
    }

    // MARK: request directives

    @Test func requestDirectivesChooseWhatTheCacheMayAnswer() async throws {
        try await Self.run { s in
            // 30 s old, fresh for 100 s: 70 s left.
            try await s.script("/r", Answer(200, [("Cache-Control", "max-age=100"), ("Age", "30")], body: "r"))
            _ = try await s.get("/r")
            #expect(Self.isHit(try await s.get("/r", [("Cache-Control", "max-age=60")])))
            #expect(!Self.isHit(try await s.get("/r", [("Cache-Control", "max-age=10")])))
            #expect(Self.isHit(try await s.get("/r", [("Cache-Control", "min-fresh=10")])))
            #expect(!Self.isHit(try await s.get("/r", [("Cache-Control", "min-fresh=90")])))
            #expect(try await s.received("/r").count == 3)

            // Stale by 20 s: max-stale decides; must-revalidate overrules it.
            try await s.script("/stale", Answer(200, [("Cache-Control", "max-age=10"), ("Age", "30")], body: "s"))
            _ = try await s.get("/stale")
            let accepted = try await s.get("/stale", [("Cache-Control", "max-stale=60")])
            #expect(accepted.header("Cache-Status")?.contains("hit; stale") == true)
            #expect(Self.isHit(try await s.get("/stale", [("Cache-Control", "max-stale")])))
            #expect(!Self.isHit(try await s.get("/stale", [("Cache-Control", "max-stale=5")])))
            try await s.script(
                "/strict", Answer(200, [("Cache-Control", "max-age=10, must-revalidate"), ("Age", "30")], body: "m"))
            _ = try await s.get("/strict")
            #expect(!Self.isHit(try await s.get("/strict", [("Cache-Control", "max-stale=60")])))

            // only-if-cached: what is stored and usable, else 504 without asking the origin.
            #expect(Self.isHit(try await s.get("/r", [("Cache-Control", "only-if-cached")])))
            let before = try await s.received("/stale").count
            let refused = try await s.get("/stale", [("Cache-Control", "only-if-cached")])
            #expect(refused.status == 504)
            #expect(refused.header("Content-Type") == "application/problem+json")
            let missing = try await s.get("/never", [("Cache-Control", "only-if-cached")])
            #expect(missing.status == 504)
            #expect(try await s.received("/stale").count == before)
            #expect(try await s.received("/never").isEmpty)

            // no-store: the answer is not stored; no-cache: the stored one is validated first.
            try await s.script("/ns", Answer(200, [("Cache-Control", "max-age=100"), ("ETag", "\"n\"")], body: "n"))
            _ = try await s.get("/ns", [("Cache-Control", "no-store")])
            #expect(!Self.isHit(try await s.get("/ns")))
            let validated = try await s.get("/ns", [("Cache-Control", "no-cache")])
            #expect(validated.status == 200)
            let asked = try await s.received("/ns")
            #expect(asked.count == 3)
            #expect(asked.last?.headers.contains { $0.0.lowercased() == "if-none-match" && $0.1 == "\"n\"" } == true)

            // s-maxage carries proxy-revalidate: no max-stale past it.
            try await s.script("/shared", Answer(200, [("Cache-Control", "s-maxage=10"), ("Age", "30")], body: "s"))
            _ = try await s.get("/shared")
            #expect(!Self.isHit(try await s.get("/shared", [("Cache-Control", "max-stale=60")])))
        }
        // With the route's stale_while_revalidate, a client's max-stale still bounds the staleness it gets.
        try await Self.run(cache: "ttl: 30s, stale_while_revalidate: 60s") { s in
            try await s.script("/swr", Answer(200, [("Cache-Control", "max-age=10"), ("Age", "30")], body: "w"))
            _ = try await s.get("/swr")
            #expect(!Self.isHit(try await s.get("/swr", [("Cache-Control", "max-stale=5")])))
            let stale = try await s.get("/swr")
            #expect(stale.header("Cache-Status")?.contains("detail=stale-while-revalidate") == true)
        }
    }

    // MARK: heuristic freshness and statuses

    @Test func heuristicFreshnessIsAShareOfTheTimeSinceLastModified() async throws {
        try await Self.run(cache: "ttl: 30s, max_ttl: 1h, last_modified_factor: 0.01") { s in
            let modified = Date().addingTimeInterval(-200)
            let formatter = DateFormatter()
            formatter.locale = Locale(identifier: "en_US_POSIX")
            formatter.timeZone = TimeZone(identifier: "GMT")
            formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
            let lastModified = formatter.string(from: modified)
            // 1% of 200 s: fresh for 2 s, then revalidated.
            try await s.script("/lm", Answer(200, [("Last-Modified", lastModified)], body: "lm"))
            _ = try await s.get("/lm")
            let hit = try await s.get("/lm")
            #expect((0...2).contains(Self.ttl(hit) ?? -1), "\(hit.headers)")
            try await Task.sleep(for: .milliseconds(2200))
            let stale = try await s.get("/lm")
            #expect(stale.header("Cache-Status")?.hasPrefix("gatehouse; fwd=stale") == true)
            #expect(
                try await s.received("/lm").last?.headers.contains {
                    $0.0 == "If-Modified-Since" && $0.1 == lastModified
                }
                    == true)
            // A year since Last-Modified: 1% is 3.6 days, capped by max_ttl (1 h).
            try await s.script(
                "/old",
                Answer(
                    200, [("Last-Modified", formatter.string(from: Date().addingTimeInterval(-31_536_000)))], body: "o")
            )
            _ = try await s.get("/old")
            let capped = try await s.get("/old")
            #expect((3590...3600).contains(Self.ttl(capped) ?? -1), "\(capped.headers)")
            // Without Last-Modified the route's ttl is the freshness.
            try await s.script("/plain", Answer(200, [], body: "p"))
            _ = try await s.get("/plain")
            #expect((25...30).contains(Self.ttl(try await s.get("/plain")) ?? -1))

            // Statuses cacheable by default may be stored heuristically; others only with explicit freshness.
            try await s.script("/404", Answer(404, [], body: "gone"))
            _ = try await s.get("/404")
            #expect(Self.isHit(try await s.get("/404")))
            for status in [303, 400, 500, 503, 299, 418] {
                try await s.script("/implicit/\(status)", Answer(status, [], body: "i"))
                _ = try await s.get("/implicit/\(status)")
                #expect(!Self.isHit(try await s.get("/implicit/\(status)")), "\(status) stored without freshness")
                try await s.script("/explicit/\(status)", Answer(status, [("Cache-Control", "max-age=100")], body: "e"))
                _ = try await s.get("/explicit/\(status)")
                let hit = try await s.get("/explicit/\(status)")
                #expect(Self.isHit(hit), "\(status) with max-age not stored")
                #expect(hit.status == status)
            }
        }
    }

    // MARK: updating stored responses

    @Test func a304ReplacesTheStoredHeaderFieldsItCarries() async throws {
        try await Self.run { s in
            try await s.script(
                "/u",
                Answer(
                    200,
                    [
                        ("Cache-Control", "max-age=1"), ("ETag", "W/\"a\""), ("Content-Type", "text/plain"),
                        ("X-Version", "1"), ("Expires", "Sun, 06 Nov 2094 08:49:37 GMT"),
                    ], body: "body"),
                Answer(
                    304,
                    [
                        ("Cache-Control", "max-age=100"), ("ETag", "W/\"a\""), ("Content-Type", "text/html"),
                        ("X-Version", "2"),
                    ]))
            _ = try await s.get("/u")
            try await Task.sleep(for: .milliseconds(1100))
            let revalidated = try await s.get("/u")
            #expect(revalidated.header("Cache-Status")?.contains("fwd-status=304") == true)
            let hit = try await s.get("/u")
            #expect(Self.isHit(hit))
            #expect(hit.text == "body")
            #expect(hit.header("Content-Type") == "text/html")
            #expect(hit.header("X-Version") == "2")
            #expect(hit.header("ETag") == "W/\"a\"")
            #expect(hit.header("Cache-Control") == "max-age=100")
            // Fields the 304 did not carry stay.
            #expect(hit.header("Expires") == "Sun, 06 Nov 2094 08:49:37 GMT")
            // The revalidation sent the stored tag, weak as it was.
            #expect(
                try await s.received("/u").last?.headers.contains { $0.0 == "If-None-Match" && $0.1 == "W/\"a\"" }
                    == true)
            // A client's conditional is compared weakly, tag by tag, commas inside tags included.
            #expect(try await s.get("/u", [("If-None-Match", "\"x\", W/\"a\"")]).status == 304)
            #expect(try await s.get("/u", [("If-None-Match", "*")]).status == 304)
            try await s.script(
                "/comma", Answer(200, [("Cache-Control", "max-age=100"), ("ETag", "\"a,b\"")], body: "c"))
            _ = try await s.get("/comma")
            #expect(try await s.get("/comma", [("If-None-Match", "\"x\", \"a,b\"")]).status == 304)
            #expect(try await s.get("/comma", [("If-None-Match", "\"a\"")]).status == 200)
            // `*` matches a stored response without an entity tag too.
            try await s.script("/untagged", Answer(200, [("Cache-Control", "max-age=100")], body: "u"))
            _ = try await s.get("/untagged")
            #expect(try await s.get("/untagged", [("If-None-Match", "*")]).status == 304)

            // A strong tag in the 304 does not select a weakly validated entry; a Set-Cookie in a 304 reaches this
            // client only.
            try await s.script(
                "/weak",
                Answer(200, [("Cache-Control", "max-age=1"), ("ETag", "W/\"b\""), ("X-Version", "1")], body: "w"),
                Answer(304, [("Cache-Control", "max-age=100"), ("ETag", "\"b\""), ("X-Version", "2")]),
                Answer(304, [("Cache-Control", "max-age=100"), ("ETag", "W/\"b\""), ("Set-Cookie", "s=1")]))
            _ = try await s.get("/weak")
            try await Task.sleep(for: .milliseconds(1100))
            #expect(try await s.get("/weak").header("X-Version") == "1")
            let cookie = try await s.get("/weak")
            #expect(cookie.header("Set-Cookie") == "s=1")
            #expect(cookie.header("Cache-Status")?.contains("fwd-status=304") == true)
            let later = try await s.get("/weak")
            #expect(Self.isHit(later) && later.header("Set-Cookie") == nil, "\(later.headers)")
        }
    }

    @Test func aHeadResponseFreshensTheStoredGet() async throws {
        try await Self.run { s in
            try await s.script(
                "/h",
                Answer(200, [("Cache-Control", "max-age=1"), ("ETag", "\"v\""), ("X-Version", "1")], body: "get body"),
                // An origin that ignores conditionals answers the HEAD with 200 and the same tag.
                Answer(
                    200, [("Cache-Control", "max-age=100"), ("ETag", "\"v\""), ("X-Version", "2")], body: "get body"))
            _ = try await s.get("/h")
            try await Task.sleep(for: .milliseconds(1100))
            let head = try await s.get("/h", method: "HEAD")
            #expect(head.status == 200)
            let hit = try await s.get("/h")
            #expect(Self.isHit(hit))
            #expect(hit.header("X-Version") == "2")
            #expect(hit.text == "get body")
            #expect(try await s.received("/h").map(\.method) == ["GET", "HEAD"])

            // Another tag in the HEAD answer leaves the stored response as it was.
            try await s.script(
                "/h2",
                Answer(200, [("Cache-Control", "max-age=1"), ("ETag", "\"v\""), ("X-Version", "1")], body: "old"),
                Answer(200, [("Cache-Control", "max-age=100"), ("ETag", "\"w\""), ("X-Version", "2")], body: "new"))
            _ = try await s.get("/h2")
            try await Task.sleep(for: .milliseconds(1100))
            _ = try await s.get("/h2", method: "HEAD")
            let after = try await s.get("/h2", [("Cache-Control", "max-stale=60")])
            #expect(after.header("X-Version") == "1")

            // A HEAD past a fresh entry (no-cache) that finds another representation marks the entry stale.
            try await s.script(
                "/h3", Answer(200, [("Cache-Control", "max-age=100"), ("ETag", "\"v\"")], body: "old"),
                Answer(200, [("Cache-Control", "max-age=100"), ("ETag", "\"w\"")], body: "new"))
            _ = try await s.get("/h3")
            _ = try await s.get("/h3", method: "HEAD", [("Cache-Control", "no-cache")])
            let next = try await s.get("/h3")
            #expect(next.header("Cache-Status")?.hasPrefix("gatehouse; fwd=stale") == true, "\(next.headers)")
            #expect(next.text == "new")
        }
    }

    // MARK: targeted fields

    @Test func targetedFieldsTakeThePlaceOfCacheControlAndStayHere() async throws {
        try await Self.run { s in
            try await s.script(
                "/cdn",
                Answer(
                    200,
                    [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=100"), ("Expires", "0")],
                    body: "c"))
            let first = try await s.get("/cdn")
            #expect(first.header("CDN-Cache-Control") == nil)
            #expect(first.header("Cache-Control") == "no-store")
            let hit = try await s.get("/cdn")
            #expect(Self.isHit(hit))
            #expect(hit.header("CDN-Cache-Control") == nil)
            #expect(hit.header("Cache-Control") == "no-store")
            // A targeted field that does not parse as a Structured Fields dictionary is ignored.
            try await s.script(
                "/bad", Answer(200, [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=\"1")], body: "b"))
            _ = try await s.get("/bad")
            #expect(!Self.isHit(try await s.get("/bad")))
            // A qualified private is private; an empty targeted field is no field.
            try await s.script(
                "/private", Answer(200, [("CDN-Cache-Control", "private=\"Set-Cookie\", max-age=60")], body: "p"))
            _ = try await s.get("/private")
            #expect(!Self.isHit(try await s.get("/private")))
            try await s.script(
                "/empty", Answer(200, [("Cache-Control", "no-store"), ("CDN-Cache-Control", " ")], body: "e"))
            _ = try await s.get("/empty")
            #expect(!Self.isHit(try await s.get("/empty")))
        }
        try await Self.run(cache: "ttl: 30s, targeted_fields: [Gatehouse-Cache-Control, CDN-Cache-Control]") { s in
            // The first field of the route's list wins, and none of them reaches the client.
            try await s.script(
                "/own",
                Answer(
                    200,
                    [
                        ("Cache-Control", "max-age=100"), ("CDN-Cache-Control", "max-age=100"),
                        ("Gatehouse-Cache-Control", "no-store"),
                    ], body: "o"))
            let first = try await s.get("/own")
            #expect(first.header("Gatehouse-Cache-Control") == nil && first.header("CDN-Cache-Control") == nil)
            #expect(!Self.isHit(try await s.get("/own")))
        }
        try await Self.run(cache: "ttl: 30s, forward_targeted_fields: true") { s in
            // For a CDN in front of the gateway, the field passes on, and still rules here.
            try await s.script(
                "/fwd", Answer(200, [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=100")], body: "f"))
            #expect(try await s.get("/fwd").header("CDN-Cache-Control") == "max-age=100")
            let hit = try await s.get("/fwd")
            #expect(Self.isHit(hit) && hit.header("CDN-Cache-Control") == "max-age=100")
        }
    }

    // MARK: partial content

    @Test func rangesAreAnsweredFromStoredCompleteResponses() async throws {
        try await Self.run { s in
            try await s.script(
                "/range",
                Answer(
                    200,
                    [
                        ("Cache-Control", "max-age=100"), ("ETag", "\"r\""),
                        ("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
                    ],
                    body: "0123456789"))
            _ = try await s.get("/range")
            for (range, body, contentRange) in [
                ("bytes=2-4", "234", "bytes 2-4/10"), ("bytes=-3", "789", "bytes 7-9/10"),
                ("bytes=7-", "789", "bytes 7-9/10"), ("bytes=8-100", "89", "bytes 8-9/10"),
            ] {
                let part = try await s.get("/range", [("Range", range)])
                #expect(part.status == 206, "\(range)")
                #expect(part.text == body)
                #expect(part.header("Content-Range") == contentRange)
                #expect(part.header("Content-Length") == String(body.count))
            }
            let unsatisfiable = try await s.get("/range", [("Range", "bytes=20-")])
            #expect(unsatisfiable.status == 416)
            #expect(unsatisfiable.header("Content-Range") == "bytes */10")
            #expect(unsatisfiable.header("Content-Type") == "application/problem+json")
            // Several ranges, another unit, a failed If-Range: the whole response.
            for headers in [
                [("Range", "bytes=0-1,4-5")], [("Range", "items=0-1")],
                [("Range", "bytes=0-1"), ("If-Range", "\"other\"")],
                [("Range", "bytes=0-1"), ("If-Range", "W/\"r\"")],
                [("Range", "bytes=0-1"), ("If-Range", "Mon, 07 Nov 1994 08:49:37 GMT")],
            ] {
                let whole = try await s.get("/range", headers)
                #expect(whole.status == 200, "\(headers)")
                #expect(whole.text == "0123456789")
            }
            for condition in ["\"r\"", "Sun, 06 Nov 1994 08:49:37 GMT"] {
                let part = try await s.get("/range", [("Range", "bytes=0-1"), ("If-Range", condition)])
                #expect(part.status == 206)
                #expect(part.text == "01")
            }
            #expect(try await s.received("/range").count == 1)

            // A miss passes the Range to the origin and its 206 to the client, never stored.
            try await s.script(
                "/part",
                Answer(206, [("Cache-Control", "max-age=100"), ("Content-Range", "bytes 0-1/10")], body: "ab"),
                Answer(200, [("Cache-Control", "max-age=100")], body: "abcdefghij"))
            let passed = try await s.get("/part", [("Range", "bytes=0-1")])
            #expect(passed.status == 206)
            #expect(passed.text == "ab")
            #expect(
                try await s.received("/part").first?.headers.contains { $0.0 == "Range" && $0.1 == "bytes=0-1" } == true
            )
            let whole = try await s.get("/part")
            #expect(whole.status == 200 && whole.text == "abcdefghij")
            #expect(!Self.isHit(whole))
        }
    }

    // MARK: interim responses

    @Test func interimResponsesReachTheClientAndAreNeverStored() async throws {
        try await Self.run(route: "    response_headers: { remove: [X-Internal] }") { s in
            // Filtered as a final answer is: hop-by-hop fields, those Connection names, the route's removals.
            let hints = Interim(
                status: 103,
                headers: [
                    ["Link", "</style.css>; rel=preload; as=style"], ["Connection", "X-Secret"], ["X-Secret", "1"],
                    ["Keep-Alive", "timeout=5"], ["X-Internal", "2"],
                ])
            /// Every head curl got, interim ones included, and the body.
            func heads(_ path: String, _ flags: [String]) async throws -> (heads: [String], body: String) {
                let (code, out, error) = try await ChildProcess.run(
                    "/usr/bin/curl",
                    ["-sS", "-i", "--max-time", "10"] + flags + ["http://127.0.0.1:\(s.h.port)" + path])
                #expect(code == 0, "curl: \(error)")
                let parts = out.components(separatedBy: "\r\n\r\n")
                return (parts.dropLast().map { $0.lowercased() }, parts.last ?? "")
            }
            try await s.script("/hints", Answer(200, [("Cache-Control", "no-store")], body: "page", interim: [hints]))
            for flags in [["--http1.1"], ["--http2-prior-knowledge"]] {
                let (heads, body) = try await heads("/hints", flags)
                #expect(heads.count == 2, "\(flags): \(heads)")
                #expect(heads.first?.contains(" 103") == true, "\(flags): \(heads)")
                #expect(heads.first?.contains("link: </style.css>; rel=preload") == true)
                for hidden in ["x-secret", "keep-alive", "x-internal", "connection:"] {
                    #expect(heads.first?.contains(hidden) == false, "\(flags): \(hidden) in \(heads)")
                }
                #expect(heads.last?.contains(" 200") == true)
                #expect(body == "page")
            }
            // A stored answer never replays the origin's interim answers.
            try await s.script(
                "/stored", Answer(200, [("Cache-Control", "max-age=100")], body: "page", interim: [hints]))
            #expect(try await heads("/stored", ["--http1.1"]).heads.count == 2)
            let hit = try await heads("/stored", ["--http1.1"])
            #expect(hit.heads.count == 1 && hit.heads[0].contains("cache-status: gatehouse; hit"), "\(hit.heads)")
            #expect(hit.body == "page")
            // An HTTP/1.0 client gets no interim answer.
            try await s.script("/hints10", Answer(200, [("Cache-Control", "no-store")], body: "p", interim: [hints]))
            let (_, old, _) = try await ChildProcess.run(
                "/usr/bin/curl", ["-sS", "-i", "--http1.0", "http://127.0.0.1:\(s.h.port)/hints10"])
            #expect(!old.contains(" 103"))
            #expect(old.hasSuffix("p"))
        }
    }

    // MARK: invalidation

    @Test func unsafeRequestsInvalidateTheirTargetAndSameOriginLocations() async throws {
        try await Self.run { s in
            for path in ["/i/a", "/i/b", "/i/c", "/i/d", "/i/e"] {
                try await s.script(path, Answer(200, [("Cache-Control", "max-age=100")], body: path))
                _ = try await s.get(path)
                #expect(Self.isHit(try await s.get(path)))
            }
            // POST /i/a answers with Location (same origin, relative) and Content-Location (another origin).
            try await s.script(
                "/i/a",
                Answer(201, [("Location", "b"), ("Content-Location", "http://elsewhere.example/i/c")], body: "made"))
            #expect(try await s.get("/i/a", method: "POST").status == 201)
            #expect(!Self.isHit(try await s.get("/i/a")))
            #expect(!Self.isHit(try await s.get("/i/b")))
            #expect(Self.isHit(try await s.get("/i/c")))
            // A method the cache does not know invalidates too, and an absolute same-origin Content-Location counts.
            try await s.script("/i/c", Answer(200, [("Content-Location", "http://test.local/i/d")], body: "ok"))
            #expect(try await s.get("/i/c", method: "PROPPATCH").status == 200)
            #expect(!Self.isHit(try await s.get("/i/c")))
            #expect(!Self.isHit(try await s.get("/i/d")))
            // M-SEARCH goes upstream spelt as on the wire (NIO names it MSEARCH), and invalidates.
            try await s.script("/i/m", Answer(200, [("Cache-Control", "max-age=100")], body: "m"))
            _ = try await s.get("/i/m")
            #expect(try await s.get("/i/m", method: "M-SEARCH").status == 200)
            #expect(try await s.received("/i/m").map(\.method) == ["GET", "M-SEARCH"])
            #expect(!Self.isHit(try await s.get("/i/m")))
            // A failed unsafe request invalidates nothing.
            try await s.script("/i/e", Answer(500, [], body: "no"))
            #expect(try await s.get("/i/e", method: "DELETE").status == 500)
            #expect(Self.isHit(try await s.get("/i/e")))
        }
    }
}
