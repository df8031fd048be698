import DemoUpstream
import Foundation
import Synchronization
import Testing

/// The real `gatehouse` binary: `check`, `hash-key`, `--version`, and `serve` with SIGHUP and SIGTERM.
@Suite struct CommandLineTests {
    static let binary = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent(".build/debug/gatehouse").path

    /// Runs the binary to completion; returns exit status, stdout and stderr.
    static func run(_ arguments: [String]) async throws -> (Int32, String, String) {
        try await ChildProcess.run(binary, arguments)
    }

    /// A config file in Scripts/test's run directory when there is one, so that the script can stop a
    /// `gatehouse serve` of it that a crashed test process left behind.
    static func temporaryFile(_ text: String) throws -> String {
        let directory = ProcessInfo.processInfo.environment["GATEHOUSE_TEST_TMPDIR"].map { URL(fileURLWithPath: $0) }
        let path = (directory ?? FileManager.default.temporaryDirectory)
            .appendingPathComponent("gh-\(UUID().uuidString).yaml").path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func hashKeyAndVersion() async throws {
        let (status, output, _) = try await Self.run(["hash-key", "test"])
        #expect(status == 0)
        #expect(output == "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n")
        let (_, version, _) = try await Self.run(["--version"])
        #expect(version.trimmingCharacters(in: .whitespacesAndNewlines) == "0.1.0")
    }

    @Test func checkPrintsASummaryOrEveryError() async throws {
        let good = try Self.temporaryFile(
            "routes:\n  - { id: status, match: { path: \"/status\" }, respond: { status: 200, body: ok } }\n")
        let (status, output, _) = try await Self.run(["check", "--config", good])
        #expect(status == 0)
        #expect(output.contains("OK"))
        #expect(output.contains("status: * * /status -> respond 200"))

        let bad = try Self.temporaryFile(
            "server:\n  listen: nope\nroutes:\n  - { id: a, match: { path: \"/a\" }, upstream: ghost }\n")
        let (badStatus, _, errors) = try await Self.run(["check", "--config", bad])
        #expect(badStatus == 1)
        #expect(errors.contains("\(bad):2: server.listen: expected host:port"))
        #expect(errors.contains("\(bad):4: routes[0].upstream: unknown upstream \"ghost\""))
    }

    /// Resident and peak resident memory of a process, in bytes (VmRSS, VmHWM).
    static func memory(of pid: Int32) -> (resident: Int, peak: Int) {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return (0, 0) }
        func field(_ name: String) -> Int {
            for line in status.split(separator: "\n") where line.hasPrefix(name) {
                return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
            }
            return 0
        }
        return (field("VmRSS:"), field("VmHWM:"))
    }

    /// 50 MiB each way through a separate gateway process, with a slow client on the download: the gateway's
    /// peak memory must stay far below the body size (it streams with backpressure, never buffers whole).
    @Test func fiftyMebibytesEachWayKeepTheGatewaysMemoryFlat() async throws {
        let upstream = try await DemoUpstream.start()
        defer { Task { await upstream.stop() } }
        let path = try Self.temporaryFile(
            """
            server: { listen: "127.0.0.1:0", access_log: "off", threads: 1, limits: { max_body_bytes: 100MiB } }
            admin: { listen: "127.0.0.1:0", hosts: [test.local] }
            redis: { url: "memory://" }
            upstreams:
              demo: { targets: [{ url: "http://127.0.0.1:\(upstream.port)" }] }
            routes:
              - { id: demo, match: { path_prefix: "/" }, upstream: demo }
            """)
        let server = try ServeProcess(config: path)
        defer { server.process.signal(SIGTERM) }
        let port = try await server.port()
        #expect(try await request(port: port, "/bytes/100000").body.count == 100_000)
        let baseline = Self.memory(of: server.process.pid).resident
        let size = 50 * 1024 * 1024

        let downloaded = try await RawConnection.with(port: port) { connection in
            try await connection.send("GET /bytes/\(size) HTTP/1.1\r\nHost: test.local\r\n\r\n")
            let head = try await connection.readHead()
            #expect(head.header("Content-Length") == String(size))
            return try await connection.drainBody(length: size, every: 512 * 1024, pause: .milliseconds(5))
        }
        #expect(downloaded == size)

        let uploaded = try await RawConnection.with(port: port) { connection in
            try await connection.send("POST /count HTTP/1.1\r\nHost: test.local\r\nContent-Length: \(size)\r\n\r\n")
            let chunk = [UInt8](repeating: 0x61, count: 256 * 1024)
            for _ in 0..<(size / chunk.count) { try await connection.send(bytes: chunk) }
            return try await connection.readResponse()
        }
        #expect(uploaded.json["bytes"] as? Int == size)

        let peak = Self.memory(of: server.process.pid).peak
        print("50 MiB each way: gateway peak RSS grew by \((peak - baseline) >> 10) KiB")
        #expect(peak - baseline < 24 * 1024 * 1024, "gateway peak RSS grew by \((peak - baseline) >> 20) MiB")
    }

