import Foundation
public import GatehouseConfig
public import Logging
public import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
public import ServiceLifecycle
import Synchronization
import UpstreamClient

/// A running gateway: the client listener, the admin listener, and what they share.
///
/// `start` binds both listeners; `reload` swaps the config atomically; `shutdown` drains and stops. Its parts stop
/// in the reverse of the order they start in (swift-service-lifecycle); as a `Service` it runs until its service
/// group shuts down.
public final class Gateway: Sendable {
    /// Reads the config again, for reloads; nil when there is nothing to re-read.
    private let readConfig: (@Sendable () throws -> GatehouseConfiguration)?
    let core: GatewayCore
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    private let channels = Mutex<(server: Channel?, admin: Channel?)>((nil, nil))
    private let connections = Mutex<[ObjectIdentifier: Channel]>([:])
    private let reloadLock = Mutex(())
    /// The client listener's TLS once started with `server.tls`; reloads read its files again.
    private let edgeTLS = Mutex<EdgeTLS?>(nil)
    /// The parts' service group while the gateway runs, and the task that runs it.
    private let parts = Mutex<(group: ServiceGroup, running: Task<Void, Never>)?>(nil)

    /// The address the client listener is bound to (port 0 in the config picks a free one).
    public var localAddress: SocketAddress? { channels.withLock { $0.server?.localAddress } }
    /// The address the admin listener is bound to.
    public var adminAddress: SocketAddress? { channels.withLock { $0.admin?.localAddress } }

    /// Builds a gateway for `config`; `reload` reads the config again when asked to (SIGHUP, `POST /reload`).
    public init(
        config: GatehouseConfiguration, reload: (@Sendable () throws -> GatehouseConfiguration)? = nil,
        logger: Logger = Logger(label: "gatehouse")
    ) {
        let threads = config.server.threads ?? System.coreCount
        readConfig = reload
        self.logger = logger
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let metrics = GatewayMetrics()
        let runtime = Runtime(config: config, metrics: metrics)
        let accessLog = AccessLog.open(config.server.accessLog)
        if accessLog == nil, config.server.accessLog != "off" {
            logger.error(
                "cannot open the access log; requests are not logged", metadata: ["path": "\(config.server.accessLog)"])
        }
        let upstream = UpstreamClient(threads: threads)
        let exportLoop = group.next()
        let tracing = config.tracing.map {
            GatewayTracing($0, client: upstream, eventLoop: exportLoop, factory: metrics.factory)
        }
        core = GatewayCore(
            runtime: runtime, upstream: upstream,
            store: SharedStores.make(config.redis, group: group, logger: logger, metrics: metrics),
            loops: group.makeIterator().map { $0 }, metrics: metrics, accessLog: accessLog, tracing: tracing,
            logger: logger)
    }

    /// Starts the parts in order: health checks, the admin listener, the client listener (the store and the
    /// upstream client run from `init`). A part that cannot start (a port in use) throws here, and what started
    /// before it is stopped again.
    public func start() async throws {
        let runtime = core.runtime
        for warning in runtime.config.warnings { logger.warning("config: \(warning)") }
        let config = runtime.config
        // JWT issuers' keys first, so the first requests do not wait for them (a failure is logged; requests
        // then load them on demand).
        try? await core.authenticator.jwt.preload(config.auth.jwt, on: group.next()).get()
        // Redis's TLS files were read in `init`; one that cannot be used stops the start here (the store fell back).
        _ = try SharedStores.redisConfiguration(config.redis)
        let tls = try config.server.tls.map { try EdgeTLS($0, http2: config.server.http2) }
        edgeTLS.withLock { $0 = tls }
        for pool in runtime.pools { pool.startHealthChecks(client: core.upstream, on: group.next()) }
        let admin: Channel
        let server: Channel
        do {
            admin = try await AdminServer.bind(gateway: self, group: group, address: config.admin.listen)
            do {
                server = try await bindServer(config: config, tls: tls)
            } catch {
                try? await admin.close()
                throw error
            }
        } catch {
            for pool in runtime.pools { pool.stopHealthChecks() }
            throw error
        }
        channels.withLock { $0 = (server, admin) }
        let services = ServiceGroup(
            configuration: ServiceGroupConfiguration(services: stopSteps(server: server, admin: admin), logger: logger))
        parts.withLock { $0 = (services, Task { try? await services.run() }) }
        logger.info(
            "gatehouse listening",
            metadata: [
                "listen": "\(server.localAddress?.description ?? "?")",
                "admin": "\(admin.localAddress?.description ?? "?")",
                "tls": "\(tls != nil)",
            ])
    }

