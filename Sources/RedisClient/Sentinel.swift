import Logging
import NIOCore
import Synchronization

/// Asks sentinels where the master is: each in turn until one answers `SENTINEL get-master-addr-by-name`.
enum SentinelLookup {
    static func master(
        _ sentinel: RedisConfiguration.Sentinel, configuration: RedisConfiguration, on eventLoop: EventLoop
    ) async throws -> RedisConfiguration.Address {
        var failures: [String] = []
        let timeout = TimeAmount(configuration.commandTimeout)
        for address in sentinel.sentinels {
            do {
                let channel = try await Reconnector.open(address, configuration, on: eventLoop) {
                    try RedisHandler(commandTimeout: max(timeout, .milliseconds(500)))
                }
                defer { channel.close(promise: nil) }
                var commands: [[RedisArgument]] = []
                if let auth = authCommand(sentinel) { commands.append(auth) }
                commands.append(["SENTINEL", "get-master-addr-by-name", .string(sentinel.master)])
                let replies = try await Reconnector.ask(channel, commands)
                for reply in replies {
                    if case .error(let message) = reply { throw RedisError(.server, message) }
                }
                guard case .array(let items?) = replies.last, items.count == 2, let host = items[0].string,
                    let port = items[1].string.flatMap(Int.init)
                else { throw RedisError(.protocolError, "the sentinel knows no master \(sentinel.master)") }
                return .tcp(host: host, port: port)
            } catch {
                failures.append("\(address): \(error)")
            }
        }
        throw RedisError(.unavailable, "no sentinel named the master: " + failures.joined(separator: "; "))
    }

    /// `AUTH` for the sentinels themselves.
    static func authCommand(_ sentinel: RedisConfiguration.Sentinel) -> [RedisArgument]? {
        guard let password = sentinel.password else { return nil }
        return sentinel.username.map { ["AUTH", .string($0), .string(password)] } ?? ["AUTH", .string(password)]
    }
}

/// Follows failovers: a subscription to `+switch-master` on one sentinel at a time (the next when it is lost);
/// when the master changes, `switched` runs, and the client drops its connections to make them anew.
final class SentinelWatch: Sendable {
    private let reconnector: Reconnector

    /// Which sentinel the next subscription goes to.
    private final class Turn: Sendable {
        let next = Atomic<Int>(0)
    }

    init(
        _ sentinel: RedisConfiguration.Sentinel, configuration: RedisConfiguration, eventLoop: EventLoop,
        logger: Logger, switched: @escaping @Sendable () -> Void
    ) {
        reconnector = Reconnector(logger: logger)
        let turn = Turn()
        reconnector.start(
            open: {
                let index = turn.next.wrappingAdd(1, ordering: .relaxed).oldValue
                let address = sentinel.sentinels[index % sentinel.sentinels.count]
                let channel = try await Reconnector.open(address, configuration, on: eventLoop) {
                    try PushHandler { value in
                        guard case .array(let items?) = value, items.first?.string == "message", items.count == 3,
                            let text = items[2].string, text.split(separator: " ").first == Substring(sentinel.master)
                        else { return }
                        logger.info("redis master switched", metadata: ["switch": "\(text)"])
                        switched()
                    }
                }
                var buffer = channel.allocator.buffer(capacity: 64)
                if let auth = SentinelLookup.authCommand(sentinel) { RESPEncoder.encode(auth, into: &buffer) }
                RESPEncoder.encode(["SUBSCRIBE", "+switch-master"], into: &buffer)
                try await channel.writeAndFlush(buffer)
                return channel
            },
            opened: { _ in }, lost: {})
    }

    func close() async { await reconnector.close() }
}
