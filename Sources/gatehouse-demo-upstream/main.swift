import DemoUpstream
import Foundation
import NIOCore

/// Runs the demo upstream on the port given as the first argument (default 9001) until killed.
let port = CommandLine.arguments.dropFirst().first.flatMap(Int.init) ?? 9001
let upstream = try await DemoUpstream.start(host: "127.0.0.1", port: port)
print("demo upstream listening on 127.0.0.1:\(upstream.port)")
try await upstream.channel.closeFuture.get()
