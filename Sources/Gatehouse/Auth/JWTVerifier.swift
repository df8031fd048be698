import Foundation
import GatehouseConfig
import JWTKit
import Logging
import NIOCore
import NIOPosix
import Synchronization
import UpstreamClient

/// Verifies JWTs for the issuers of `auth.jwt`.
///
/// The issuer is chosen by the token's `iss`; its `alg` must be on that issuer's allow-list (`none` never is).
/// HS algorithms verify with the issuer's `secret` only, and RS/PS/ES/EdDSA with its JWKS keys only, so an HMAC
/// token is never checked against a public key. Signatures are checked by jwt-kit's algorithms, synchronously on
/// the event loop; then `exp` (required), `nbf` with `leeway`, and `aud`. Keys from `jwks_url` are fetched
/// through the upstream client, kept as long as the answer's `Cache-Control: max-age` says (1 min to 1 day,
/// 10 min without one), and fetched again on an unknown `kid` at most once per 5 s per issuer.
final class JWTVerifier: Sendable {
    /// What verifying a token came to.
    enum Outcome: Sendable {
        /// The token is valid: the subject its `consumer_claim` names, under the issuer (`iss`) that signed it.
        case verified(subject: String, issuer: String)
        case invalid(String)
        /// The issuer's keys are being loaded (first use, or an unknown `kid`): verify again when this completes.
        case wait(EventLoopFuture<Void>)
    }

    /// One issuer's verification keys: by `kid`, then by algorithm name.
    struct IssuerKeys: Sendable {
        var byKid: [String: [String: any JWTAlgorithm]] = [:]
        /// When a `jwks_url` answer should be fetched again (monotonic nanoseconds); nil for files and secrets.
        var refreshAt: UInt64?
    }

    private struct IssuerState {
        var keys: IssuerKeys?
        var loading: EventLoopFuture<Void>?
        /// When an unknown `kid` last caused a fetch (monotonic nanoseconds).
        var lastKidFetch: UInt64 = 0
        /// Failed loads in a row, and when the next may start: 1 s doubling to 60 s.
        var failures = 0
        var retryAt: UInt64 = 0
    }

    static let refetchInterval: UInt64 = 5_000_000_000
    static let verifiedLimit = 10_000

    private let upstream: UpstreamClient
    private let logger: Logger
    /// Keys by issuer identity (issuer, key source and algorithms), so a reload that changes none keeps them.
    private let issuers = Mutex<[String: IssuerState]>([:])
    /// Tokens already verified, with what they proved, until when, and under which issuer config (its identity):
    /// emptied whenever keys change, and not used once the issuer's config changed.
    private let verified = Mutex<[String: VerifiedToken]>([:])

    private struct VerifiedToken {
        var consumer: String
        var issuer: String
        var identity: String
        var expires: Int64
        var notBefore: Int64
    }

    init(upstream: UpstreamClient, logger: Logger) {
        self.upstream = upstream
        self.logger = logger
    }

    /// An issuer of the running config, with its identity worked out once.
    struct AcceptedIssuer: Sendable {
        let config: JWTIssuerConfig
        let identity: String

        init(_ config: JWTIssuerConfig) {
            self.config = config
            identity = JWTVerifier.identity(config)
        }
    }

    /// Everything of an issuer's config that decides whether a token passes.
    static func identity(_ issuer: JWTIssuerConfig) -> String {
        [
            issuer.issuer, issuer.jwksFile ?? "", issuer.jwksURL ?? "", issuer.secret?.value ?? "",
            issuer.algorithms.joined(separator: ","), issuer.audiences.joined(separator: ","), issuer.consumerClaim,
            String(issuer.leeway.milliseconds),
        ].joined(separator: "\u{0}")
    }

