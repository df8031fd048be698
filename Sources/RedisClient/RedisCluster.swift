public import CoreMetrics
public import Logging
public import NIOCore
import Synchronization

/// A Redis Cluster client: a pool (``RedisClient``) per master, and the map of which master serves each hash slot.
///
/// The map comes from `CLUSTER SLOTS`, asked of any node that answers (the seeds first), and is refreshed every
/// few seconds, at once when a node is lost, and when a node answers `MOVED`. A command goes to the master of its
/// key's slot; `MOVED` sends it on to the named node (and updates the map), `ASK` sends it there once with
/// `ASKING` (a slot being migrated), `TRYAGAIN` retries shortly. Commands are pipelined per node by its pool.
public final class RedisCluster: RedisCommands {
    public let configuration: RedisConfiguration
    private let seeds: [RedisConfiguration.Address]
    private let group: EventLoopGroup
    private let logger: Logger
    private let metrics: MetricsFactory?

    private struct State {
        /// The node ("host:port") serving each slot; empty until the first map arrives.
        var owners: [String] = []
        var nodes: [String: RedisClient] = [:]
        var refreshing = false
        /// The refresh asked for by ``refreshSoon()``, awaited by ``close()``.
        var pendingRefresh: Task<Void, Never>?
        /// Pools of nodes that stopped being masters, closed a little later (or by ``close()``).
        var retiring: [ObjectIdentifier: RedisClient] = [:]
        var closed = false
        var lastRefreshError: String?
    }

    private let state = Mutex(State())
    private let timer = Mutex<Task<Void, Never>?>(nil)

    /// `configuration.address` is ignored; `seeds` are the nodes asked for the map first.
    public init(
        configuration: RedisConfiguration, seeds: [RedisConfiguration.Address],
        group: EventLoopGroup, logger: Logger = Logger(label: "gatehouse.redis"), metrics: MetricsFactory? = nil
    ) {
        self.configuration = configuration
        self.seeds = seeds
        self.group = group
        self.logger = logger
        self.metrics = metrics
        let task = Task { [weak self] in
            while let cluster = self, !cluster.state.withLock({ $0.closed }) {
                await cluster.refresh()
                let healthy = cluster.problem == nil
                try? await Task.sleep(for: healthy ? .seconds(5) : .milliseconds(500))
            }
        }
        timer.withLock { $0 = task }
    }

    public var crossesSlots: Bool { false }

    public var isConnected: Bool { problem == nil }

    /// Nil when every slot has a master whose pool is connected; else the first node that is not, or why there is
    /// no map.
    public var problem: String? {
        let (owners, nodes, error) = state.withLock { ($0.owners, $0.nodes, $0.lastRefreshError) }
        guard owners.count == RedisHashSlot.count else {
            return "no cluster map yet" + (error.map { ": " + $0 } ?? "")
        }
        if let uncovered = owners.firstIndex(of: "") { return "slot \(uncovered) has no master" }
        for (name, client) in nodes.sorted(by: { $0.key < $1.key }) where !client.isConnected {
            return "node \(name) " + (client.problem ?? "is not connected")
        }
        return nil
    }

    /// The masters, as "host:port".
    public var masters: [String] { state.withLock { Array($0.nodes.keys).sorted() } }

    public func send(_ arguments: [RedisArgument], key: String?) async throws(RedisError) -> RedisValue {
        do {
            return try await send(arguments, key: key, on: group.next()).get()
        } catch let error as RedisError {
            throw error
        } catch {
            throw RedisError(.connectionLost, "\(error)")
        }
    }

    public func send(_ arguments: [RedisArgument], key: String?, on eventLoop: EventLoop) -> EventLoopFuture<RedisValue>
    {
        let node = state.withLock { state -> String? in
            guard state.owners.count == RedisHashSlot.count else { return nil }
            if let key { return state.owners[RedisHashSlot.of(key)] }
            return state.nodes.keys.first
        }
        guard let node, !node.isEmpty else {
            refreshSoon()
            return eventLoop.makeFailedFuture(RedisError(.unavailable, "no master known for this key yet"))
        }
        return send(arguments, to: node, asking: false, on: eventLoop, redirects: 0)
    }

