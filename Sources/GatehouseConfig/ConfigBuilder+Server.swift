import Foundation
import Yams

/// `server`, `admin` and `redis`.
extension ConfigBuilder {
    func server(_ node: Node) -> ServerConfig {
        var server = ServerConfig()
        guard
            let f = reader.fields(
                node, "server",
                allowed: [
                    "listen", "threads", "tls", "limits", "trusted_proxies", "drain_timeout", "access_log",
                    "headers_with_underscores", "http2",
                ])
        else { return server }
        if let value = listen(f, "listen") { server.listen = value }
        if let text = f.string("threads"), text != "auto" {
            if let count = Int(text), (1...256).contains(count) {
                server.threads = count
            } else {
                f.fail("threads", "expected auto or a number from 1 to 256, found \"\(text)\"")
            }
        }
        if let node = f["tls"] { server.tls = serverTLS(node, f.path("tls")) }
        if let node = f["limits"],
            let l = reader.fields(
                node, "server.limits",
                allowed: [
                    "max_header_bytes", "max_body_bytes", "header_timeout", "idle_timeout", "max_concurrent_streams",
                    "websocket_idle_timeout",
                ])
        {
            if let v = l.size("max_header_bytes") {
                if v < 1024 || v > 1 << 20 {
                    l.fail("max_header_bytes", "must be from 1KiB to 1MiB")
                } else {
                    server.limits.maxHeaderBytes = v
                }
            }
            if let v = l.size("max_body_bytes") { server.limits.maxBodyBytes = v }
            if let v = l.duration("header_timeout") { server.limits.headerTimeout = v }
            if let v = l.duration("idle_timeout") { server.limits.idleTimeout = v }
            if let v = l.int("max_concurrent_streams", min: 1, max: 10_000) { server.limits.maxConcurrentStreams = v }
            if let v = l.duration("websocket_idle_timeout") { server.limits.websocketIdleTimeout = v }
        }
        server.trustedProxies = networks(f, "trusted_proxies")
        if let v = f.duration("drain_timeout") { server.drainTimeout = v }
        if let v = f.string("access_log") { server.accessLog = v }
        if let v = f.bool("http2") { server.http2 = v }
        if let v = f.choice("headers_with_underscores", as: UnderscoreHeaders.self) {
            server.headersWithUnderscores = v
        }
        return server
    }

    /// `server.tls`: `{ cert, key }`, or `certificates:` (chosen by SNI), with `client_ca` and `min_version`.
    func serverTLS(_ node: Node, _ path: String) -> ServerTLS? {
        guard
            let t = reader.fields(node, path, allowed: ["cert", "key", "certificates", "client_ca", "min_version"])
        else { return nil }
        var certificates: [TLSFiles] = []
        if t["cert"] != nil || t["key"] != nil {
            if t["certificates"] != nil { t.fail("certificates", "give cert and key, or certificates, not both") }
            if let pair = certificatePair(node, path, allowed: ["cert", "key", "client_ca", "min_version"]) {
                certificates.append(pair)
            }
        } else if let listNode = t.require("certificates"), let items = reader.list(listNode, t.path("certificates")) {
            if items.isEmpty { t.fail("certificates", "needs at least one certificate") }
            certificates = items.enumerated().compactMap { index, item in
                certificatePair(item, "\(path).certificates[\(index)]", allowed: ["cert", "key"])
            }
        }
        guard !certificates.isEmpty else { return nil }
        var tls = ServerTLS(certificates: certificates)
        if let ca = t.string("client_ca") {
            if !FileManager.default.fileExists(atPath: ca) { t.fail("client_ca", "file \"\(ca)\" does not exist") }
            tls.clientCA = ca
        }
        if let v = t.choice("min_version", as: TLSVersion.self) { tls.minVersion = v }
        return tls
    }

