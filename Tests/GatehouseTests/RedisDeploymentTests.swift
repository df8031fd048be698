import DemoUpstream
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import Gatehouse
@testable import RedisClient

/// The Redis that production runs, with real servers: TLS-only (with a CA the test makes, and one that wants client
/// certificates), an ACL user, and a master with a replica behind three sentinels, failed over under load.
@Suite(.serialized) struct RedisDeploymentTests {
    /// A CA, a server certificate it signed for the name redis.internal only (no address), and a client certificate
    /// it signed.
    struct Certificates {
        let directory: String
        var ca: String { directory + "/ca.pem" }
        var serverCert: String { directory + "/server.pem" }
        var serverKey: String { directory + "/server.key" }
        var clientCert: String { directory + "/client.pem" }
        var clientKey: String { directory + "/client.key" }

        static func make() async throws -> Certificates {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-redis-tls-\(UUID())").path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let made = Certificates(directory: directory)
            let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            try await openssl(
                ["req", "-x509"] + ec + [
                    "-days", "1", "-subj", "/CN=test CA", "-keyout", directory + "/ca.key", "-out", made.ca,
                ])
            for (name, san) in [
                ("server", "subjectAltName=DNS:redis.internal"), ("client", "extendedKeyUsage=clientAuth"),
            ] {
                try await openssl(
                    ["req"] + ec + [
                        "-subj", "/CN=\(name)", "-keyout", "\(directory)/\(name).key", "-out",
                        "\(directory)/\(name).csr",
                    ])
                try "\(san)\n".write(toFile: "\(directory)/\(name).ext", atomically: true, encoding: .utf8)
                try await openssl([
                    "x509", "-req", "-in", "\(directory)/\(name).csr", "-CA", made.ca, "-CAkey", directory + "/ca.key",
                    "-CAcreateserial", "-days", "1", "-extfile", "\(directory)/\(name).ext", "-out",
                    "\(directory)/\(name).pem",
                ])
            }
            return made
        }

        private static func openssl(_ arguments: [String]) async throws {
            let (status, _, error) = try await ChildProcess.run("/usr/bin/openssl", arguments)
            guard status == 0 else { throw RawError.closed("openssl \(arguments.first ?? ""): \(error)") }
        }

        /// `redis-server` arguments for a TLS-only server on `port`.
        func serverArguments(_ port: Int, clientCertificates: Bool) -> [String] {
            [
                "--port", "0", "--tls-port", String(port), "--tls-cert-file", serverCert, "--tls-key-file", serverKey,
                "--tls-ca-cert-file", ca, "--tls-auth-clients", clientCertificates ? "yes" : "no",
            ]
        }
    }