    /// Verifies `token` for one of the `accepted` issuers (by their `issuer`). `mayFetch` allows loading keys
    /// (false on the retry after a load, so a token with a `kid` nobody has fails instead of waiting again).
    func verify(_ token: String, accepted: [String: AcceptedIssuer], mayFetch: Bool, on eventLoop: EventLoop)
        -> Outcome
    {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        if let known = verified.withLock({ $0[token] }), let issuer = accepted[known.issuer],
            issuer.identity == known.identity
        {
            let leeway = issuer.config.leeway.milliseconds
            if now <= known.expires + leeway, now + leeway >= known.notBefore {
                return .verified(subject: known.consumer, issuer: known.issuer)
            }
        }
        guard let parsed = ParsedToken(token) else { return .invalid("The token is not a well-formed JWT.") }
        guard let iss = parsed.payload["iss"] as? String, let issuer = accepted[iss] else {
            return .invalid("The token's issuer is not accepted.")
        }
        let config = issuer.config
        guard parsed.algorithm != "none", config.algorithms.contains(parsed.algorithm) else {
            return .invalid("The token's algorithm is not accepted for this issuer.")
        }
        // RFC 7515 §4.1.11: extensions marked critical must be understood; this verifier understands none.
        if parsed.header["crit"] != nil { return .invalid("The token has critical header extensions (crit).") }

        let identity = issuer.identity
        let nowMonotonic = NIODeadline.now().uptimeNanoseconds
        let state = issuers.withLock { $0[identity] }
        let mayLoad = mayFetch && nowMonotonic >= (state?.retryAt ?? 0)
        guard let keys = state?.keys else {
            return mayLoad
                ? .wait(load(config, identity: identity, on: eventLoop))
                : .invalid("The issuer's keys are not available.")
        }
        if let refreshAt = keys.refreshAt, nowMonotonic > refreshAt, nowMonotonic >= state?.retryAt ?? 0,
            state?.loading == nil
        {
            _ = load(config, identity: identity, on: eventLoop)  // in the background; the current keys serve meanwhile
        }
        let candidates: [any JWTAlgorithm]
        if parsed.algorithm.hasPrefix("HS") {
            // The secret has no kid; a kid in an HMAC token names nothing here.
            candidates = keys.byKid[""]?[parsed.algorithm].map { [$0] } ?? []
        } else if let kid = parsed.kid {
            candidates = keys.byKid[kid]?[parsed.algorithm].map { [$0] } ?? []
        } else {
            candidates = keys.byKid.values.compactMap { $0[parsed.algorithm] }
        }
        if candidates.isEmpty {
            let mayRefetch =
                mayLoad && config.jwksURL != nil && !parsed.algorithm.hasPrefix("HS")
                && nowMonotonic &- (state?.lastKidFetch ?? 0) > Self.refetchInterval
            if mayRefetch { return .wait(load(config, identity: identity, forUnknownKid: true, on: eventLoop)) }
            return .invalid("The token's key (kid) is not known for this issuer.")
        }
        let signatureValid = candidates.contains { key in
            (try? key.verify(parsed.signature, signs: parsed.signingInput)) == true
        }
        guard signatureValid else { return .invalid("The token's signature is invalid.") }

        let leeway = config.leeway.milliseconds
        guard let exp = Self.seconds(parsed.payload["exp"]) else { return .invalid("The token has no expiry (exp).") }
        if now > exp * 1000 + leeway { return .invalid("The token has expired.") }
        if parsed.payload["nbf"] != nil, Self.seconds(parsed.payload["nbf"]) == nil {
            return .invalid("The token's nbf is not a time.")
        }
        let nbf = Self.seconds(parsed.payload["nbf"]).map { $0 * 1000 } ?? Int64.min / 2
        if now + leeway < nbf { return .invalid("The token is not valid yet (nbf).") }
        if !config.audiences.isEmpty {
            let audiences =
                (parsed.payload["aud"] as? String).map { [$0] } ?? (parsed.payload["aud"] as? [String]) ?? []
            if !audiences.contains(where: config.audiences.contains) {
                return .invalid("The token's audience is not accepted.")
            }
        }
        let claim = parsed.payload[config.consumerClaim]
        guard let consumer = (claim as? String) ?? (claim as? NSNumber).map({ $0.stringValue }),
            ConsumerID.isValid(consumer)
        else {
            return .invalid(
                "The token's \(config.consumerClaim) claim does not name a consumer (1-128 of A-Z a-z 0-9 ._:@-).")
        }
        verified.withLock { verified in
            if verified.count >= Self.verifiedLimit { verified.removeAll(keepingCapacity: true) }
            verified[token] = VerifiedToken(
                consumer: consumer, issuer: iss, identity: identity, expires: exp * 1000, notBefore: nbf)
        }
        return .verified(subject: consumer, issuer: iss)
    }

