import Foundation
import Logging
import NIOPosix
import Testing

@testable import RedisClient

/// A real `redis-server` on a free loopback port, started and stopped by a test.
final class RedisServerProcess: @unchecked Sendable {
    let port: Int
    private var process: ChildProcess?
    private let arguments: [String]
    /// The port, held while the server is killed, so that it can come back on it.
    private var hold: PortHold?

    init(arguments: [String] = []) async throws {
        port = try restartablePort()
        self.arguments = arguments
        try await start()
    }

    /// A server whose arguments depend on its port (a TLS-only server listens with `--port 0 --tls-port PORT`).
    init(_ arguments: (Int) -> [String]) async throws {
        port = try restartablePort()
        self.arguments = arguments(port)
        try await start()
    }

    /// Starts the server and waits (without blocking a thread of the concurrency pool) until it accepts.
    func start() async throws {
        hold?.release()
        hold = nil
        // A directory of its own: a replica writes the RDB it receives there, not in the package.
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-redis-\(port)").path
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var arguments =
            ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
            + self.arguments
        // Scripts/test kills what these files name if the test process dies first: the server inherits the
        // test process's blocked signals, so only SIGKILL stops it, and nothing else would.
        if let directory = ProcessInfo.processInfo.environment["GATEHOUSE_TEST_TMPDIR"] {
            arguments += ["--pidfile", "\(directory)/test-redis-\(port).pid"]
        }
        process = try ChildProcess("/usr/bin/redis-server", arguments)
        for _ in 0..<200 {
            if Self.accepts(port) { return }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    /// SIGKILL, as a crash would; returns once the server is gone.
    func kill() async {
        guard let process else { return }
        process.signal(SIGKILL)
        for _ in 0..<1000 where process.isRunning { try? await Task.sleep(for: .milliseconds(5)) }
        if process.isRunning { Issue.record("redis-server on port \(port) outlived SIGKILL for 5 s") }
        self.process = nil
        hold = PortHold(port)
    }

    deinit {
        process?.signal(SIGKILL)
        process?.reapInBackground()
    }

    static func accepts(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        return withLoopbackAddress(port: port) { connect(fd, $0, $1) } == 0
    }
}

/// RedisClient against a real redis-server: order, binary safety, timeouts, outages, scripts, AUTH and SELECT.
@Suite struct RedisClientTests {
    static func client(_ port: Int, _ configure: (inout RedisConfiguration) -> Void = { _ in }) async throws
        -> RedisClient
    {
        var configuration = RedisConfiguration(address: .tcp(host: "127.0.0.1", port: port))
        configuration.commandTimeout = .seconds(2)
        configure(&configuration)
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let client = RedisClient(configuration: configuration, logger: logger)
        try await waitUntil { client.isConnected }
        return client
    }

    @Test func binaryValuesRoundTrip() async throws {
        let server = try await RedisServerProcess()
        let client = try await Self.client(server.port)
        let every = (0...255).map { UInt8($0) }
        try await client.set("bytes", every)
        #expect(try await client.get("bytes") == every)
        let big = (0..<(10 * 1024 * 1024)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try await client.set("big", big)
        #expect(try await client.get("big") == big)
        #expect(try await client.get("missing") == nil)
        #expect(try await client.set("once", [1], onlyIfAbsent: true))
        #expect(try await !client.set("once", [2], onlyIfAbsent: true))
        #expect(try await client.incr("n") == 1)
        #expect(try await client.expire("n", seconds: 10))
        #expect(try await client.del("bytes", "big") == 2)
        await #expect(throws: RedisError.self) { _ = try await client.send("NOSUCHCOMMAND") }
        await client.close()
    }

    @Test func repliesKeepTheirOrderUnderAThousandCallers() async throws {
        let server = try await RedisServerProcess()
        let client = try await Self.client(server.port) { $0.poolSize = 2 }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<1000 {
                group.addTask {
                    let value = Array("value-\(index)".utf8)
                    try await client.set("k\(index)", value)
                    let read = try await client.get("k\(index)")
                    #expect(read == value)
                    _ = try await client.incr("counter")
                }
            }
            try await group.waitForAll()
        }
        #expect(try await client.get("counter") == Array("1000".utf8))
        await client.close()
    }

    @Test func aCommandTimeoutFailsThatCommandAndKeepsTheConnection() async throws {
        let server = try await RedisServerProcess(arguments: ["--enable-debug-command", "yes"])
        let client = try await Self.client(server.port) {
            $0.poolSize = 1
            $0.commandTimeout = .milliseconds(150)
        }
        let started = ContinuousClock.now
        await #expect {
            _ = try await client.send("DEBUG", "SLEEP", "1")
        } throws: { ($0 as? RedisError)?.kind == .timeout }
        #expect(ContinuousClock.now - started < .milliseconds(800))
        // Well past the server's 1 s sleep, so that a loaded machine does not make the PING the slow one.
        try await Task.sleep(for: .milliseconds(1600))
        // The same connection answers again (a PING may itself take longer than 150 ms on a loaded machine: a few
        // tries).
        var pong: RedisValue?
        for _ in 0..<5 where pong == nil { pong = try? await client.send("PING") }
        #expect(pong == .simple("PONG"))
        #expect(client.isConnected)
        await client.close()
    }

    @Test func redisKilledAndRestartedFailsFastThenRecovers() async throws {
        let server = try await RedisServerProcess()
        let client = try await Self.client(server.port)
        try await client.set("before", [1])
        await server.kill()
        try await waitUntil { !client.isConnected }
        let started = ContinuousClock.now
        await #expect(throws: RedisError.self) { _ = try await client.get("before") }
        #expect(ContinuousClock.now - started < .milliseconds(250), "commands fail fast while Redis is away")

        try await server.start()
        let back = ContinuousClock.now
        var answered = false
        // (Reconnecting waits up to 500 ms between attempts; a loaded machine adds to it.)
        while ContinuousClock.now - back < .seconds(3) {
            if (try? await client.send("PING")) == .simple("PONG") {
                answered = true
                break
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(answered, "a command succeeds within 3 s of Redis coming back")
        await client.close()
    }

    @Test func unixSocketsAndAFullQueueFailFast() async throws {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("gh-\(UUID().uuidString).sock").path
        let server = try await RedisServerProcess(arguments: ["--unixsocket", socket, "--enable-debug-command", "yes"])
        var configuration = RedisConfiguration(address: .unix(path: socket))
        configuration.poolSize = 1
        configuration.maxInFlightPerConnection = 2
        configuration.commandTimeout = .seconds(2)
        let client = RedisClient(configuration: configuration)
        try await waitUntil { client.isConnected }
        #expect(try await client.send("PING") == .simple("PONG"))
        // Two commands fill the connection while Redis sleeps; the third is refused at once.
        async let sleeping = client.send("DEBUG", "SLEEP", "0.3")
        async let queued = client.send("PING")
        try await Task.sleep(for: .milliseconds(50))
        await #expect {
            _ = try await client.send("PING")
        } throws: { ($0 as? RedisError)?.kind == .overloaded }
        #expect(try await sleeping == .simple("OK"))
        #expect(try await queued == .simple("PONG"))
        await client.close()
        _ = server
    }

    @Test func scriptsSurviveAScriptFlush() async throws {
        let server = try await RedisServerProcess()
        let client = try await Self.client(server.port)
        let script = RedisScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        #expect(try await client.evalsha(script, keys: ["s"], arguments: ["2"]) == .integer(2))
        _ = try await client.send("SCRIPT", "FLUSH")
        #expect(try await client.evalsha(script, keys: ["s"], arguments: ["3"]) == .integer(5))
        #expect(try await client.send("SCRIPT", "EXISTS", .string(script.sha1)) == .array([.integer(1)]))
        await client.close()
    }

    @Test func authAndSelect() async throws {
        let server = try await RedisServerProcess(arguments: ["--requirepass", "s3cret"])
        let client = try await Self.client(server.port) {
            $0.password = "s3cret"
            $0.database = 3
        }
        try await client.set("where", Array("db3".utf8))
        let db0 = try await Self.client(server.port) { $0.password = "s3cret" }
        #expect(try await db0.get("where") == nil)
        #expect(try await db0.send("SELECT", "3") == .simple("OK"))
        await db0.close()

        var wrong = RedisConfiguration(address: .tcp(host: "127.0.0.1", port: server.port))
        wrong.password = "nope"
        let refused = RedisClient(configuration: wrong)
        try await Task.sleep(for: .milliseconds(200))
        #expect(!refused.isConnected)
        await #expect(throws: RedisError.self) { _ = try await refused.send("PING") }
        await refused.close()
        await client.close()
    }
}