    /// A gateway on `url` whose `/limited` route counts in Redis (2 per minute); `extra` goes under `redis:`.
    static func yaml(_ url: String, _ extra: String = "", prefix: String = "gh-deploy:") -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port, redis: url, redisKeyPrefix: prefix, redisExtra: extra,
                routes: """
                      - { id: limited, match: { path_prefix: "/limited" }, upstream: demo, rate_limit: [two] }
                    rate_limits:
                      two: { requests: 2, per: 1m, by: ip, on_redis_error: allow }
                    """)
        }
    }

    /// The gateway reaches Redis (readiness) and counts there: the third request in a minute is refused.
    static func expectCountsInRedis(_ h: Harness) async throws {
        try await waitUntil(timeout: .seconds(10)) { h.gateway.readinessProblem == nil }
        var statuses: [Int] = []
        for _ in 0..<3 { statuses.append(try await request(port: h.port, "/limited/x").status) }
        #expect(statuses == [200, 200, 429])
    }

    @Test func tlsOnlyRedisWithTheTestsCA() async throws {
        let certificates = try await Certificates.make()
        let server = try await RedisServerProcess { certificates.serverArguments($0, clientCertificates: false) }
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let ca = "ca_file: \"\(certificates.ca)\""
        try await Harness.run(Self.yaml(url, "  tls: { \(ca), server_name: redis.internal }")) { h in
            try await Self.expectCountsInRedis(h)
        }
        // Verification is on by default: without the CA, the server's certificate is refused and Redis is away
        // (the route's on_redis_error: allow lets requests through meanwhile).
        try await Harness.run(Self.yaml(url, "  tls: { server_name: redis.internal }")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "a certificate from an unknown CA was accepted")
            #expect(try await request(port: h.port, "/limited/x").status == 200, "on_redis_error: allow")
        }
        // The name checked is the host connected to unless server_name says otherwise: 127.0.0.1 is not in the
        // certificate.
        try await Harness.run(Self.yaml(url, "  tls: { \(ca) }")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "a certificate for another name was accepted")
        }
        // verify: false takes any certificate.
        try await Harness.run(Self.yaml(url, "  tls: { verify: false }", prefix: "gh-deploy-any:")) { h in
            try await Self.expectCountsInRedis(h)
        }
        _ = server
    }

    @Test func tlsRedisThatWantsAClientCertificate() async throws {
        let certificates = try await Certificates.make()
        let server = try await RedisServerProcess { certificates.serverArguments($0, clientCertificates: true) }
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let ca = "ca_file: \"\(certificates.ca)\", server_name: redis.internal"
        let client = "cert: \"\(certificates.clientCert)\", key: \"\(certificates.clientKey)\""
        try await Harness.run(Self.yaml(url, "  tls: { \(ca), \(client) }")) { h in
            try await Self.expectCountsInRedis(h)
        }
        try await Harness.run(Self.yaml(url, "  tls: { \(ca) }")) { h in
            try await Task.sleep(for: .milliseconds(700))
            #expect(h.gateway.readinessProblem != nil, "connected without a client certificate")
        }
        _ = server
    }

    @Test func anACLUserWithAPassword() async throws {
        let server = try await RedisServerProcess(arguments: [
            "--user", "default", "off", "--user", "gatehouse", "on", ">s3cret", "~*", "&*", "+@all",
        ])
        try await Harness.run(Self.yaml("redis://gatehouse:wrong@127.0.0.1:\(server.port)/0")) { h in
            try await Task.sleep(for: .milliseconds(700))
            let problem = h.gateway.readinessProblem ?? ""
            #expect(problem.contains("WRONGPASS"), "a wrong password was accepted, or not said: \(problem)")
        }
        try await Harness.run(Self.yaml("redis://gatehouse:s3cret@127.0.0.1:\(server.port)/0")) { h in
            try await Self.expectCountsInRedis(h)
            // /readyz names the server that went away.
            await server.kill()
            try await waitUntil { h.gateway.readinessProblem != nil }
            let problem = h.gateway.readinessProblem ?? ""
            #expect(problem.contains("last connected to 127.0.0.1:\(server.port)"), "\(problem)")
            let ready = try await request(port: h.adminPort, "/readyz")
            #expect(ready.status == 503 && ready.text.contains("127.0.0.1:\(server.port)"), "\(ready.text)")
        }
        _ = server
    }

    /// `redis-cli -p port args...`, its output trimmed.
    static func cli(_ port: Int, _ arguments: [String]) async throws -> String {
        let (_, out, _) = try await ChildProcess.run("/usr/bin/redis-cli", ["-p", String(port)] + arguments)
        return out.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A sentinel on a free port watching the master `main` at `masterPort` (quorum 2, down after 1 s).
    static func startSentinel(masterPort: Int) throws -> (port: Int, process: ChildProcess) {
        let port = PortHold.anyFreePort()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-sentinel-\(UUID())").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var config = """
            port \(port)
            bind 127.0.0.1
            dir \(directory)
            sentinel monitor main 127.0.0.1 \(masterPort) 2
            sentinel down-after-milliseconds main 1000
            sentinel failover-timeout main 5000

            """
        if let tests = ProcessInfo.processInfo.environment["GATEHOUSE_TEST_TMPDIR"] {
            config += "pidfile \(tests)/test-redis-\(port).pid\n"
        }
        let file = directory + "/sentinel.conf"
        try config.write(toFile: file, atomically: true, encoding: .utf8)
        return (port, try ChildProcess("/usr/bin/redis-server", [file, "--sentinel"]))
    }

    @Test func sentinelFailoverUnderLoad() async throws {
        let master = try await RedisServerProcess()
        let replica = try await RedisServerProcess(arguments: ["--replicaof", "127.0.0.1", String(master.port)])
        var sentinels: [(port: Int, process: ChildProcess)] = []
        defer {
            for sentinel in sentinels {
                sentinel.process.signal(SIGKILL)
                sentinel.process.reapInBackground()
            }
        }
        for _ in 0..<3 { sentinels.append(try Self.startSentinel(masterPort: master.port)) }
        // The sentinels know the replica and each other before anything fails over.
        let ready = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < ready {
            let replicas = try await Self.cli(sentinels[0].port, ["SENTINEL", "replicas", "main"])
            let peers = try await Self.cli(sentinels[0].port, ["SENTINEL", "sentinels", "main"])
            let link = try await Self.cli(replica.port, ["INFO", "replication"])
            if replicas.contains(String(replica.port)), peers.components(separatedBy: "runid").count > 2,
                link.contains("master_link_status:up")
            {
                break
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        let url = "redis-sentinel://" + sentinels.map { "127.0.0.1:\($0.port)" }.joined(separator: ",") + "/0#main"
        let yaml = { (port: Int) in
            Harness.config(
                upstreamPort: port, redis: url, redisKeyPrefix: "gh-sentinel:",
                routes: """
                      - { id: roomy, match: { path_prefix: "/roomy" }, upstream: demo, rate_limit: [roomy] }
                      - { id: after, match: { path_prefix: "/after" }, upstream: demo, rate_limit: [after] }
                    rate_limits:
                      roomy: { requests: 1000000, per: 1m, by: ip, on_redis_error: allow }
                      after: { requests: 100, per: 1h, by: ip, on_redis_error: allow }
                    """)
        }
        try await Harness.run(yaml) { h in
            try await waitUntil(timeout: .seconds(10)) { h.gateway.readinessProblem == nil }
            #expect(h.gateway.readinessProblem == nil)
            // Load from four clients while a sentinel fails the master over to the replica.
            let stop = ContinuousClock.now + .seconds(8)
            async let load: [Int] = withThrowingTaskGroup(of: [Int].self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        var statuses: [Int] = []
                        while ContinuousClock.now < stop {
                            statuses.append(try await request(port: h.port, "/roomy/x").status)
                        }
                        return statuses
                    }
                }
                return try await group.reduce(into: []) { $0 += $1 }
            }
            try await Task.sleep(for: .seconds(1))
            #expect(try await Self.cli(sentinels[0].port, ["SENTINEL", "FAILOVER", "main"]) == "OK")
            let switched = ContinuousClock.now + .seconds(15)
            while ContinuousClock.now < switched {
                let address = try await Self.cli(sentinels[1].port, ["SENTINEL", "get-master-addr-by-name", "main"])
                if address.hasSuffix(String(replica.port)) { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            let statuses = try await load
            #expect(!statuses.isEmpty && statuses.allSatisfy { $0 == 200 }, "\(Set(statuses)) of \(statuses.count)")
            // The gateway followed: it writes to the new master, and the old one (now a replica) takes no writes.
            try await waitUntil(timeout: .seconds(10)) { h.gateway.readinessProblem == nil }
            for _ in 0..<3 { _ = try await request(port: h.port, "/after/x") }
            // (The old master is still a master until a sentinel next looks at it, up to 10 s: writes must not go
            // there meanwhile.)
            let pattern = ["--scan", "--pattern", "gh-sentinel:rl:after:*"]
            #expect(try await !Self.cli(replica.port, pattern).isEmpty, "no limit key was written on the new master")
            #expect(try await Self.cli(master.port, pattern).isEmpty, "a limit key was written on the old master")
        }
        _ = (master, replica)
    }

    /// Six redis-servers in cluster mode made into three masters with a replica each (`redis-cli --cluster create`).
    final class Cluster {
        let servers: [RedisServerProcess]
        var ports: [Int] { servers.map(\.port) }

        init() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-cluster-\(UUID())").path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            var servers: [RedisServerProcess] = []
            while servers.count < 6 {
                let server = try await RedisServerProcess { port in
                    [
                        "--cluster-enabled", "yes", "--cluster-config-file", "\(directory)/nodes-\(port).conf",
                        "--cluster-node-timeout", "2000", "--dir", directory,
                    ]
                }
                // Its cluster bus (port + 10000) may be taken, and the server then exits: another port then.
                try await Task.sleep(for: .milliseconds(100))
                if RedisServerProcess.accepts(server.port), RedisServerProcess.accepts(server.port + 10000) {
                    servers.append(server)
                }
            }
            self.servers = servers
            let (status, out, error) = try await ChildProcess.run(
                "/usr/bin/redis-cli",
                ["--cluster", "create"] + servers.map { "127.0.0.1:\($0.port)" } + [
                    "--cluster-replicas", "1", "--cluster-yes",
                ])
            guard status == 0 else { throw RawError.closed("redis-cli --cluster create: \(out) \(error)") }
            let deadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < deadline {
                var ok = true
                for server in servers {
                    let info = try await RedisDeploymentTests.cli(server.port, ["CLUSTER", "INFO"])
                    if !info.contains("cluster_state:ok") { ok = false }
                }
                if ok { return }
                try await Task.sleep(for: .milliseconds(200))
            }
            throw RawError.closed("the cluster did not become ok")
        }

        var url: String { "redis-cluster://" + ports.prefix(3).map { "127.0.0.1:\($0)" }.joined(separator: ",") }

        /// The node id and port of the master serving `slot`.
        func master(of slot: Int) async throws -> (id: String, port: Int) {
            let nodes = try await RedisDeploymentTests.cli(ports[0], ["CLUSTER", "NODES"])
            for line in nodes.split(separator: "\n") {
                let fields = line.split(separator: " ")
                guard fields.count >= 9, fields[2].contains("master") else { continue }
                let port = Int(fields[1].split(separator: ":")[1].split(separator: "@")[0]) ?? 0
                for range in fields[8...] {
                    let bounds = range.split(separator: "-").compactMap { Int($0) }
                    if bounds.count == 2, (bounds[0]...bounds[1]).contains(slot) { return (String(fields[0]), port) }
                    if bounds.count == 1, bounds[0] == slot { return (String(fields[0]), port) }
                }
            }
            throw RawError.closed("no master serves slot \(slot)")
        }

        /// The first key on a master that matches `pattern`.
        func firstKey(matching pattern: String) async throws -> String? {
            for port in ports where try await RedisDeploymentTests.cli(port, ["ROLE"]).hasPrefix("master") {
                let found = try await RedisDeploymentTests.cli(port, ["--scan", "--pattern", pattern])
                if let key = found.split(separator: "\n").first { return String(key) }
            }
            return nil
        }

        /// Waits until every node agrees on the slots (`redis-cli --cluster check`), up to 15 s.
        func settle() async throws {
            let deadline = ContinuousClock.now + .seconds(15)
            while ContinuousClock.now < deadline {
                let (status, _, _) = try await ChildProcess.run(
                    "/usr/bin/redis-cli", ["--cluster", "check", "127.0.0.1:\(ports[0])"])
                if status == 0 { return }
                try await Task.sleep(for: .milliseconds(200))
            }
        }

        /// The port of the node `id`.
        func portOf(_ id: String) async throws -> Int {
            let nodes = try await RedisDeploymentTests.cli(ports[0], ["CLUSTER", "NODES"])
            for line in nodes.split(separator: "\n") where line.hasPrefix(id) {
                let fields = line.split(separator: " ")
                if let port = Int(fields[1].split(separator: ":")[1].split(separator: "@")[0]) { return port }
            }
            throw RawError.closed("no node \(id)")
        }

        /// The ids of the masters.
        func masterIDs() async throws -> [String] {
            let nodes = try await RedisDeploymentTests.cli(ports[0], ["CLUSTER", "NODES"])
            return nodes.split(separator: "\n").map { $0.split(separator: " ") }
                .filter { $0.count >= 3 && $0[2].contains("master") && !$0[2].contains("fail") }.map { String($0[0]) }
        }
    }

    static func clusterYAML(_ url: String, prefix: String) -> (Int) -> String {
        { port in
            Harness.config(
                upstreamPort: port,
                upstream: """
                      tokened:
                        targets: [{ url: "http://127.0.0.1:\(port)" }]
                        oauth2:
                          token_url: "http://127.0.0.1:\(port)/oauth/token"
                          client_id: demo-client
                          client_secret: demo-secret
                    """, redis: url, redisKeyPrefix: prefix,
                routes: """
                      - { id: shared, match: { path_prefix: "/shared" }, upstream: demo, rate_limit: [five] }
                      - { id: private, match: { path_prefix: "/private" }, upstream: demo, auth: required }
                      - { id: cached, match: { path_prefix: "/cached" }, upstream: demo, cache: { ttl: 5m } }
                      - { id: roomy, match: { path_prefix: "/roomy" }, upstream: demo, rate_limit: [roomy] }
                      - { id: tokened, match: { path_prefix: "/protected" }, upstream: tokened }
                    consumers:
                      - { id: partner-7 }
                    rate_limits:
                      five: { requests: 5, per: 1h, by: route }
                      roomy: { requests: 1000000, per: 1m, by: ip, on_redis_error: allow }
                    """)
        }
    }

    @Test func aClusterServesTwoGatewaysThroughAReshardAndAFailover() async throws {
        let cluster = try await Cluster()
        let prefix = "gh-cluster-\(UUID().uuidString.prefix(6)):"
        try await Harness.run(Self.clusterYAML(cluster.url, prefix: prefix)) { a in
            try await Harness.run(Self.clusterYAML(cluster.url, prefix: prefix)) { b in
                try await waitUntil(timeout: .seconds(10)) {
                    a.gateway.readinessProblem == nil && b.gateway.readinessProblem == nil
                }
                #expect(a.gateway.readinessProblem == nil, "\(a.gateway.readinessProblem ?? "")")
                // Two gateways on the cluster together allow exactly the policy's quota.
                var allowed = 0
                for index in 0..<10 {
                    let port = index.isMultiple(of: 2) ? a.port : b.port
                    if try await request(port: port, "/shared/x").status == 200 { allowed += 1 }
                }
                #expect(allowed == 5)

                // A cache entry, a runtime API key: stored through a, read through b.
                #expect(
                    try await request(port: a.port, "/cached/one").header("Cache-Status")?.contains("stored") == true)
                let hit = try await request(port: b.port, "/cached/one")
                #expect(hit.header("Cache-Status")?.contains("hit") == true, "\(hit.header("Cache-Status") ?? "")")
                let issued = try await request(port: a.adminPort, "/consumers/partner-7/keys", method: "POST", body: "")
                let key = try #require(issued.json["key"] as? String)
                #expect(try await request(port: b.port, "/private", headers: [("X-API-Key", key)]).status == 200)

                // An OAuth2 token, fetched once and kept in Redis for the fleet.
                #expect(try await request(port: a.port, "/protected").status == 200)
                #expect(try await request(port: b.port, "/protected").status == 200)
                #expect(a.upstream.tokenRequests == 1)

                // The master holding most of the cache entry, the runtime key, the token and the quota hands all its
                // slots to another master (`redis-cli --cluster reshard`, which moves one slot after another: ASK
                // while a slot is half moved, MOVED after). Everything stored is found again.
                try await cluster.settle()
                var owners: [String: (port: Int, keys: [String])] = [:]
                for pattern in ["cache:{cached}*", "apikey:*", "oauth2:*", "rl:five:*"] {
                    let stored = try #require(try await cluster.firstKey(matching: prefix + pattern), "no \(pattern)")
                    let owner = try await cluster.master(of: RedisHashSlot.of(stored))
                    owners[owner.id, default: (owner.port, [])].keys.append(stored)
                }
                let source = try #require(owners.max { $0.value.keys.count < $1.value.keys.count })
                // The masters as the source itself sees them (another node's view may lag), and a retry when
                // redis-cli finds the nodes still settling.
                var target = ""
                var status: Int32 = -1
                var output = ""
                for _ in 0..<4 where status != 0 {
                    try await cluster.settle()
                    let nodes = try await Self.cli(source.value.port, ["CLUSTER", "NODES"])
                    target =
                        nodes.split(separator: "\n").map { $0.split(separator: " ") }
                        .first {
                            $0.count >= 3 && $0[2].contains("master") && !$0[2].contains("fail") && $0[0] != source.key
                        }
                        .map { String($0[0]) } ?? ""
                    let (code, out, error) = try await ChildProcess.run(
                        "/usr/bin/redis-cli",
                        [
                            "--cluster", "reshard", "127.0.0.1:\(source.value.port)", "--cluster-from", source.key,
                            "--cluster-to", target, "--cluster-slots", "16384", "--cluster-yes",
                        ])
                    (status, output) = (code, String(out.suffix(300)) + error)
                    if code != 0 { try await Task.sleep(for: .seconds(1)) }
                }
                #expect(status == 0, "reshard: \(output)")
                try await cluster.settle()
                print("cluster test: moved the slots of \(source.value.keys)")
                for stored in source.value.keys {
                    #expect(try await cluster.master(of: RedisHashSlot.of(stored)).id == target, "\(stored)")
                    #expect(
                        try await Self.cli(cluster.ports[0], ["-c", "EXISTS", stored]) == "1", "\(stored) survived")
                }
                let entry = try await request(port: b.port, "/cached/one")
                #expect(entry.header("Cache-Status")?.contains("hit") == true, "\(entry.header("Cache-Status") ?? "")")
                #expect(try await request(port: a.port, "/private", headers: [("X-API-Key", key)]).status == 200)
                #expect(try await request(port: a.port, "/shared/x").status == 429, "the quota moved with its slot")
                // A third gateway, new to the fleet, finds the moved token instead of fetching one.
                try await Harness.run(Self.clusterYAML(cluster.url, prefix: prefix), upstream: a.upstream) { c in
                    try await waitUntil(timeout: .seconds(10)) { c.gateway.readinessProblem == nil }
                    #expect(try await request(port: c.port, "/protected").status == 200)
                    #expect(a.upstream.tokenRequests == 1, "the token was fetched again")
                }
                let failedOver = try await cluster.master(of: RedisHashSlot.of("{cached}")).id

                // A replica takes over a master under load: every request is answered.
                let stop = ContinuousClock.now + .seconds(6)
                async let load: [Int] = withThrowingTaskGroup(of: [Int].self) { group in
                    for port in [a.port, b.port, a.port, b.port] {
                        group.addTask {
                            var statuses: [Int] = []
                            while ContinuousClock.now < stop {
                                statuses.append(try await request(port: port, "/roomy/x").status)
                            }
                            return statuses
                        }
                    }
                    return try await group.reduce(into: []) { $0 += $1 }
                }
                try await Task.sleep(for: .seconds(1))
                let nodes = try await Self.cli(cluster.ports[0], ["CLUSTER", "NODES"])
                let replicaPort = nodes.split(separator: "\n").compactMap { line -> Int? in
                    let fields = line.split(separator: " ")
                    guard fields.count >= 4, fields[2].contains("slave"), fields[3] == Substring(failedOver) else {
                        return nil
                    }
                    return Int(fields[1].split(separator: ":")[1].split(separator: "@")[0])
                }.first
                let replica = try #require(replicaPort)
                #expect(try await Self.cli(replica, ["CLUSTER", "FAILOVER"]) == "OK")
                let statuses = try await load
                #expect(!statuses.isEmpty && statuses.allSatisfy { $0 == 200 }, "\(Set(statuses)) of \(statuses.count)")
                #expect(try await cluster.master(of: RedisHashSlot.of("{cached}")).port == replica)
                try await waitUntil(timeout: .seconds(10)) { a.gateway.readinessProblem == nil }
                let after = try await request(port: a.port, "/cached/one")
                // (A graceful failover keeps what the master had; the entry answers again, from Redis or stored anew.)
                #expect(after.status == 200)

                // A master that dies is named by /readyz until its replica has taken over.
                let doomed = try await cluster.master(of: RedisHashSlot.of("{cached}")).port
                await cluster.servers.first { $0.port == doomed }?.kill()
                try await waitUntil(timeout: .seconds(3)) { a.gateway.readinessProblem != nil }
                let problem = a.gateway.readinessProblem ?? ""
                #expect(problem.contains("node 127.0.0.1:\(doomed)"), "\(problem)")
            }
        }
        _ = cluster
    }

    @Test func askAndMovedAreFollowedWhileASlotMigrates() async throws {
        let cluster = try await Cluster()
        let seeds = cluster.ports.prefix(3).map { RedisConfiguration.Address.tcp(host: "127.0.0.1", port: $0) }
        let client = RedisCluster(
            configuration: RedisConfiguration(address: seeds[0]), seeds: seeds,
            group: MultiThreadedEventLoopGroup.singleton)
        try await waitUntil(timeout: .seconds(10)) { client.problem == nil }
        let key = "probe-{ask}"
        try await client.set(key, [1, 2, 3])
        let slot = RedisHashSlot.of(key)
        // The masters as they see themselves: the one that holds the key, and another.
        var masters: [(id: String, port: Int, holds: Bool)] = []
        for port in cluster.ports where try await Self.cli(port, ["ROLE"]).hasPrefix("master") {
            let id = try await Self.cli(port, ["CLUSTER", "MYID"])
            masters.append((id, port, try await Self.cli(port, ["EXISTS", key]) == "1"))
        }
        let source = try #require(masters.first { $0.holds })
        let other = try #require(masters.first { !$0.holds })
        let (target, targetPort) = (other.id, other.port)
        // The slot is half moved: its key is on the new owner, which the old one names in an ASK.
        #expect(try await Self.cli(targetPort, ["CLUSTER", "SETSLOT", String(slot), "IMPORTING", source.id]) == "OK")
        #expect(try await Self.cli(source.port, ["CLUSTER", "SETSLOT", String(slot), "MIGRATING", target]) == "OK")
        let moved = try await Self.cli(source.port, ["MIGRATE", "127.0.0.1", String(targetPort), key, "0", "5000"])
        #expect(moved == "OK")
        #expect(try await client.get(key) == [1, 2, 3], "read through ASK")
        // A key new to the slot is written on the new owner, through ASK too.
        try await client.set("other-{ask}", [4])
        // The slot is moved: MOVED from now on, and the map learns it.
        for port in cluster.ports {
            _ = try await Self.cli(port, ["CLUSTER", "SETSLOT", String(slot), "NODE", target])
        }
        #expect(try await client.get(key) == [1, 2, 3], "read through MOVED")
        #expect(try await client.get("other-{ask}") == [4])
        #expect(try await Self.cli(targetPort, ["EXISTS", "other-{ask}"]) == "1", "written on the new owner")
        await client.close()
        _ = cluster
    }
}
