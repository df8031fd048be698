import CoreMetrics
import Crypto
import Foundation
import GatehouseConfig
import Logging
import NIOCore
import NIOHTTP1
import Synchronization
import UpstreamClient

/// OAuth 2.0 client-credentials tokens for upstreams with `oauth2:`, shared by every instance through the store.
///
/// Each instance keeps the current token in memory. From its refresh time (10% of its lifetime, at most a minute,
/// before it expires) one acquisition runs in the background while requests go on with it until it expires, so a
/// slow or failing token endpoint costs nothing while the old token still works. An acquisition reads the store
/// first; if no instance has stored one, the instance that wins a short lock asks the token endpoint and
/// stores the token until shortly before it expires, and the others wait for it. Without Redis, each instance
/// fetches its own. Concurrent requests of one instance share one acquisition. Outlives config reloads.
final class OAuth2Tokens: Sendable {
    /// A token and its times, in wall-clock milliseconds.
    struct Token: Sendable {
        var value: String
        /// From then on it is renewed.
        var refreshAt: Int64
        /// From then on it is not used.
        var expiresAt: Int64
    }

    private struct Slot {
        var token: Token?
        var pending: EventLoopFuture<String>?
        /// The last token an upstream refused: never taken from the store again.
        var refused: String?
        /// When a refusal last dropped the token (wall-clock milliseconds): at most one per ``refusalInterval``.
        var refusedAt: Int64 = 0
    }

    /// After an upstream's 401 drops a token, further 401s within this many milliseconds go to the client as they
    /// are: an upstream that refuses every token cannot make the gateway fetch one per request.
    static let refusalInterval: Int64 = 5_000

    private let store: KeyValueStore & FleetLock
    private let client: UpstreamClient
    private let logger: Logger
    private let slots = Mutex<[String: Slot]>([:])
    /// Acquisitions under way, so that shutdown can wait for them while the event loops still run.
    private let running = Mutex<[UUID: Task<Void, Never>]>([:])
    private let metrics: GatewayMetrics

    init(store: KeyValueStore & FleetLock, client: UpstreamClient, metrics: GatewayMetrics, logger: Logger) {
        self.store = store
        self.client = client
        self.metrics = metrics
        self.logger = logger
    }

    /// The token this instance holds for `grant` until it expires; past its refresh time, an acquisition of the
    /// next one starts in the background. Nil when there is none: `token(for:on:)` then waits for one.
    func heldToken(for grant: OAuth2Grant, on loop: EventLoop) -> String? {
        let now = Self.wallMilliseconds()
        return slots.withLock { slots in
            guard let token = slots[grant.key]?.token, token.expiresAt > now else { return nil }
            if token.refreshAt <= now { _ = acquisition(grant, on: loop, slots: &slots) }
            return token.value
        }
    }

    /// The current token: at once when this instance holds one, else when it has been acquired.
    func token(for grant: OAuth2Grant, on loop: EventLoop) -> EventLoopFuture<String> {
        if let token = heldToken(for: grant, on: loop) { return loop.makeSucceededFuture(token) }
        return slots.withLock { acquisition(grant, on: loop, slots: &$0) }.hop(to: loop)
    }

    /// The acquisition under way for `grant`, or a new one.
    private func acquisition(_ grant: OAuth2Grant, on loop: EventLoop, slots: inout [String: Slot])
        -> EventLoopFuture<String>
    {
        if let pending = slots[grant.key]?.pending { return pending }
        let promise = loop.makePromise(of: String.self)
        slots[grant.key, default: Slot()].pending = promise.futureResult
        let id = UUID()
        running.withLock { running in
            running[id] = Task {
                await self.acquire(grant, loop: loop, promise: promise)
                _ = self.running.withLock { $0.removeValue(forKey: id) }
            }
        }
        return promise.futureResult
    }

    /// Cancels the acquisitions under way (a cancelled one starts no token request) and returns them, to be
    /// awaited once the upstream client has stopped what they had started.
    func cancelAcquisitions() -> [Task<Void, Never>] {
        let tasks = running.withLock { Array($0.values) }
        for task in tasks { task.cancel() }
        return tasks
    }

    /// The upstream answered 401 to `token`: what to wait for before the request is sent again, or nil when it is
    /// not. A newer token this instance already holds is used at once; otherwise the token is dropped, at most
    /// once per ``refusalInterval`` for the grant.
    func refreshAfterRefusal(of token: String, for grant: OAuth2Grant, on loop: EventLoop) -> EventLoopFuture<Void>? {
        let now = Self.wallMilliseconds()
        enum Next { case resend, refresh, none }
        let next = slots.withLock { slots -> Next in
            let slot = slots[grant.key] ?? Slot()
            if let held = slot.token, held.value != token, held.expiresAt > now { return .resend }
            guard now - slot.refusedAt >= Self.refusalInterval else { return .none }
            slots[grant.key, default: Slot()].refusedAt = now
            return .refresh
        }
        switch next {
        case .resend: return loop.makeSucceededVoidFuture()
        case .refresh: return invalidate(token, for: grant, on: loop)
        case .none: return nil
        }
    }

