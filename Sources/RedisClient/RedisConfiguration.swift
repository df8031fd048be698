import Foundation

/// Where and how to reach Redis, read from a `redis://` or `unix://` URL.
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

    /// Parses `redis://[[user]:password@]host[:port][/db]` or `unix:///path.sock[?db=N]`; nil when malformed.
    public init?(url: String) {
        guard let components = URLComponents(string: url), let scheme = components.scheme else { return nil }
        switch scheme {
        case "redis":
            guard let host = components.host, !host.isEmpty else { return nil }
            address = .tcp(host: host, port: components.port ?? 6379)
            let path = components.path.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
            if !path.isEmpty {
                guard let db = Int(path), db >= 0 else { return nil }
                database = db
            }
            if let user = components.user, !user.isEmpty { username = user }
            password = components.password
        case "unix":
            guard !components.path.isEmpty else { return nil }
            address = .unix(path: components.path)
            if let db = components.queryItems?.first(where: { $0.name == "db" })?.value {
                guard let value = Int(db), value >= 0 else { return nil }
                database = value
            }
            password = components.queryItems?.first(where: { $0.name == "password" })?.value
        default:
            return nil
        }
    }
}