    /// Sends to `node`, following MOVED, ASK and TRYAGAIN up to five times.
    private func send(
        _ arguments: [RedisArgument], to node: String, asking: Bool, on eventLoop: EventLoop, redirects: Int
    ) -> EventLoopFuture<RedisValue> {
        guard let client = self.client(for: node) else {
            return eventLoop.makeFailedFuture(RedisError(.unavailable, "the cluster client is closed"))
        }
        // A node met for the first time (a new master, a redirection) is given its connect timeout to come up.
        let ready = Self.connected(client, on: eventLoop, within: TimeAmount(configuration.connectTimeout))
        let sent = ready.flatMap {
            asking ? client.sendAsking(arguments, on: eventLoop) : client.send(arguments, on: eventLoop)
        }
        return sent.flatMapError { error in
            guard let error = error as? RedisError else { return eventLoop.makeFailedFuture(error) }
            if error.kind == .unavailable || error.kind == .connectionLost {
                // The node is away (a failover, perhaps): the map is asked for again.
                self.refreshSoon()
                return eventLoop.makeFailedFuture(error)
            }
            guard error.kind == .server, redirects < 5 else { return eventLoop.makeFailedFuture(error) }
            let words = error.message.split(separator: " ")
            switch words.first {
            case "MOVED" where words.count == 3:
                let target = String(words[2])
                if let slot = Int(words[1]), slot >= 0, slot < RedisHashSlot.count {
                    self.state.withLock { state in
                        if state.owners.count == RedisHashSlot.count { state.owners[slot] = target }
                    }
                }
                self.refreshSoon()
                return self.send(arguments, to: target, asking: false, on: eventLoop, redirects: redirects + 1)
            case "ASK" where words.count == 3:
                return self.send(arguments, to: String(words[2]), asking: true, on: eventLoop, redirects: redirects + 1)
            case "TRYAGAIN":
                return eventLoop.scheduleTask(in: .milliseconds(20)) {}.futureResult.flatMap {
                    self.send(arguments, to: node, asking: asking, on: eventLoop, redirects: redirects + 1)
                }
            default:
                return eventLoop.makeFailedFuture(error)
            }
        }
    }

