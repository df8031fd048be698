import DemoUpstream
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import Gatehouse

/// A real gateway in front of a real upstream, both in this process, on free loopback ports.
struct Harness {
    let gateway: Gateway
    let upstream: DemoUpstream
    /// The config file the gateway reloads from.
    let configPath: String
    var port: Int { gateway.localAddress?.port ?? 0 }
    var adminPort: Int { gateway.adminAddress?.port ?? 0 }

    /// Starts the demo upstream and a gateway whose config is `yaml(upstreamPort)`, runs `body`, stops both.
    static func run(
        _ yaml: (Int) -> String, environment: [String: String] = [:], upstream given: DemoUpstream? = nil,
        _ body: (Harness) async throws -> Void
    ) async throws {
        let upstream: DemoUpstream
        if let given { upstream = given } else { upstream = try await DemoUpstream.start() }
        do {
            let path = FileManager.default.temporaryDirectory.appendingPathComponent(
                "gatehouse-\(UUID().uuidString).yaml"
            ).path
            try yaml(upstream.port).write(toFile: path, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(atPath: path) }
            let config = try ConfigLoader.load(path: path, environment: environment)
            var logger = Logger(label: "test")
            logger.logLevel = .critical
            let gateway = Gateway(config: config, reload: { try ConfigLoader.load(path: path) }, logger: logger)
            try await gateway.start()
            let harness = Harness(gateway: gateway, upstream: upstream, configPath: path)
            do {
                try await body(harness)
            } catch {
                await gateway.shutdown()
                throw error
            }
            await gateway.shutdown()
        } catch {
            if given == nil { await upstream.stop() }
            throw error
        }
        // An upstream the caller gave is the caller's to stop.
        if given == nil { await upstream.stop() }
    }

    /// A started gateway on `yaml`, for a test that stops it itself (a drain); quiet logs.
    static func startGateway(_ yaml: String) async throws -> Gateway {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gatehouse-\(UUID().uuidString).yaml")
            .path
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let gateway = Gateway(config: try ConfigLoader.load(path: path), logger: logger)
        try await gateway.start()
        return gateway
    }

    /// A config with one upstream `demo` and the given routes; extra YAML may override `server` settings.
    static func config(
        upstreamPort: Int, server: String = "", upstream: String = "", redis: String = "memory://",
        redisKeyPrefix: String = "gatehouse:", redisExtra: String = "", routes: String
    ) -> String {
        """
        server:
          listen: "127.0.0.1:0"
          threads: 1
          access_log: "off"
        \(server)
        admin:
          listen: "127.0.0.1:0"
          hosts: [test.local]  # the Host that request() sends
        redis:
          url: "\(redis)"
          key_prefix: "\(redisKeyPrefix)"
          command_timeout: 1s  # not the 100 ms default: a loaded test machine would take the Redis-away paths
        \(redisExtra)
        upstreams:
          demo:
            targets: [{ url: "http://127.0.0.1:\(upstreamPort)" }]
        \(upstream)
        routes:
        \(routes)
        """
    }

    /// The common test config: `/status` answered directly, everything else to the demo upstream.
    static func basic(_ upstreamPort: Int) -> String {
        config(
            upstreamPort: upstreamPort,
            routes: """
                  - id: status
                    match: { path: "/status" }
                    respond: { status: 200, body: "ok", headers: { Content-Type: text/plain } }
                  - id: demo
                    match: { path_prefix: "/" }
                    upstream: demo
                """)
    }
}

/// One parsed HTTP/1.1 response.
struct RawResponse {
    var status: Int
    var headers: [(String, String)]
    var body: [UInt8]

    func header(_ name: String) -> String? {
        headers.first { $0.0.lowercased() == name.lowercased() }?.1
    }

    var text: String { String(decoding: body, as: UTF8.self) }

    /// The body as a JSON object.
    var json: [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] ?? [:]
    }
}

/// A raw TCP client that sends exactly the bytes it is given, for requests a polite client would refuse to send.
final class RawConnection {
    private var iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    private var pending: [UInt8] = []
    private(set) var closed = false

    private init(inbound: NIOAsyncChannelInboundStream<ByteBuffer>, outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>)
    {
        iterator = inbound.makeAsyncIterator()
        self.outbound = outbound
    }

