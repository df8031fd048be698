import Foundation
import Testing

/// A real peer written in Python (`Tests/peers/`): a gRPC or WebSocket server the tests start on a free port,
/// and its client, run once per call.
final class PythonPeer: Sendable {
    /// `Tests/peers/<name>`.
    static func script(_ name: String) -> String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("peers/\(name)").path
    }

    let process: ChildProcess
    let port: Int

    /// Starts `script server PORT extra...` and waits for it to print "ready". A server that exits without it
    /// (the free port it was given was taken meanwhile) is started again on another, up to three times.
    init(_ script: String, extra: [String] = []) async throws {
        var attempt = 0
        while true {
            attempt += 1
            let port = PortHold.anyFreePort()
            let (read, write) = try ChildProcess.pipe()
            let process = try ChildProcess(
                "/usr/bin/env", ["python3", Self.script(script), "server", String(port)] + extra, output: write)
            close(write)
            let line = try await offThePool { () -> String in
                var text = ""
                var byte: UInt8 = 0
                while Glibc.read(read, &byte, 1) == 1, byte != 10 { text.append(Character(Unicode.Scalar(byte))) }
                close(read)
                return text
            }
            if line == "ready" {
                self.port = port
                self.process = process
                return
            }
            process.signal(SIGKILL)
            _ = try? await process.wait()
            guard attempt < 3 else { throw RawError.closed("\(script) server: \(line)") }
        }
    }

    func stop() async {
        process.signal(SIGKILL)
        _ = try? await process.wait()
    }

    /// Runs `body` with a server of `script`, and stops it however `body` ends.
    static func with(
        _ script: String, extra: [String] = [], _ body: (PythonPeer) async throws -> Void
    ) async throws {
        let peer = try await PythonPeer(script, extra: extra)
        do {
            try await body(peer)
        } catch {
            await peer.stop()
            throw error
        }
        await peer.stop()
    }

    /// Runs `script client arguments...`, which prints one JSON object.
    static func client(_ script: String, _ arguments: [String]) async throws -> [String: Any] {
        let (status, out, error) = try await ChildProcess.run(
            "/usr/bin/env", ["python3", Self.script(script), "client"] + arguments)
        #expect(status == 0, "\(script) client: \(error)")
        return (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any]
            ?? ["error": "no JSON: \(out) \(error)"]
    }
}
