import Crypto
import NIOCore
import Synchronization

/// API keys issued at runtime (`POST /consumers/{id}/keys`), kept hashed in the shared store as
/// `apikey:<sha256 hex>` → consumer id, so every instance knows them.
///
/// Answers are remembered for a second, so a revocation reaches every instance within one. While Redis is away
/// (disconnected), a key seen valid in the last five minutes still passes; any other key is refused with 503,
/// never let through.
final class RuntimeKeys: Sendable {
    enum Answer: Sendable {
        case consumer(String)
        case unknown
        /// The store could not be asked and nothing recent is known.
        case unavailable
    }

    static let freshNanoseconds: UInt64 = 1_000_000_000
    static let staleNanoseconds: UInt64 = 300_000_000_000
    static let validLimit = 100_000
    static let invalidLimit = 10_000

    private let store: SharedStore
    /// Keys found valid, by digest: consumer and when Redis said so. Kept apart from the invalid ones, so a flood
    /// of made-up keys cannot push out the answers that matter while Redis is away.
    private let valid = Mutex<[KeyDigest: (consumer: String, at: UInt64)]>([:])
    private let invalid = Mutex<[KeyDigest: UInt64]>([:])

    init(store: SharedStore) {
        self.store = store
    }

    static func storeKey(_ digest: KeyDigest) -> String { "apikey:" + digest.hex }

    func lookup(_ digest: KeyDigest, on eventLoop: EventLoop) -> EventLoopFuture<Answer> {
        let now = NIODeadline.now().uptimeNanoseconds
        let known = valid.withLock { $0[digest] }
        if let known, now &- known.at < Self.freshNanoseconds {
            return eventLoop.makeSucceededFuture(.consumer(known.consumer))
        }
        if let refused = invalid.withLock({ $0[digest] }), now &- refused < Self.freshNanoseconds {
            return eventLoop.makeSucceededFuture(.unknown)
        }
        let store = self.store
        return store.get(Self.storeKey(digest), on: eventLoop).map { value -> Answer in
            let at = NIODeadline.now().uptimeNanoseconds
            guard let value else {
                self.invalid.withLock { invalid in
                    if invalid.count >= Self.invalidLimit { invalid.removeAll(keepingCapacity: true) }
                    invalid[digest] = at
                }
                self.valid.withLock { $0[digest] = nil }
                return .unknown
            }
            let consumer = String(decoding: value, as: UTF8.self)
            self.valid.withLock { valid in
                if valid.count >= Self.validLimit {
                    valid = valid.filter { at &- $0.value.at < Self.staleNanoseconds }
                }
                if valid.count < Self.validLimit { valid[digest] = (consumer, at) }
            }
            return .consumer(consumer)
        }.recover { _ in
            // Only while Redis is away does a recent answer stand in; a single slow reply is no reason to keep a
            // key that may have been revoked.
            if store.problem != nil, let known, now &- known.at < Self.staleNanoseconds {
                return .consumer(known.consumer)
            }
            return .unavailable
        }
    }

    /// Makes a new key for a consumer and stores its digest; the key itself is returned once and kept nowhere.
    func issue(consumer: String) async throws -> (key: String, digest: KeyDigest) {
        var random = SystemRandomNumberGenerator()
        let bytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &random) }
        let key = "gh_" + Self.base64URL(bytes)
        let digest = KeyDigest(key: key)
        _ = try await store.set(
            Self.storeKey(digest), Array(consumer.utf8), expireMilliseconds: nil, onlyIfAbsent: true)
        return (key, digest)
    }

    /// Removes a consumer's key; false when no such key belongs to that consumer.
    func revoke(consumer: String, digest: KeyDigest) async throws -> Bool {
        let owner = try await store.get(Self.storeKey(digest)).map { String(decoding: $0, as: UTF8.self) }
        guard owner == consumer else { return false }
        let removed = try await store.delete([Self.storeKey(digest)]) == 1
        valid.withLock { $0[digest] = nil }
        return removed
    }

    static func base64URL(_ bytes: [UInt8]) -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
        var out: [UInt8] = []
        var index = 0
        while index < bytes.count {
            let chunk = bytes[index..<min(index + 3, bytes.count)]
            let value = chunk.enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (16 - 8 * UInt32($1.offset)) }
            let characters = chunk.count + 1
            for position in 0..<characters { out.append(alphabet[Int((value >> (18 - 6 * UInt32(position))) & 63)]) }
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}
