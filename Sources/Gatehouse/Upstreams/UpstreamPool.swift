import GatehouseConfig
import Synchronization

/// The targets of one upstream and how the next one is chosen.
///
/// Core balancing is weighted round robin; health, breakers and the other `balance` modes plug in here.
final class UpstreamPool: Sendable {
    let config: UpstreamConfig
    /// Lower-cased request headers never sent to this upstream: `request_headers.remove` and the API-key header.
    let droppedHeaders: Set<String>
    /// Target base URLs, each repeated by its weight, interleaved.
    private let schedule: [String]
    private let next = Atomic<Int>(0)

    init(_ config: UpstreamConfig, apiKeyHeader: String) {
        self.config = config
        droppedHeaders = Set(config.requestHeaders.remove.map { $0.lowercased() } + [apiKeyHeader.lowercased()])
        var schedule: [String] = []
        let maxWeight = config.targets.map(\.weight).max() ?? 1
        for round in 0..<maxWeight {
            for target in config.targets where target.weight > round { schedule.append(target.url) }
        }
        self.schedule = schedule
    }

    /// The base URL of the next target, or nil when there is none.
    func pickTarget() -> String? {
        guard !schedule.isEmpty else { return nil }
        let index = next.wrappingAdd(1, ordering: .relaxed).oldValue
        return schedule[index % schedule.count]
    }
}
