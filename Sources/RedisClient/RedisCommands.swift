public import NIOCore

/// What the gateway's store asks of Redis, whatever its form: one server (``RedisClient``, which ignores the keys)
/// or a cluster (``RedisCluster``, which sends each command to the node that owns its key's slot).
public protocol RedisCommands: Sendable {
    /// The configuration subscriptions connect with.
    var configuration: RedisConfiguration { get }
    /// True while commands can be sent.
    var isConnected: Bool { get }
    /// Nil while connected; else what is failing, naming the server.
    var problem: String? { get }
    /// Whether keys of different hash slots may meet in one command or script (false in a cluster).
    var crossesSlots: Bool { get }

    /// Sends a command about `key` (nil: any server will do); an error reply fails with `.server`.
    func send(_ arguments: [RedisArgument], key: String?) async throws(RedisError) -> RedisValue
    /// The same, answered on `eventLoop`.
    func send(_ arguments: [RedisArgument], key: String?, on eventLoop: EventLoop) -> EventLoopFuture<RedisValue>
    func close() async
}

extension RedisCommands {
    /// Runs a script by its SHA1, and by its source when the server does not know it (`NOSCRIPT`). `keys` go to
    /// the server of the first one.
    public func evalsha(_ script: RedisScript, keys: [String], arguments: [RedisArgument]) async throws(RedisError)
        -> RedisValue
    {
        do {
            return try await send(Self.scriptCommand("EVALSHA", script.sha1, keys, arguments), key: keys.first)
        } catch  where error.kind == .server && error.message.hasPrefix("NOSCRIPT") {
            return try await send(Self.scriptCommand("EVAL", script.source, keys, arguments), key: keys.first)
        }
    }

    /// ``evalsha(_:keys:arguments:)`` answered on `eventLoop`.
    public func evalsha(_ script: RedisScript, keys: [String], arguments: [RedisArgument], on eventLoop: EventLoop)
        -> EventLoopFuture<RedisValue>
    {
        send(Self.scriptCommand("EVALSHA", script.sha1, keys, arguments), key: keys.first, on: eventLoop)
            .flatMapError { error in
                guard let error = error as? RedisError, error.kind == .server, error.message.hasPrefix("NOSCRIPT")
                else {
                    return eventLoop.makeFailedFuture(error)
                }
                return self.send(
                    Self.scriptCommand("EVAL", script.source, keys, arguments), key: keys.first, on: eventLoop)
            }
    }

    /// `EVALSHA sha numkeys key... arg...` (or `EVAL source ...`), built in one array.
    static func scriptCommand(_ verb: String, _ script: String, _ keys: [String], _ arguments: [RedisArgument])
        -> [RedisArgument]
    {
        var command: [RedisArgument] = []
        command.reserveCapacity(3 + keys.count + arguments.count)
        command.append(.string(verb))
        command.append(.string(script))
        command.append(.string(String(keys.count)))
        for key in keys { command.append(.string(key)) }
        command.append(contentsOf: arguments)
        return command
    }

    public func get(_ key: String) async throws(RedisError) -> [UInt8]? {
        try await send(["GET", .string(key)], key: key).bytes
    }

    /// `SET`, optionally expiring (`PX`) and only when absent (`NX`); returns whether it was set.
    @discardableResult
    public func set(_ key: String, _ value: [UInt8], expireMilliseconds: Int? = nil, onlyIfAbsent: Bool = false)
        async throws(RedisError) -> Bool
    {
        var command: [RedisArgument] = ["SET", .string(key), .bytes(value)]
        if let expireMilliseconds { command += ["PX", .string(String(expireMilliseconds))] }
        if onlyIfAbsent { command.append("NX") }
        return !(try await send(command, key: key).isNull)
    }
}

/// Redis Cluster's hash slots: CRC16 (XMODEM) of the key, or of its hash tag (the part between the first `{` and
/// the next `}`, when not empty), modulo 16384.
public enum RedisHashSlot {
    public static let count = 16384

    public static func of(_ key: String) -> Int {
        var bytes = Array(key.utf8)[...]
        if let open = bytes.firstIndex(of: UInt8(ascii: "{")),
            let close = bytes[(open + 1)...].firstIndex(of: UInt8(ascii: "}")), close > open + 1
        {
            bytes = bytes[(open + 1)..<close]
        }
        var crc: UInt16 = 0
        for byte in bytes {
            crc ^= UInt16(byte) << 8
            for _ in 0..<8 { crc = crc & 0x8000 != 0 ? (crc << 1) ^ 0x1021 : crc << 1 }
        }
        return Int(crc) % count
    }
}
