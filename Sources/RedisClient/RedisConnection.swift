import NIOCore

/// A command on its way to Redis: the encoded bytes and who waits for the reply.
final class PendingCommand {
    let promise: EventLoopPromise<RedisValue>
    let deadline: NIODeadline
    /// Failed by a timeout; its reply, when it comes, is dropped.
    var finished = false

    init(promise: EventLoopPromise<RedisValue>, deadline: NIODeadline) {
        self.promise = promise
        self.deadline = deadline
    }
}

/// One Redis connection's protocol state: replies are matched to commands in order (RESP is ordered per
/// connection), commands written in one event-loop turn are flushed together, and the oldest command's deadline
/// is checked by a periodic sweep so a slow reply fails that command without closing the connection.
final class RedisHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = Never
    typealias OutboundOut = ByteBuffer

    private let decoder: RESPDecoder
    private var waiting = CircularBuffer<PendingCommand>()
    private var context: ChannelHandlerContext?
    private var flushScheduled = false
    private var sweep: RepeatedTask?
    private let commandTimeout: TimeAmount

    init(commandTimeout: TimeAmount) throws {
        guard let decoder = RESPDecoder() else { throw RedisError(.protocolError, "cannot create a hiredis reader") }
        self.decoder = decoder
        self.commandTimeout = commandTimeout
    }

    /// Commands sent and not yet answered.
    var inFlight: Int { waiting.count }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let interval = TimeAmount.nanoseconds(max(commandTimeout.nanoseconds / 4, 1_000_000))
        sweep = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            bound.value.expire()
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        sweep?.cancel()
        failAll(RedisError(.connectionLost, "connection closed"))
        self.context = nil
    }

    /// Writes a command; it is flushed with the others of this event-loop turn.
    func send(_ command: ByteBuffer, promise: EventLoopPromise<RedisValue>) {
        guard let context, context.channel.isActive else {
            promise.fail(RedisError(.unavailable, "not connected"))
            return
        }
        waiting.append(PendingCommand(promise: promise, deadline: .now() + commandTimeout))
        context.write(wrapOutboundOut(command), promise: nil)
        guard !flushScheduled else { return }
        flushScheduled = true
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute {
            let handler = bound.value
            handler.flushScheduled = false
            handler.context?.flush()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        decoder.feed(unwrapInboundIn(data))
        do {
            while let reply = try decoder.next() {
                guard let command = waiting.popFirst() else {
                    throw RedisError(.protocolError, "a reply no command asked for")
                }
                if !command.finished {
                    command.finished = true
                    command.promise.succeed(reply)
                }
            }
        } catch let error as RedisError {
            failAll(error)
            context.close(promise: nil)
        } catch {
            failAll(RedisError(.protocolError, "\(error)"))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(RedisError(.connectionLost, "connection closed"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        failAll(RedisError(.connectionLost, "\(error)"))
        context.close(promise: nil)
    }

    /// Fails commands past their deadline; their replies will be dropped when they arrive.
    private func expire() {
        let now = NIODeadline.now()
        for command in waiting where !command.finished {
            guard command.deadline <= now else { break }
            command.finished = true
            command.promise.fail(RedisError(.timeout, "no reply within the command timeout"))
        }
    }

    private func failAll(_ error: RedisError) {
        while let command = waiting.popFirst() {
            if !command.finished {
                command.finished = true
                command.promise.fail(error)
            }
        }
    }
}