    /// Succeeds once `client` has a connection up, or at `within` (the command then fails as unavailable).
    static func connected(_ client: RedisClient, on eventLoop: EventLoop, within: TimeAmount) -> EventLoopFuture<Void> {
        if client.isConnected { return eventLoop.makeSucceededVoidFuture() }
        let promise = eventLoop.makePromise(of: Void.self)
        let deadline = NIODeadline.now() + within
        let task = eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(5), delay: .milliseconds(5)) { task in
            guard client.isConnected || NIODeadline.now() >= deadline else { return }
            task.cancel()
            promise.succeed(())
        }
        promise.futureResult.whenComplete { _ in task.cancel() }
        return promise.futureResult
    }

    /// The pool for `node`, made on first use; nil once closed (its event loops may be gone).
    private func client(for node: String) -> RedisClient? {
        let (existing, closed) = state.withLock { ($0.nodes[node], $0.closed) }
        if let existing { return existing }
        if closed { return nil }
        var configuration = self.configuration
        configuration.address = Self.address(node) ?? configuration.address
        configuration.database = 0
        configuration.clusterSeeds = []
        // Made under the lock, so that none is made after close() (a pool connects as soon as it exists).
        return state.withLock { state -> RedisClient? in
            if state.closed { return nil }
            if let existing = state.nodes[node] { return existing }
            let made = RedisClient(configuration: configuration, group: group, logger: logger, metrics: metrics)
            state.nodes[node] = made
            return made
        }
    }

    static func address(_ node: String) -> RedisConfiguration.Address? {
        guard let colon = node.lastIndex(of: ":"), let port = Int(node[node.index(after: colon)...]) else {
            return nil
        }
        var host = String(node[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return .tcp(host: host, port: port)
    }

    private func refreshSoon() {
        let start = state.withLock { state -> Bool in
            guard !state.refreshing, !state.closed else { return false }
            state.refreshing = true
            return true
        }
        guard start else { return }
        let task = Task {
            try? await Task.sleep(for: .milliseconds(50))
            await self.refreshNow()
        }
        state.withLock { $0.pendingRefresh = task }
    }

    private func refresh() async {
        let start = state.withLock { state -> Bool in
            guard !state.refreshing else { return false }
            state.refreshing = true
            return true
        }
        if start { await refreshNow() }
    }

    /// Asks the known masters, then the seeds, for `CLUSTER SLOTS` until one answers; installs the map. The pools of
    /// nodes that are no longer masters close a little later (commands in flight there finish or fail first).
    private func refreshNow() async {
        defer { state.withLock { $0.refreshing = false } }
        let known = state.withLock { Array($0.nodes.keys) }.compactMap(Self.address)
        var failures: [String] = []
        for address in known + seeds {
            // Once closed, the event loops may be gone: no more connections.
            if state.withLock({ $0.closed }) { return }
            do {
                let map = try await Self.slots(from: address, configuration: configuration, on: group.next())
                install(map)
                return
            } catch {
                failures.append("\(address): \(error)")
            }
        }
        state.withLock { $0.lastRefreshError = failures.joined(separator: "; ") }
    }

    private func install(_ owners: [String]) {
        let gone = state.withLock { state -> [RedisClient] in
            guard !state.closed else { return [] }
            state.owners = owners
            state.lastRefreshError = nil
            let masters = Set(owners.filter { !$0.isEmpty })
            var gone: [RedisClient] = []
            for (name, client) in state.nodes where !masters.contains(name) {
                gone.append(client)
                state.retiring[ObjectIdentifier(client)] = client
                state.nodes[name] = nil
            }
            return gone
        }
        for node in Set(owners) where !node.isEmpty { _ = client(for: node) }
        for client in gone {
            Task {
                try? await Task.sleep(for: .seconds(2))
                let mine = state.withLock { $0.retiring.removeValue(forKey: ObjectIdentifier(client)) != nil }
                if mine { await client.close() }
            }
        }
    }

    /// `CLUSTER SLOTS` from one node, as the owner of each slot ("" for none).
    static func slots(
        from address: RedisConfiguration.Address, configuration: RedisConfiguration, on eventLoop: EventLoop
    ) async throws -> [String] {
        let channel = try await Reconnector.open(address, configuration, on: eventLoop) {
            try RedisHandler(commandTimeout: .seconds(2))
        }
        defer { channel.close(promise: nil) }
        var commands: [[RedisArgument]] = []
        if let auth = Reconnector.authCommand(configuration) { commands.append(auth) }
        commands.append(["CLUSTER", "SLOTS"])
        let replies = try await Reconnector.ask(channel, commands)
        for reply in replies {
            if case .error(let message) = reply { throw RedisError(.server, message) }
        }
        guard case .array(let ranges?) = replies.last else {
            throw RedisError(.protocolError, "unexpected reply to CLUSTER SLOTS")
        }
        var askedHost = ""
        if case .tcp(let host, _) = address { askedHost = host }
        var owners = [String](repeating: "", count: RedisHashSlot.count)
        for range in ranges {
            guard case .array(let items?) = range, items.count >= 3, let first = items[0].integer,
                let last = items[1].integer, case .array(let master?) = items[2], master.count >= 2,
                let port = master[1].integer, first >= 0, last < RedisHashSlot.count, first <= last
            else { continue }
            // An empty host is the node that answered.
            var host = master[0].string ?? ""
            if host.isEmpty || host == "?" { host = askedHost }
            let node = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            for slot in Int(first)...Int(last) { owners[slot] = node }
        }
        return owners
    }

    public func close() async {
        let pending = state.withLock { state -> Task<Void, Never>? in
            state.closed = true
            return state.pendingRefresh
        }
        let refresher = timer.withLock { $0 }
        refresher?.cancel()
        await refresher?.value
        await pending?.value
        let nodes = state.withLock { state -> [RedisClient] in
            defer { state.retiring = [:] }
            return Array(state.nodes.values) + Array(state.retiring.values)
        }
        for node in nodes { await node.close() }
    }
}