    private static func seconds(_ value: Any?) -> Int64? {
        guard let number = value as? NSNumber else { return nil }
        let double = number.doubleValue
        guard double.isFinite, abs(double) < 1e12 else { return nil }
        return Int64(double)
    }

    // MARK: keys

    /// Loads (or reloads) an issuer's keys once at a time; the future completes when they are in place or the
    /// attempt failed (then the old keys, if any, stay).
    private func load(
        _ config: JWTIssuerConfig, identity: String, forUnknownKid: Bool = false, on eventLoop: EventLoop
    ) -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        let existing = issuers.withLock { issuers -> EventLoopFuture<Void>? in
            if let loading = issuers[identity]?.loading { return loading }
            issuers[identity, default: IssuerState()].loading = promise.futureResult
            if forUnknownKid { issuers[identity]?.lastKidFetch = NIODeadline.now().uptimeNanoseconds }
            return nil
        }
        if let existing {
            promise.succeed()
            return existing.hop(to: eventLoop)
        }
        let upstream = self.upstream
        let logger = self.logger
        promise.completeWithTask {
            let (keys, failure) = await Self.fetchKeys(config, upstream: upstream, eventLoop: eventLoop)
            if let failure {
                logger.warning(
                    "JWT keys could not be loaded", metadata: ["issuer": "\(config.issuer)", "error": "\(failure)"])
            }
            self.finishLoad(keys, failed: failure != nil, identity: identity)
        }
        return promise.futureResult
    }

    /// Puts loaded keys in place (a failed load keeps the old ones, but the secret's keys are always taken), and
    /// schedules the next attempt after a failure: 1 s, doubling to 60 s.
    private func finishLoad(_ keys: IssuerKeys, failed: Bool, identity: String) {
        let now = NIODeadline.now().uptimeNanoseconds
        issuers.withLock { issuers in
            var state = issuers[identity] ?? IssuerState()
            state.loading = nil
            if failed {
                state.failures += 1
                let delay = UInt64(min(60, 1 << min(state.failures - 1, 6))) * 1_000_000_000
                state.retryAt = now + delay
                if state.keys == nil || !keys.byKid.isEmpty {
                    var kept = state.keys ?? IssuerKeys()
                    for (kid, byAlgorithm) in keys.byKid { kept.byKid[kid] = byAlgorithm }
                    kept.refreshAt = now + delay
                    state.keys = kept
                }
            } else {
                state.failures = 0
                state.retryAt = 0
                state.keys = keys
            }
            issuers[identity] = state
        }
        verified.withLock { $0.removeAll() }
    }

    /// Loads every issuer's keys now (at start and after a reload), so first requests do not wait. Files are read
    /// again on every reload, so a rotated file takes effect.
    func preload(_ configs: [JWTIssuerConfig], on eventLoop: EventLoop) -> EventLoopFuture<Void> {
        let loads = configs.filter { config in
            config.jwksFile != nil || issuers.withLock { $0[Self.identity(config)]?.keys == nil }
        }.map { load($0, identity: Self.identity($0), on: eventLoop) }
        return EventLoopFuture.whenAllComplete(loads, on: eventLoop).map { _ in }
    }

    /// The issuer's keys: the secret's for HS algorithms, and the JWKS's keys, each under the allowed algorithms
    /// its type supports. Keys of a type or algorithm jwt-kit does not know are skipped (RFC 7517 §5), not fatal.
    private static func fetchKeys(_ config: JWTIssuerConfig, upstream: UpstreamClient, eventLoop: EventLoop)
        async -> (IssuerKeys, failure: Error?)
    {
        var keys = IssuerKeys()
        if let secret = config.secret?.value {
            for algorithm in config.algorithms where algorithm.hasPrefix("HS") {
                let digest: DigestAlgorithm =
                    algorithm == "HS384" ? .sha384 : algorithm == "HS512" ? .sha512 : .sha256
                let collection = JWTKeyCollection()
                await collection.add(hmac: HMACKey(from: secret), digestAlgorithm: digest)
                keys.byKid["", default: [:]][algorithm] = try? await collection.getKey()
            }
        }
        do {
            var document: Data?
            if let file = config.jwksFile {
                document = try await NIOThreadPool.singleton.runIfActive {
                    try Data(contentsOf: URL(fileURLWithPath: file))
                }
            } else if let url = config.jwksURL {
                let answer = try await UpstreamFetch.get(url, client: upstream, on: eventLoop).get()
                guard answer.status == 200 else { throw JWTFetchError(detail: "\(url) answered \(answer.status)") }
                document = Data(answer.body)
                let maxAge = CacheControl(CachePolicy.values(of: "Cache-Control", in: answer.headers)).maxAge ?? 600
                keys.refreshAt =
                    NIODeadline.now().uptimeNanoseconds + UInt64(min(max(maxAge, 60), 86_400)) * 1_000_000_000
            }
            guard let document else { return (keys, nil) }
            guard let object = try JSONSerialization.jsonObject(with: document) as? [String: Any],
                let list = object["keys"] as? [Any]
            else { throw JWTFetchError(detail: "the JWKS has no \"keys\" list") }
            for item in list {
                guard let data = try? JSONSerialization.data(withJSONObject: item),
                    var jwk = try? JSONDecoder().decode(JWK.self, from: data)
                else { continue }
                let kid = jwk.keyIdentifier?.string ?? ""
                jwk.keyIdentifier = JWKIdentifier(string: kid)
                for algorithm in config.algorithms where !algorithm.hasPrefix("HS") {
                    let collection = JWTKeyCollection()
                    guard (try? await collection.add(jwk: jwk)) != nil,
                        let key = try? await collection.getKey(for: JWKIdentifier(string: kid), alg: algorithm),
                        key.name == algorithm
                    else { continue }
                    keys.byKid[kid, default: [:]][algorithm] = key
                }
            }
            return (keys, nil)
        } catch {
            return (keys, error)
        }
    }
}