    /// Connects to 127.0.0.1:`port`, runs `body`, closes.
    static func with<T>(port: Int, _ body: (RawConnection) async throws -> T) async throws -> T {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        return try await channel.executeThenClose { inbound, outbound in
            try await body(RawConnection(inbound: inbound, outbound: outbound))
        }
    }

    func send(_ text: String) async throws {
        try await outbound.write(ByteBuffer(string: text))
    }

    func send(bytes: [UInt8]) async throws {
        try await outbound.write(ByteBuffer(bytes: bytes))
    }

    /// Reads more bytes; false at end of stream.
    private func fill() async throws -> Bool {
        guard !closed else { return false }
        do {
            guard let buffer = try await iterator.next() else {
                closed = true
                return false
            }
            pending += buffer.readableBytesView
            return true
        } catch {
            closed = true
            return false
        }
    }

    /// Reads the status line and headers of a response, leaving its body unread.
    func readHead() async throws -> RawResponse {
        try await readResponse(headRequest: true)
    }

    /// Reads one whole response. `headRequest` means no body follows the head.
    func readResponse(headRequest: Bool = false) async throws -> RawResponse {
        var headEnd: Int?
        while headEnd == nil {
            headEnd = Self.find([13, 10, 13, 10], in: pending)
            if headEnd == nil, !(try await fill()) { throw RawError.closed(String(decoding: pending, as: UTF8.self)) }
        }
        let headText = String(decoding: pending[..<(headEnd ?? 0)], as: UTF8.self)
        pending.removeFirst((headEnd ?? 0) + 4)
        var lines = headText.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst().split(separator: " ")
        let status = statusLine.count > 1 ? Int(statusLine[1]) ?? 0 : 0
        let headers = lines.compactMap { line -> (String, String)? in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
        }
        var response = RawResponse(status: status, headers: headers, body: [])
        if headRequest || status == 204 || status == 304 || (100..<200).contains(status) { return response }
        if let length = response.header("Content-Length").flatMap(Int.init) {
            while pending.count < length {
                if !(try await fill()) { throw RawError.truncated(pending.count, length) }
            }
            response.body = Array(pending[..<length])
            pending.removeFirst(length)
        } else if response.header("Transfer-Encoding")?.lowercased() == "chunked" {
            while true {
                var lineEnd = Self.find([13, 10], in: pending)
                while lineEnd == nil {
                    if !(try await fill()) { throw RawError.truncated(response.body.count, -1) }
                    lineEnd = Self.find([13, 10], in: pending)
                }
                let sizeText = String(decoding: pending[..<(lineEnd ?? 0)], as: UTF8.self)
                let size = Int(sizeText.split(separator: ";").first ?? "", radix: 16) ?? 0
                pending.removeFirst((lineEnd ?? 0) + 2)
                while pending.count < size + 2 {
                    if !(try await fill()) { throw RawError.truncated(response.body.count, -1) }
                }
                response.body += pending[..<size]
                pending.removeFirst(size + 2)
                if size == 0 { break }
            }
        } else {
            while try await fill() {}
            response.body = pending
            pending = []
        }
        return response
    }

    /// Reads and counts body bytes of a response without keeping them, pausing `pause` every `every` bytes.
    func drainBody(length: Int, every: Int = 256 * 1024, pause: Duration = .zero) async throws -> Int {
        var count = min(pending.count, length)
        pending.removeFirst(count)
        var sincePause = 0
        while count < length {
            guard let buffer = try await iterator.next() else { break }
            count += buffer.readableBytes
            sincePause += buffer.readableBytes
            if sincePause >= every {
                sincePause = 0
                if pause > .zero { try await Task.sleep(for: pause) }
            }
        }
        return count
    }

    /// Bytes received but not read as part of a response.
    var unreadBytes: Int { pending.count }

    /// True when the server closes the connection within `timeout`.
    func waitForClose(timeout: Duration = .seconds(5)) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !(try await fill()) { return true }
        }
        return false
    }

    private static func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        for index in 0...(haystack.count - needle.count) where haystack[index] == needle[0] {
            if Array(haystack[index..<(index + needle.count)]) == needle { return index }
        }
        return nil
    }
}

enum RawError: Error {
    case closed(String)
    case truncated(Int, Int)
}

