import Foundation
import NIOCore
import NIOPosix
import Testing

@testable import Gatehouse

/// An upstream that answers every connection with fixed raw bytes, to play a broken or hostile origin.
final class RawUpstream: Sendable {
    let channel: Channel
    var port: Int { channel.localAddress?.port ?? 0 }

    init(answer: String) async throws {
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Answerer(answer: answer))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    func stop() async { try? await channel.close() }

    private final class Answerer: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let answer: String
        var answered = false

        init(answer: String) { self.answer = answer }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard !answered else { return }
            answered = true
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(channel.allocator.buffer(string: answer))).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
    }
}

/// What a broken or hostile upstream cannot do to the client: split its response, smuggle a second one, or
/// pass off a malformed status line.
@Suite struct UpstreamFramingTests {
    func through(_ answer: String) async throws -> RawResponse {
        let origin = try await RawUpstream(answer: answer)
        defer { Task { await origin.stop() } }
        var result = RawResponse(status: 0, headers: [], body: [])
        try await Harness.run({ _ in
            Harness.config(
                upstreamPort: origin.port, routes: "  - { id: raw, match: { path_prefix: \"/\" }, upstream: demo }")
        }) { h in
            result = try await request(port: h.port, "/x")
        }
        return result
    }

    @Test func contentLengthWithTransferEncodingIsReframed() async throws {
        let response = try await through(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        #expect(response.status == 200)
        #expect(response.header("Content-Length") == nil)
        #expect(response.text == "hello")
    }

    @Test func headerValuesWithControlCharactersAreRefused() async throws {
        let response = try await through("HTTP/1.1 200 OK\r\nX-Bad: a\rInjected: yes\r\nContent-Length: 2\r\n\r\nok")
        #expect(response.status == 502)
        #expect(response.header("Injected") == nil)
    }

    @Test func malformedStatusLinesAreRefused() async throws {
        #expect(try await through("HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok").status == 502)
        #expect(try await through("HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok").status == 502)
    }

    @Test func aValidAnswerStillPasses() async throws {
        let response = try await through("HTTP/1.1 201 Created\r\nX-Fine: yes\tand tabs\r\nContent-Length: 2\r\n\r\nok")
        #expect(response.status == 201)
        #expect(response.header("X-Fine") == "yes\tand tabs")
        #expect(response.text == "ok")
    }
}