struct JWTFetchError: Error, CustomStringConvertible {
    let detail: String
    var description: String { detail }
}

/// A compact JWS split into its parts, with header and payload decoded as JSON objects.
struct ParsedToken {
    let header: [String: Any]
    let payload: [String: Any]
    let signingInput: [UInt8]
    let signature: [UInt8]
    var algorithm: String { header["alg"] as? String ?? "" }
    var kid: String? { header["kid"] as? String }

    init?(_ token: String) {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, token.utf8.count <= 16_384,
            let headerBytes = Self.base64URLDecode(parts[0]),
            let payloadBytes = Self.base64URLDecode(parts[1]),
            let signature = Self.base64URLDecode(parts[2]),
            let header = (try? JSONSerialization.jsonObject(with: headerBytes)) as? [String: Any],
            let payload = (try? JSONSerialization.jsonObject(with: payloadBytes)) as? [String: Any]
        else { return nil }
        self.header = header
        self.payload = payload
        self.signature = Array(signature)
        signingInput = Array(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count))
    }

    static func base64URLDecode(_ text: Substring) -> Data? {
        var base64 = String(text).replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        guard !base64.contains("=") else { return nil }
        base64 += String(repeating: "=", count: (4 - base64.utf8.count % 4) % 4)
        return Data(base64Encoded: base64)
    }
}
