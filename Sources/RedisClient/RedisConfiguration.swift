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

    public init(address: Address) {
        self.address = address
    }
}
