import ArgumentParser
import Crypto
import Foundation
import Gatehouse
import GatehouseConfig
import Logging
import ServiceLifecycle
import UnixSignals

/// The `gatehouse` command line (SPEC §1).
@main
struct GatehouseCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gatehouse",
        abstract: "An API gateway: routing, auth, rate limits and a Redis-backed cache in front of your services.",
        version: GatehouseVersion.current,
        subcommands: [Serve.self, Check.self, HashKey.self]
    )
}

/// `gatehouse serve`: runs the gateway until SIGTERM or SIGINT; SIGHUP reloads the config.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the gateway.")

    @Option(help: "Path to the config file.")
    var config: String = "config/gatehouse.yaml"

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func run() async throws {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("unknown log level \"\(logLevel)\"")
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "gatehouse")
        let loaded: GatehouseConfiguration
        do {
            loaded = try ConfigLoader.load(path: config)
        } catch {
            FileHandle.standardError.write(Data("\(error)\n".utf8))
            throw ExitCode(1)
        }
        let path = config
        let gateway = Gateway(config: loaded, reload: { try ConfigLoader.load(path: path) }, logger: logger)
        // SIGTERM and SIGINT shut the group down gracefully: the reloader stops, then the gateway drains.
        let services = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [gateway, ReloadOnHangup(gateway: gateway, logger: logger)],
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await services.run()
        logger.info("stopped")
    }
}

/// Reloads the config on SIGHUP, until the gateway shuts down.
struct ReloadOnHangup: Service {
    let gateway: Gateway
    let logger: Logger

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            do {
                try gateway.reload()
            } catch {
                logger.error("reload rejected; the old config stays", metadata: ["errors": "\(error)"])
            }
        }
    }
}

/// `gatehouse check`: validates a config and prints a summary or every error.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Validate a config file.")

    @Option(help: "Path to the config file.")
    var config: String = "config/gatehouse.yaml"

    func run() throws {
        do {
            let loaded = try ConfigLoader.load(path: config)
            print(ConfigSummary.text(loaded, path: config))
        } catch let errors as ConfigErrors {
            for issue in errors.issues { FileHandle.standardError.write(Data("\(issue)\n".utf8)) }
            FileHandle.standardError.write(Data("\(errors.issues.count) error(s); config rejected\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// `gatehouse hash-key KEY`: prints the `sha256:<hex>` form for `consumers[].api_keys`.
struct HashKey: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hash-key", abstract: "Print the sha256 form of an API key.")

    @Argument(help: "The API key.")
    var key: String

    func run() {
        let digest = SHA256.hash(data: Data(key.utf8))
        print("sha256:" + digest.map { String(format: "%02x", $0) }.joined())
    }
}