    /// A `{ cert, key }` pair; `allowed` is every key its mapping may hold.
    private func certificatePair(_ node: Node, _ path: String, allowed: [String]) -> TLSFiles? {
        guard let t = reader.fields(node, path, allowed: allowed),
            let cert = t.require("cert").flatMap({ reader.string($0, t.path("cert")) }),
            let key = t.require("key").flatMap({ reader.string($0, t.path("key")) })
        else { return nil }
        for (name, file) in [("cert", cert), ("key", key)] where !FileManager.default.fileExists(atPath: file) {
            t.fail(name, "file \"\(file)\" does not exist")
        }
        return TLSFiles(cert: cert, key: key)
    }

    func listen(_ f: Fields, _ key: String) -> ListenAddress? {
        guard let text = f.string(key) else { return nil }
        guard let address = ListenAddress.parse(text) else {
            f.fail(key, "expected host:port, found \"\(text)\"")
            return nil
        }
        return address
    }

    func admin(_ node: Node) -> AdminConfig {
        var admin = AdminConfig()
        guard let f = reader.fields(node, "admin", allowed: ["listen", "token", "hosts", "allowed_origins"]) else {
            return admin
        }
        if let value = listen(f, "listen") { admin.listen = value }
        if let token = f.string("token") {
            if token.isEmpty { f.fail("token", "must not be empty") } else { admin.token = Secret(token) }
        }
        if let hosts = f.strings("hosts") { admin.hosts = hosts.map { $0.lowercased() } }
        if let origins = f.strings("allowed_origins") {
            for origin in origins where origin.contains("*") || !origin.contains("://") {
                f.fail("allowed_origins", "expected scheme://host[:port] (no wildcards), found \"\(origin)\"")
            }
            admin.allowedOrigins = origins.map { $0.lowercased() }
        }
        if admin.token == nil, !admin.listen.isLoopback {
            reader.fail(node, "admin.token", "required when admin.listen (\(admin.listen)) is not a loopback address")
        }
        return admin
    }

    func redis(_ node: Node) -> RedisConfig {
        var redis = RedisConfig()
        guard
            let f = reader.fields(
                node, "redis",
                allowed: [
                    "url", "pool_size", "connect_timeout", "command_timeout", "key_prefix", "local_cache_bytes",
                    "memory_cache_bytes", "tls", "sentinel_password",
                ])
        else { return redis }
        if let url = f.string("url") {
            switch RedisEndpoint.parse(url) {
            case .some:
                redis.url = Secret(url)
            case nil:
                f.fail(
                    "url",
                    "expected redis[s]://[user[:password]@]host:port/db, redis[s]-sentinel://host:port,...[/db]#master, "
                        + "redis[s]-cluster://host:port,..., unix:///path.sock or memory://")
            }
        }
        if let v = f.string("sentinel_password") { redis.sentinelPassword = Secret(v) }
        if let node = f["tls"],
            let t = reader.fields(node, f.path("tls"), allowed: ["ca_file", "cert", "key", "server_name", "verify"])
        {
            redis.tls.caFile = t.string("ca_file")
            redis.tls.cert = t.string("cert")
            redis.tls.key = t.string("key")
            redis.tls.serverName = t.string("server_name")
            if let v = t.bool("verify") { redis.tls.verify = v }
            for (name, file) in [("ca_file", redis.tls.caFile), ("cert", redis.tls.cert), ("key", redis.tls.key)] {
                if let file, !FileManager.default.fileExists(atPath: file) {
                    t.fail(name, "file \"\(file)\" does not exist")
                }
            }
            if (redis.tls.cert == nil) != (redis.tls.key == nil) { t.fail("cert", "cert and key go together") }
        }
        if let v = f.int("pool_size", min: 1, max: 64) { redis.poolSize = v }
        if let v = f.duration("connect_timeout") { redis.connectTimeout = v }
        if let v = f.duration("command_timeout") { redis.commandTimeout = v }
        if let v = f.string("key_prefix") { redis.keyPrefix = v }
        if let v = f.size("local_cache_bytes") { redis.localCacheBytes = v }
        if let v = f.size("memory_cache_bytes") { redis.memoryCacheBytes = v }
        return redis
    }
}
