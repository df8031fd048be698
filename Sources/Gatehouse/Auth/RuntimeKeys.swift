import Crypto
import NIOCore
import Synchronization

/// API keys issued at runtime (`POST /consumers/{id}/keys`), kept hashed in the shared store as
/// `apikey:<sha256 hex>` → consumer id, so every instance knows them.
///
/// Answers are remembered for a second, so a revocation reaches every instance within one. While the store
/// cannot be asked, a key seen valid in the last five minutes still passes; any other key is refused with 503,
/// never let through.
final class RuntimeKeys: Sendable {
    enum Answer: Sendable {
        case consumer(String)
        case unknown
        /// The store could not be asked and nothing recent is known.
        case unavailable
    }

    private struct Remembered {
        var consumer: String?
        var at: UInt64
    }

    static let freshNanoseconds: UInt64 = 1_000_000_000
    static let staleNanoseconds: UInt64 = 300_000_000_000
    static let rememberLimit = 100_000

    private let store: SharedStore
    private let remembered = Mutex<[KeyDigest: Remembered]>([:])

    init(store: SharedStore) {
        self.store = store
    }

    static func storeKey(_ digest: KeyDigest) -> String { "apikey:" + digest.hex }

    func lookup(_ digest: KeyDigest, on eventLoop: EventLoop) -> EventLoopFuture<Answer> {
        let now = NIODeadline.now().uptimeNanoseconds
        let known = remembered.withLock { $0[digest] }
        if let known, now &- known.at < Self.freshNanoseconds {
            return eventLoop.makeSucceededFuture(known.consumer.map(Answer.consumer) ?? .unknown)
        }
        return store.get(Self.storeKey(digest), on: eventLoop).map { value -> Answer in
            let consumer = value.map { String(decoding: $0, as: UTF8.self) }
            self.remember(digest, Remembered(consumer: consumer, at: NIODeadline.now().uptimeNanoseconds))
            return consumer.map(Answer.consumer) ?? .unknown
        }.recover { _ in
            if let known, let consumer = known.consumer, now &- known.at < Self.staleNanoseconds {
                return .consumer(consumer)
            }
            return .unavailable
        }
    }

    private func remember(_ digest: KeyDigest, _ answer: Remembered) {
        remembered.withLock { remembered in
            if remembered.count >= Self.rememberLimit { remembered.removeAll(keepingCapacity: true) }
            remembered[digest] = answer
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
        remembered.withLock { $0[digest] = nil }
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
