import GatehouseConfig
import NIOHTTP1
import Testing
import UpstreamClient

@testable import Gatehouse

/// What crosses the gateway (SPEC §3), phase by phase, without sockets.
@Suite struct HeaderTests {
    static func context(_ headers: [(String, String)], peer: String = "10.1.2.3", trusted: [String] = [])
        -> RequestContext
    {
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/x", headers: HTTPHeaders(headers))
        let connection = ConnectionInfo(peerIP: peer, tls: false)
        return RequestContext(
            requestID: "rid-1", head: head, connection: connection, trusted: trusted.compactMap(CIDR.parse))
    }

    @Test func responseDropsHopByHopAndConnectionNamedHeaders() {
        let upstream = UpstreamResponseHead(
            status: 200,
            headers: [
                ("Content-Type", "text/plain"), ("Connection", "close, X-Internal"), ("X-Internal", "secret"),
                ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Proxy-Authenticate", "Basic"),
                ("Via", "1.0 origin"), ("X-Request-ID", "spoofed"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
            ])
        let head = RespondPhase.head(for: upstream, Self.context([("Host", "a")]))
        #expect(head.status == .ok)
        #expect(head.headers["Content-Type"] == ["text/plain"])
        for name in ["Connection", "X-Internal", "Keep-Alive", "Proxy-Authenticate"] {
            #expect(head.headers[name].isEmpty, "\(name)")
        }
        #expect(head.headers["Transfer-Encoding"] == ["chunked"], "the gateway frames the body afresh")
        #expect(head.headers["Via"] == ["1.0 origin, 1.1 gatehouse"])
        #expect(head.headers["X-Request-ID"] == ["rid-1"])
        #expect(head.headers["Set-Cookie"] == ["a=1", "b=2"])
    }

    @Test func contentLengthIsDroppedWhenTheUpstreamAlsoSentTransferEncoding() {
        let both = UpstreamResponseHead(
            status: 200, headers: [("Content-Length", "10"), ("Transfer-Encoding", "chunked")])
        #expect(RespondPhase.head(for: both, Self.context([("Host", "a")])).headers["Content-Length"].isEmpty)
        let conflicting = UpstreamResponseHead(
            status: 200, headers: [("Content-Length", "10"), ("Content-Length", "12")])
        #expect(
            RespondPhase.head(for: conflicting, Self.context([("Host", "a")])).headers["Content-Length"].isEmpty)
        let one = UpstreamResponseHead(status: 200, headers: [("content-length", "10")])
        #expect(RespondPhase.head(for: one, Self.context([("Host", "a")])).headers["Content-Length"] == ["10"])
    }

    @Test func clientAddressBehindTrustedProxies() {
        let direct = Self.context([("X-Forwarded-For", "1.1.1.1")], peer: "10.1.2.3")
        #expect(direct.clientIP == "10.1.2.3")
        let proxied = Self.context(
            [("X-Forwarded-For", "198.51.100.7, 10.0.0.5")], peer: "10.1.2.3", trusted: ["10.0.0.0/8"])
        #expect(proxied.clientIP == "198.51.100.7")
        let spoofed = Self.context([("X-Forwarded-For", "not-an-ip")], peer: "10.1.2.3", trusted: ["10.0.0.0/8"])
        #expect(spoofed.clientIP == "10.1.2.3")
    }

    @Test func cidrMatching() throws {
        let v4 = try #require(CIDR.parse("192.168.0.0/16"))
        #expect(v4.contains([192, 168, 4, 4]))
        #expect(!v4.contains([192, 169, 0, 1]))
        let mapped = IPAddressText.parse("::ffff:192.168.1.1") ?? []
        #expect(v4.contains(mapped))
        let v6 = try #require(CIDR.parse("2001:db8::/32"))
        #expect(v6.contains(IPAddressText.parse("2001:db8::1") ?? []))
        #expect(!v6.contains(IPAddressText.parse("2001:db9::1") ?? []))
        #expect(CIDR.parse("10.0.0.0/33") == nil)
    }

    @Test func requestIDsFromClientsAreBounded() {
        #expect(RequestID.isAcceptable("abc-123_x.y:z"))
        #expect(!RequestID.isAcceptable(""))
        #expect(!RequestID.isAcceptable("has space"))
        #expect(!RequestID.isAcceptable(String(repeating: "a", count: 129)))
        #expect(RequestID.make() != RequestID.make())
    }

    @Test func hostHeadersAreCheckedAndNormalised() {
        for valid in [
            "example.com", "Example.COM:8080", "[::1]:8443", "[2001:db8::1]", "127.0.0.1", "host:", "a-b_c~d%41",
        ] {
            #expect(AcceptPhase.isValidHost(valid), "\(valid)")
        }
        for invalid in [
            "a b", "a@b", "ex/ample", "[zz]", "[::1", "[]", "[::1]x", "host:123456", "host:8o", "ex\u{e9}mple",
        ] {
            #expect(!AcceptPhase.isValidHost(invalid), "\(invalid)")
        }
        #expect(AcceptPhase.hostName("Example.COM.:80") == "example.com")
        #expect(AcceptPhase.hostName("[::1]:80") == "[::1]")
        #expect(AcceptPhase.hostName("API.example.com") == "api.example.com")
    }
}