/// Sends one request on a fresh connection and reads the response.
func request(
    port: Int, _ path: String, method: String = "GET", headers: [(String, String)] = [], body: String? = nil
) async throws -> RawResponse {
    try await RawConnection.with(port: port) { connection in
        var text = "\(method) \(path) HTTP/1.1\r\nHost: test.local\r\n"
        for (name, value) in headers { text += "\(name): \(value)\r\n" }
        if let body { text += "Content-Length: \(body.utf8.count)\r\n" }
        text += "Connection: close\r\n\r\n" + (body ?? "")
        try await connection.send(text)
        return try await connection.readResponse(headRequest: method == "HEAD")
    }
}

/// A free loopback port below the kernel's ephemeral range, for a server a test stops and starts again. A port
/// from that range (what binding port 0 gives) can meanwhile become the source port of any outgoing connection,
/// and then neither a ``PortHold`` nor the restarted server can bind it.
func restartablePort() throws -> Int {
    let range = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8)) ?? ""
    let low = range.split(whereSeparator: \.isWhitespace).first.flatMap { Int($0) } ?? 32768
    // A machine whose ephemeral range starts low has no such ports to spare: any free one then.
    guard low > 21000 else { return PortHold.anyFreePort() }
    for _ in 0..<200 {
        let port = 20000 + nextRestartablePort.add(1, ordering: .relaxed).newValue % (low - 20000)
        if PortHold.canBind(port) { return port }
    }
    throw RawError.closed("no free port below \(low)")
}

private let nextRestartablePort = Atomic<Int>(Int.random(in: 0..<10000))

/// Calls `body` with 127.0.0.1:`port` as a `sockaddr` and its length.
func withLoopbackAddress<T>(port: Int, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
}

/// A loopback port kept bound but not listening, while the server that had it is down: connections to it are
/// refused, and no server another test starts meanwhile can be given it.
final class PortHold: @unchecked Sendable {
    private var fd: Int32

    init(_ port: Int) {
        fd = Self.bound(port)
        if fd < 0 { Issue.record("could not hold port \(port): errno \(errno)") }
    }

    /// True when nothing holds `port` now, not even a connection in TIME_WAIT.
    static func canBind(_ port: Int) -> Bool {
        let fd = bound(port, reuseAddress: false)
        if fd >= 0 { close(fd) }
        return fd >= 0
    }

    /// A port the kernel picks from its ephemeral range.
    static func anyFreePort() -> Int {
        let fd = bound(0)
        defer { close(fd) }
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// A socket bound to 127.0.0.1:`port`, or -1. With `reuseAddress` (as servers bind), a port whose last
    /// connections linger in TIME_WAIT can be bound.
    private static func bound(_ port: Int, reuseAddress: Bool = true) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var yes: Int32 = 1
        if reuseAddress { setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size)) }
        if withLoopbackAddress(port: port, { bind(fd, $0, $1) }) == 0 { return fd }
        close(fd)
        return -1
    }

    /// Lets the port go, for the server to come back on it.
    func release() {
        if fd >= 0 { close(fd) }
        fd = -1
    }

    deinit { release() }

    /// Stops `server` and holds its port until ``release()``.
    static func takeDown(_ server: DemoUpstream) async -> PortHold {
        await server.stop()
        return PortHold(server.port)
    }
}

/// Runs blocking work (a child process to its end) on a thread of its own. Swift's concurrency pool has one
/// thread per core: on a 2-core machine, two tests blocking theirs would stall every other test in the process.
func offThePool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try work() }) }.start()
    }
}

/// Waits until `condition` holds, checking every 5 ms, for at most `timeout`.
func waitUntil(timeout: Duration = .seconds(5), _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while !condition(), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
}

/// A child process (redis-server, the gatehouse binary, openssl) started with `posix_spawn`.
///
/// Not Foundation's `Process`: on Linux its `run()` reads `/proc/self/fd` entries past their end and crashes now
/// and then (swift-corelibs-foundation#5472), which took a whole test run down. The child gets no descriptor of
/// this process but the three standard ones, so it cannot keep a test's socket or port alive.
final class ChildProcess: Sendable {
    let pid: pid_t
    private let exitStatus = Mutex<Int32?>(nil)

