import NIOCore
import UpstreamClient

/// A whole GET through the upstream client, for the gateway's own needs (a JWKS document): status, headers and a
/// body of at most `limit` bytes.
final class UpstreamFetch: UpstreamTransferDelegate {
    struct Answer: Sendable {
        var status: Int
        var headers: [(name: String, value: String)]
        var body: [UInt8]
    }

    private let state: NIOLoopBoundBox<(head: UpstreamResponseHead?, body: [UInt8], done: Bool)>
    private let promise: EventLoopPromise<Answer>
    private let limit: Int
    let eventLoop: EventLoop

    private init(eventLoop: EventLoop, limit: Int) {
        self.eventLoop = eventLoop
        self.limit = limit
        state = .makeBoxSendingValue((nil, [], false), eventLoop: eventLoop)
        promise = eventLoop.makePromise()
    }

    static func get(
        _ url: String, client: UpstreamClient, on eventLoop: EventLoop, timeoutMilliseconds: Int = 5000,
        limit: Int = 1 << 20
    ) -> EventLoopFuture<Answer> {
        let request = UpstreamRequest(
            url: url, method: "GET", headers: [("Accept", "application/json"), ("User-Agent", "gatehouse")],
            bodyLength: nil, connectTimeoutMilliseconds: min(timeoutMilliseconds, 2000),
            timeoutMilliseconds: timeoutMilliseconds)
        return send(request, client: client, on: eventLoop, limit: limit)
    }

    /// Sends `request` with `body` (whose length must match `request.bodyLength`) and collects the answer.
    static func send(
        _ request: UpstreamRequest, body: ByteBuffer? = nil, client: UpstreamClient, on eventLoop: EventLoop,
        limit: Int = 1 << 20
    ) -> EventLoopFuture<Answer> {
        let fetch = UpstreamFetch(eventLoop: eventLoop, limit: limit)
        let transfer = client.start(request, delegate: fetch)
        if let body, body.readableBytes > 0 { _ = transfer.sendBody(body) }
        transfer.endBody()
        return fetch.promise.futureResult
    }

    func upstreamTransfer(_ transfer: UpstreamTransfer, received events: UpstreamEvents) {
        guard !state.value.done else { return }
        if let head = events.head { state.value.head = head }
        for chunk in events.body {
            state.value.body += chunk.readableBytesView
            if state.value.body.count > limit {
                state.value.done = true
                transfer.cancel()
                promise.fail(UpstreamError(kind: .other, detail: "the answer is larger than \(limit) bytes"))
                return
            }
        }
        guard let completion = events.completion else { return }
        state.value.done = true
        if let error = completion.error {
            promise.fail(error)
        } else if let head = state.value.head {
            promise.succeed(Answer(status: head.status, headers: head.headers, body: state.value.body))
        } else {
            promise.fail(UpstreamError(kind: .reset, detail: "no answer"))
        }
    }

    func upstreamTransferWantsRequestBody(_ transfer: UpstreamTransfer) {}
}
