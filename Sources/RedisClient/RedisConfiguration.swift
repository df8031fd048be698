public import NIOSSL

/// Where and how to reach Redis.
public struct RedisConfiguration: Sendable {
    public enum Address: Sendable, Hashable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public var address: Address
    public var username: String?
    public var password: String?
    public var database: Int = 0
    /// Connections kept open; commands are spread over them.
    public var poolSize: Int = 4
    public var connectTimeout: Duration = .milliseconds(500)
    public var commandTimeout: Duration = .milliseconds(100)
    /// Commands in flight per connection beyond which new ones fail fast with `overloaded`.
    public var maxInFlightPerConnection: Int = 10_000
    /// TLS on every connection (to the server and, with ``sentinel``, to the sentinels).
    public var tls: TLS?
    /// Find the master through sentinels instead of connecting to ``address``.
    public var sentinel: Sentinel?
    /// A cluster's seed nodes: a connection that serves no key (a subscription) goes to the first that accepts.
    public var clusterSeeds: [Address] = []

    /// TLS for Redis connections: the client context (CA, client certificate, verification) and the name the server's
    /// certificate must carry (also sent as SNI); nil checks it against the host connected to.
    public struct TLS: Sendable {
        public var context: NIOSSLContext
        public var serverName: String?

        public init(context: NIOSSLContext, serverName: String?) {
            self.context = context
            self.serverName = serverName
        }
    }

    /// Redis Sentinel: the sentinels to ask (any one that answers will do) for the address of the master `master`,
    /// and their own credentials when they need some.
    public struct Sentinel: Sendable {
        public var sentinels: [Address]
        public var master: String
        public var username: String?
        public var password: String?

        public init(sentinels: [Address], master: String, username: String? = nil, password: String? = nil) {
            self.sentinels = sentinels
            self.master = master
            self.username = username
            self.password = password
        }
    }

    public init(address: Address) {
        self.address = address
    }
}