    /// The upstream refused `token` (401): it is dropped here and in the store, unless another instance has
    /// already replaced it there. Completes when the store no longer offers it.
    private func invalidate(_ token: String, for grant: OAuth2Grant, on loop: EventLoop) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        promise.completeWithTask { await self.invalidate(token, key: grant.key) }
        return promise.futureResult
    }

    private func invalidate(_ token: String, key: String) async {
        slots.withLock { slots in
            slots[key, default: Slot()].refused = token
            if slots[key]?.token?.value == token { slots[key]?.token = nil }
        }
        if let current = try? await store.get(key), Self.decodeStored(current)?.value == token {
            _ = try? await store.delete(key, ifEqualTo: current)
        }
    }

    private func acquire(_ grant: OAuth2Grant, loop: EventLoop, promise: EventLoopPromise<String>) async {
        let key = grant.key
        do {
            let token = try await sharedToken(grant, loop: loop)
            slots.withLock { slots in
                slots[key, default: Slot()].token = token
                slots[key]?.pending = nil
            }
            promise.succeed(token.value)
        } catch {
            slots.withLock { slots in slots[key]?.pending = nil }
            logger.warning(
                "oauth2: no token for the upstream",
                metadata: ["upstream": "\(grant.upstream)", "error": "\(error)"])
            promise.fail(
                GatewayError(
                    status: .badGateway,
                    detail: "The gateway could not obtain a token for the upstream \(grant.upstream).",
                    origin: .upstream))
        }
    }

    /// A token from the store, or fetched by the one instance that takes the fleet lock while the others wait for
    /// it. When the store cannot be asked, this instance fetches a token for itself.
    private func sharedToken(_ grant: OAuth2Grant, loop: EventLoop) async throws -> Token {
        let key = grant.key
        let lock = "oauth2:" + key
        for _ in 0..<2 {
            let locked: Bool
            do {
                if let stored = try await freshStored(key) { return stored }
                locked = try await store.lock(lock, milliseconds: 10_000, on: loop).get()
            } catch {
                return try await fetchAlone(grant, loop: loop, because: error)
            }
            if locked {
                defer { store.unlock(lock, on: loop) }
                let token = try await fetch(grant, loop: loop)
                let ttl = Int(token.refreshAt - Self.wallMilliseconds())
                if ttl > 0 {
                    _ = try? await store.set(
                        key, Self.encodeStored(token), expireMilliseconds: ttl, onlyIfAbsent: false)
                }
                return token
            }
            // Another instance is fetching: wait for its token, up to the lock's lifetime.
            do {
                for _ in 0..<200 {
                    try await Task.sleep(for: .milliseconds(50))
                    if let stored = try await freshStored(key) { return stored }
                    if try await !store.isLocked(lock, on: loop).get() { break }
                }
            } catch {
                return try await fetchAlone(grant, loop: loop, because: error)
            }
        }
        return try await fetch(grant, loop: loop)
    }

    /// The store failed: this instance fetches a token of its own (cancellation ends the acquisition instead).
    private func fetchAlone(_ grant: OAuth2Grant, loop: EventLoop, because error: Error) async throws -> Token {
        try Task.checkCancellation()
        logger.info(
            "oauth2: the store is unavailable; fetching a token for this instance", metadata: ["error": "\(error)"])
        return try await fetch(grant, loop: loop)
    }

    /// The stored token while it is fresh; one an upstream refused here is removed instead.
    private func freshStored(_ key: String) async throws -> Token? {
        guard let bytes = try await store.get(key), let stored = Self.decodeStored(bytes),
            stored.refreshAt > Self.wallMilliseconds()
        else { return nil }
        if stored.value == slots.withLock({ $0[key]?.refused }) {
            _ = try await store.delete(key, ifEqualTo: bytes)
            return nil
        }
        return stored
    }

    /// Asks the token endpoint (RFC 6749 §4.4); the token is renewed 10% of its lifetime (at most a minute)
    /// before it expires.
    private func fetch(_ grant: OAuth2Grant, loop: EventLoop) async throws -> Token {
        try Task.checkCancellation()
        let config = grant.config
        var form = [("grant_type", "client_credentials")]
        if !config.scopes.isEmpty { form.append(("scope", config.scopes.joined(separator: " "))) }
        if let audience = config.audience { form.append(("audience", audience)) }
        var headers: [(name: String, value: String)] = [
            ("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json"),
            ("User-Agent", "gatehouse"),
        ]
        switch config.clientAuth {
        case .basic:
            let credentials = Self.formEncode(config.clientID) + ":" + Self.formEncode(config.clientSecret.value)
            headers.append(("Authorization", "Basic " + Data(credentials.utf8).base64EncodedString()))
        case .body:
            form.append(("client_id", config.clientID))
            form.append(("client_secret", config.clientSecret.value))
        }
        let body = Array(form.map { Self.formEncode($0.0) + "=" + Self.formEncode($0.1) }.joined(separator: "&").utf8)
        let request = UpstreamRequest(
            url: config.tokenURL, method: "POST", headers: headers, bodyLength: Int64(body.count),
            connectTimeoutMilliseconds: grant.connectTimeoutMilliseconds,
            // The client secret goes only to an endpoint verified against the system's CAs, whatever the
            // upstream's own `tls` says.
            timeoutMilliseconds: 10_000, verifyTLS: true, caFile: nil)
        metrics.oauth2Fetches(grant.upstream).increment()
        let answer = try await UpstreamFetch.send(
            request, body: ByteBuffer(bytes: body), client: client, on: loop, limit: 64 * 1024
        ).get()
        guard (200..<300).contains(answer.status) else {
            throw TokenError.refused(
                status: answer.status, body: String(decoding: answer.body.prefix(200), as: UTF8.self))
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any],
            let token = object["access_token"] as? String, !token.isEmpty,
            token.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7f })
        else { throw TokenError.malformed }
        if let type = object["token_type"] as? String, type.lowercased() != "bearer" {
            throw TokenError.unsupportedType(type)
        }
        // RFC 6749 leaves expires_in optional: assume five minutes; keep hostile values within a year.
        var seconds: Int64 = 300
        if let number = object["expires_in"] as? Int {
            seconds = Int64(number)
        } else if let text = object["expires_in"] as? String, let number = Int64(text) {
            seconds = number
        }
        let lifetime = min(max(seconds, 1), 31_536_000) * 1000
        let margin = min(lifetime / 10, 60_000)
        let now = Self.wallMilliseconds()
        return Token(value: token, refreshAt: now + lifetime - margin, expiresAt: now + lifetime)
    }

    enum TokenError: Error, CustomStringConvertible {
        case refused(status: Int, body: String)
        case malformed
        case unsupportedType(String)

        var description: String {
            switch self {
            case .refused(let status, let body): "the token endpoint answered \(status): \(body)"
            case .malformed: "the token endpoint's answer has no access_token"
            case .unsupportedType(let type): "token_type \(type) is not Bearer"
            }
        }
    }

    // MARK: helpers

    /// `oauth2:<upstream>:<digest of what identifies the grant>`, so a changed grant never reuses an old token.
    static func storeKey(_ upstream: String, _ config: OAuth2Config) -> String {
        let identity = [config.tokenURL, config.clientID, config.scopes.joined(separator: " "), config.audience ?? ""]
            .joined(separator: "\n")
        let digest = SHA256.hash(data: Data(identity.utf8)).prefix(8).map { String(format: "%02x", $0) }.joined()
        return "oauth2:" + upstream + ":" + digest
    }

    /// `<refreshAt ms> <expiresAt ms> <token>`.
    static func encodeStored(_ token: Token) -> [UInt8] {
        Array("\(token.refreshAt) \(token.expiresAt) \(token.value)".utf8)
    }

    static func decodeStored(_ bytes: [UInt8]) -> Token? {
        let parts = bytes.split(separator: 0x20, maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, let refreshAt = Int64(String(decoding: parts[0], as: UTF8.self)),
            let expiresAt = Int64(String(decoding: parts[1], as: UTF8.self)),
            // Wall-clock milliseconds, as this code writes them: anything else could overflow the sums on them.
            (0...(1 << 46)).contains(refreshAt), (0...(1 << 46)).contains(expiresAt)
        else { return nil }
        return Token(value: String(decoding: parts[2], as: UTF8.self), refreshAt: refreshAt, expiresAt: expiresAt)
    }

    /// application/x-www-form-urlencoded.
    static func formEncode(_ text: String) -> String {
        let allowed = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._*")
        return (text.addingPercentEncoding(withAllowedCharacters: allowed) ?? text).replacingOccurrences(
            of: "%20", with: "+")
    }

    static func wallMilliseconds() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}

/// An upstream's `oauth2` grant and the key its token has in the store, made once per config load.
struct OAuth2Grant: Sendable {
    let upstream: String
    let config: OAuth2Config
    let connectTimeoutMilliseconds: Int
    /// `oauth2:<upstream>:<digest>`.
    let key: String

    /// Nil for an upstream without `oauth2`.
    init?(_ upstream: UpstreamConfig) {
        guard let config = upstream.oauth2 else { return nil }
        self.upstream = upstream.name
        self.config = config
        connectTimeoutMilliseconds = Int(max(1, upstream.connectTimeout.milliseconds))
        key = OAuth2Tokens.storeKey(upstream.name, config)
    }
}