    private func bindServer(config: GatehouseConfiguration, tls: EdgeTLS?) async throws -> Channel {
        let core = self.core
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 32 * 1024, high: 256 * 1024))
            .childChannelInitializer { [weak self] channel in
                self?.track(channel)
                return channel.eventLoop.makeCompletedFuture {
                    try ClientPipelines.configure(channel, core: core, tls: tls?.context)
                }
            }
        return try await bootstrap.bind(host: config.server.listen.host, port: config.server.listen.port).get()
    }

    /// The answers written to client connections that the kernel has not taken yet, in bytes, summed over every
    /// open connection: what clients that do not read make the gateway hold.
    func bufferedAnswerBytes() async -> Int {
        var total = 0
        for channel in connections.withLock({ Array($0.values) }) {
            total += (try? await channel.getOption(.bufferedWritableBytes).get()) ?? 0
        }
        return total
    }

    private func track(_ channel: Channel) {
        let id = ObjectIdentifier(channel)
        connections.withLock { $0[id] = channel }
        channel.closeFuture.whenComplete { [weak self] _ in
            _ = self?.connections.withLock { $0.removeValue(forKey: id) }
        }
    }

    /// Reads the config again and swaps it in. Throws ``ConfigErrors`` and keeps the old config on failure.
    public func reload() throws {
        guard let readConfig else { return }
        try reloadLock.withLock { _ in try apply(readConfig()) }
    }

    /// Swaps in a new config. Listener addresses and thread counts only change on restart.
    public func apply(_ config: GatehouseConfiguration) throws {
        let oldRuntime = core.runtime
        let old = oldRuntime.config
        if old.server.listen != config.server.listen || old.admin.listen != config.admin.listen {
            logger.warning("listen addresses change only on restart; the old ones stay bound")
        }
        if (old.server.tls == nil) != (config.server.tls == nil) || old.server.threads != config.server.threads
            || old.server.accessLog != config.server.accessLog
            || old.tracing?.otlpEndpoint != config.tracing?.otlpEndpoint
            || old.tracing?.sampleRatio != config.tracing?.sampleRatio
            || old.tracing?.serviceName != config.tracing?.serviceName
        {
            logger.warning(
                "turning server.tls on or off, server.threads, server.access_log and tracing change only on restart")
        }
        // Certificates are read again on every reload (a renewal keeps its file names); files that cannot be used
        // fail the reload and the old config stays.
        if let files = config.server.tls, let tls = edgeTLS.withLock({ $0 }) {
            try tls.reload(files, http2: config.server.http2)
        }
        if old.redis.url != config.redis.url || old.redis.poolSize != config.redis.poolSize
            || old.redis.keyPrefix != config.redis.keyPrefix
        {
            logger.warning("the redis section changes only on restart")
        }
        let runtime = Runtime(config: config, metrics: core.metrics, previous: oldRuntime)
        for warning in runtime.config.warnings { logger.warning("config: \(warning)") }
        _ = core.authenticator.jwt.preload(config.auth.jwt, on: group.next())
        for pool in runtime.pools { pool.startHealthChecks(client: core.upstream, on: group.next()) }
        for pool in oldRuntime.pools { pool.stopHealthChecks() }
        core.swap(to: runtime)
        logger.info("config reloaded", metadata: ["routes": "\(config.routes.count)"])
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain_timeout`, then stops every part in the
    /// reverse of its start order, and the event loops last.
    public func shutdown() async {
        if let running = parts.withLock({ $0 }) {
            logger.info("draining")
            await running.group.triggerGracefulShutdown()
            await running.running.value
            parts.withLock { $0 = nil }
        } else {
            // Never started (or its start failed): what `init` made still stops.
            await Self.stopUpstreamClient(core)
            await Self.stopStore(core)
        }
        try? await group.shutdownGracefully()
    }

    /// What stops each part, in the order the parts start; the service group stops them in reverse: clients are
    /// drained while health checks, the admin API, the upstream client and the store still serve them; token
    /// requests under way complete while the event loops still run to deliver their answers; the span exporter
    /// sends what the drain traced while the upstream client still runs.
    private func stopSteps(server: Channel, admin: Channel) -> [ServiceGroupConfiguration.ServiceConfiguration] {
        let core = self.core
        var services: [any Service] = [
            StopStep(name: "store and access log") { await Self.stopStore(core) },
            StopStep(name: "upstream client") { await Self.stopUpstreamClient(core) },
        ]
        if let tracing = core.tracing { services.append(tracing.exporter) }
        services += [
            StopStep(name: "health checks") { for pool in core.runtime.pools { pool.stopHealthChecks() } },
            // Stopped before the health checks, so that no reload through it starts them again.
            StopStep(name: "admin API") { try? await admin.close() },
            StopStep(name: "client listener") { [self] in
                try? await server.close()
                await drainConnections()
            },
        ]
        return services.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) }
    }

    private static func stopStore(_ core: GatewayCore) async {
        await core.rateLimiter.close()
        await core.store.close()
        core.accessLog?.close()
    }

    private static func stopUpstreamClient(_ core: GatewayCore) async {
        let acquisitions = core.oauth2.cancelAcquisitions()
        core.upstream.shutdown()
        for acquisition in acquisitions { await acquisition.value }
    }

    /// Asks every open connection to close after its current request, waits up to `drain_timeout`, then closes
    /// what is left.
    private func drainConnections() async {
        for channel in connections.withLock({ Array($0.values) }) {
            // HTTP/1.1 connections close after their current request; HTTP/2 ones send GOAWAY and close when
            // their streams are done.
            channel.pipeline.fireUserInboundEventTriggered(DrainEvent())
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        let deadline = ContinuousClock.now + .nanoseconds(core.runtime.config.server.drainTimeout.nanoseconds)
        while ContinuousClock.now < deadline, !connections.withLock({ $0.isEmpty }) {
            try? await Task.sleep(for: .milliseconds(20))
        }
        for channel in connections.withLock({ Array($0.values) }) { try? await channel.close() }
    }

    /// Readiness for `/readyz`: nil when ready, otherwise what is wrong.
    var readinessProblem: String? { core.store.problem }
}

extension Gateway: Service {
    /// Runs the gateway until its service group shuts down gracefully (SIGTERM or SIGINT for `gatehouse serve`).
    public func run() async throws {
        try await start()
        try? await gracefulShutdown()
        await shutdown()
    }
}

/// One part of a running gateway as a service: it started before its group runs, and `stop` ends it when the group
/// shuts down gracefully (or is cancelled).
private struct StopStep: Service, CustomStringConvertible {
    let name: String
    let stop: @Sendable () async -> Void

    /// How the service group's log lines name it.
    var description: String { name }

    func run() async throws {
        try? await gracefulShutdown()
        await stop()
    }
}