    @Test func serveReloadsOnSIGHUPAndDrainsOnSIGTERM() async throws {
        let upstream = try await DemoUpstream.start()
        defer { Task { await upstream.stop() } }
        let yaml = """
            server: { listen: "127.0.0.1:0", access_log: "off", drain_timeout: 5s }
            admin: { listen: "127.0.0.1:0", hosts: [test.local] }
            redis: { url: "memory://" }
            upstreams:
              demo: { targets: [{ url: "http://127.0.0.1:\(upstream.port)" }] }
            routes:
              - { id: status, match: { path: "/status" }, respond: { status: 200, body: "one" } }
              - { id: demo, match: { path_prefix: "/" }, upstream: demo }
            """
        let path = try Self.temporaryFile(yaml)
        let server = try ServeProcess(config: path)
        let port = try await server.port()
        #expect(try await request(port: port, "/status").text == "one")

        try yaml.replacingOccurrences(of: "body: \"one\"", with: "body: \"two\"").write(
            toFile: path, atomically: true, encoding: .utf8)
        kill(server.process.pid, SIGHUP)
        _ = try await server.waitFor("config reloaded")
        #expect(try await request(port: port, "/status").text == "two")

        try "routes: [".write(toFile: path, atomically: true, encoding: .utf8)
        kill(server.process.pid, SIGHUP)
        _ = try await server.waitFor("reload rejected")
        #expect(try await request(port: port, "/status").text == "two")

        async let slow = request(port: port, "/delay/700")
        try await waitUntil { upstream.requestCount == 1 }
        kill(server.process.pid, SIGTERM)
        #expect(try await slow.status == 200)
        #expect(try await server.process.wait() == 0)
    }
}

/// A running `gatehouse serve` whose stderr is collected.
final class ServeProcess: Sendable {
    let process: ChildProcess
    let log = LogBuffer()

    init(config: String) throws {
        let (read, write) = try ChildProcess.pipe()
        defer { close(write) }
        do {
            process = try ChildProcess(CommandLineTests.binary, ["serve", "--config", config], error: write)
        } catch {
            close(read)
            throw error
        }
        let log = self.log
        Thread {
            ChildProcess.read(read) { chunk in
                let text = String(decoding: chunk, as: UTF8.self)
                log.text.withLock { $0 += text }
            }
        }.start()
    }

    deinit {
        process.signal(SIGKILL)
        process.reapInBackground()
    }

    /// Waits for a log line containing `text`; returns the whole log.
    func waitFor(_ text: String, timeout: Duration = .seconds(20)) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let current = log.text.withLock { $0 }
            if current.contains(text) { return current }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("no log line with \(text): \(log.text.withLock { $0 })")
        return ""
    }

    /// The client port from the "gatehouse listening" line.
    func port() async throws -> Int {
        let log = try await waitFor("gatehouse listening")
        guard let range = log.range(of: #"listen=\S*?:(\d+)"#, options: .regularExpression) else { return 0 }
        return Int(log[range].split(separator: ":").last ?? "") ?? 0
    }
}

/// Text collected from another thread.
final class LogBuffer: Sendable {
    let text = Mutex("")
}