    /// Starts `path` with `arguments`; standard output and error go to the given descriptors, or /dev/null.
    init(_ path: String, _ arguments: [String], output: Int32? = nil, error: Int32? = nil) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        for (descriptor, target) in [(output, Int32(1)), (error, Int32(2))] {
            if let descriptor {
                posix_spawn_file_actions_adddup2(&actions, descriptor, target)
            } else {
                posix_spawn_file_actions_addopen(&actions, target, "/dev/null", O_WRONLY, 0)
            }
        }
        guard let closeFrom = Self.addCloseFrom, closeFrom(&actions, 3) == 0 else {
            throw RawError.closed("posix_spawn_file_actions_addclosefrom_np is missing (glibc 2.34 or later)")
        }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, path, &actions, nil, argv, environ)
        guard result == 0 else { throw RawError.closed("posix_spawn \(path): \(String(cString: strerror(result)))") }
        self.pid = pid
    }

    /// Runs `path` to its end; returns its exit status, standard output and error. Both pipes are read at once
    /// (so a child filling one cannot stall while the other is read), each on a thread of its own.
    static func run(_ path: String, _ arguments: [String]) async throws -> (Int32, String, String) {
        let (outRead, outWrite) = try pipe()
        let (errRead, errWrite) = try pipe()
        let child = Result { try ChildProcess(path, arguments, output: outWrite, error: errWrite) }
        // The child has its own copies: the readers see end of file when it exits.
        close(outWrite)
        close(errWrite)
        async let output = offThePool { readAll(outRead) }
        async let error = offThePool { readAll(errRead) }
        return (try await child.get().wait(), try await output, try await error)
    }

    /// Whether the child has not exited yet (it is reaped when it has).
    var isRunning: Bool {
        exitStatus.withLock { status in
            guard status == nil else { return false }
            var raw: Int32 = 0
            guard waitpid(pid, &raw, WNOHANG) == pid else { return true }
            status = Self.decode(raw)
            return false
        }
    }

    /// Waits for the child to exit without blocking a thread of the concurrency pool; returns its exit status
    /// (128 + the signal when a signal ended it).
    func wait() async throws -> Int32 {
        try await offThePool { self.waitBlocking() }
    }

    private func waitBlocking() -> Int32 {
        if let status = exitStatus.withLock({ $0 }) { return status }
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) == -1, errno == EINTR {}
        let status = Self.decode(raw)
        exitStatus.withLock { $0 = $0 ?? status }
        return status
    }

    /// Sends a signal, unless the child was reaped already (its pid may belong to another process by now).
    func signal(_ number: Int32) {
        exitStatus.withLock { status in
            if status == nil { kill(pid, number) }
        }
    }

    /// Waits for the child's exit on a thread of its own, so that it does not stay a zombie.
    func reapInBackground() {
        Thread { _ = self.waitBlocking() }.start()
    }

    private static func decode(_ raw: Int32) -> Int32 {
        let signal = raw & 0x7f
        return signal == 0 ? (raw >> 8) & 0xff : 128 + signal
    }

    /// glibc's `posix_spawn_file_actions_addclosefrom_np`, which Swift's Glibc module does not declare.
    private static let addCloseFrom:
        (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32)? = {
            guard let symbol = dlsym(dlopen(nil, RTLD_NOW), "posix_spawn_file_actions_addclosefrom_np") else {
                return nil
            }
            return unsafeBitCast(
                symbol, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32).self)
        }()

    /// A pipe. (Every child closes all but its standard descriptors, so no child keeps another's pipe open.)
    static func pipe() throws -> (read: Int32, write: Int32) {
        var ends: [Int32] = [0, 0]
        guard Glibc.pipe(&ends) == 0 else { throw RawError.closed("pipe: \(errno)") }
        return (ends[0], ends[1])
    }

    /// Everything until end of file; closes `descriptor`.
    static func readAll(_ descriptor: Int32) -> String {
        var bytes: [UInt8] = []
        read(descriptor) { bytes += $0 }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Hands `each` what `descriptor` gives, chunk by chunk, until end of file; closes it.
    static func read(_ descriptor: Int32, each: (ArraySlice<UInt8>) -> Void) {
        defer { close(descriptor) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = Glibc.read(descriptor, &buffer, buffer.count)
            if count > 0 {
                each(buffer[0..<count])
            } else if count == 0 || errno != EINTR {
                return
            }
        }
    }
}
