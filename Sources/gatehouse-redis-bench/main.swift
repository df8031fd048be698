import Foundation
import Logging
import RedisClient
import Synchronization

/// Measures RedisClient: SET and GET of one value size at given concurrencies, printed as
/// `op,concurrency,requests_per_second` lines for Scripts/bench to set beside redis-benchmark.
///
/// Usage: gatehouse-redis-bench PORT REQUESTS SIZE CONCURRENCY...
let arguments = CommandLine.arguments.dropFirst().compactMap { Int($0) }
guard arguments.count >= 4 else {
    FileHandle.standardError.write(Data("usage: gatehouse-redis-bench PORT REQUESTS SIZE CONCURRENCY...\n".utf8))
    exit(2)
}
let (port, requests, size) = (arguments[0], arguments[1], arguments[2])
var configuration = RedisConfiguration(address: .tcp(host: "127.0.0.1", port: port))
configuration.commandTimeout = .seconds(5)
var logger = Logger(label: "bench")
logger.logLevel = .error
let client = RedisClient(configuration: configuration, logger: logger)
while !client.isConnected { try await Task.sleep(for: .milliseconds(10)) }
let value = [UInt8](repeating: 0x78, count: size)

/// How many operations the tasks of one measurement have taken.
final class Issued: Sendable {
    let count = Atomic<Int>(0)
}

/// Runs `requests` operations from `concurrency` tasks; returns requests per second.
func measure(concurrency: Int, _ operation: @escaping @Sendable (Int) async throws -> Void) async throws -> Double {
    let issued = Issued()
    let started = ContinuousClock.now
    try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<concurrency {
            group.addTask {
                while true {
                    let index = issued.count.wrappingAdd(1, ordering: .relaxed).oldValue
                    if index >= requests { return }
                    try await operation(index)
                }
            }
        }
        try await group.waitForAll()
    }
    let elapsed = ContinuousClock.now - started
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    return Double(requests) / seconds
}

for concurrency in arguments.dropFirst(3) {
    let sets = try await measure(concurrency: concurrency) { index in
        try await client.set("bench:\(index % 1000)", value)
    }
    print("set,\(concurrency),\(Int(sets))")
    let gets = try await measure(concurrency: concurrency) { index in
        _ = try await client.get("bench:\(index % 1000)")
    }
    print("get,\(concurrency),\(Int(gets))")
}
await client.close()
