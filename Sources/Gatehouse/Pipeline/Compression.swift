import CCompression
import GatehouseConfig
import NIOCore
import NIOHTTP1
import NIOPosix

/// A route's `compression`: decides for each answer whether it goes gzip- or br-encoded, and encodes its body as
/// it streams (each piece is flushed through, so a streamed answer is never held back to be compressed whole).
///
/// An answer is encoded when the client's `Accept-Encoding` takes gzip or br (the higher q-value wins, br on a
/// tie), the answer is of a configured type and not already encoded, it is not smaller than `min_bytes` as far as
/// its length is known, and it does not say `Cache-Control: no-transform`. Every answer the route could encode says
/// `Vary: Accept-Encoding`, encoded or not. The cache stores the identity answer and encodes each hit for its
/// client, so one entry serves both; the encoded answer's `ETag` is weak (`W/`), as its bytes differ from the
/// entity the origin tagged, and conditional requests with it still match (weak comparison).
struct CompressionPolicy: Sendable {
    private let minBytes: Int
    private let exactTypes: Set<String>
    /// Top-level types given as `type/*`.
    private let wholeTypes: Set<String>

    init(_ config: CompressionConfig) {
        minBytes = config.minBytes
        exactTypes = Set(config.types.filter { !$0.hasSuffix("/*") })
        wholeTypes = Set(config.types.filter { $0.hasSuffix("/*") }.map { String($0.dropLast(2)) })
    }

    /// Decides for an answer about to be sent and edits its headers to match; returns the encoder, or nil for an
    /// answer that goes as it is. `representation` describes the answer when `headers` do not (a 304 from the
    /// cache: the stored entry's headers); a 304 gets the `Vary` and weak `ETag` its 200 would have had.
    func begin(
        _ headers: inout HTTPHeaders, status: Int, request: HTTPRequestHead, representation: HTTPHeaders? = nil
    ) -> BodyEncoder? {
        guard status >= 200, status != 204, status != 206, eligible(representation ?? headers) else { return nil }
        headers.addVary("Accept-Encoding")
        if status == 304 {
            if request.method != .HEAD, Self.choose(request.headers["Accept-Encoding"]) != nil,
                let etag = headers.first(name: "ETag"), !etag.hasPrefix("W/")
            {
                headers.replaceOrAdd(name: "ETag", value: "W/" + etag)
            }
            return nil
        }
        // HEAD answers describe the identity answer; HTTP/1.0 has no chunked framing for a body of unknown length.
        guard request.method != .HEAD, request.version.major > 1 || request.version.minor >= 1,
            let coding = Self.choose(request.headers["Accept-Encoding"]),
            let encoder = BodyEncoder(coding)
        else { return nil }
        headers.remove(name: "Content-Length")
        // Byte ranges of the identity answer mean nothing in the encoded one.
        headers.remove(name: "Accept-Ranges")
        headers.add(name: "Content-Encoding", value: coding.rawValue)
        if request.version.major == 1, !headers.contains(name: "Transfer-Encoding") {
            headers.add(name: "Transfer-Encoding", value: "chunked")
        }
        if let etag = headers.first(name: "ETag"), !etag.hasPrefix("W/") {
            headers.replaceOrAdd(name: "ETag", value: "W/" + etag)
        }
        return encoder
    }

    /// Whether the answer itself allows encoding: its type, no encoding yet, no `no-transform`, not too small.
    private func eligible(_ headers: HTTPHeaders) -> Bool {
        guard let type = headers.first(name: "Content-Type"), !headers.contains(name: "Content-Encoding") else {
            return false
        }
        let mediaType = type.split(separator: ";", maxSplits: 1).first.map { $0.trimmedSpaces.lowercased() } ?? ""
        let topLevel = mediaType.split(separator: "/", maxSplits: 1).first.map(String.init) ?? ""
        // gRPC compresses its own messages; an encoded HTTP body would break it.
        guard exactTypes.contains(mediaType) || wholeTypes.contains(topLevel), !mediaType.hasPrefix("application/grpc")
        else { return false }
        if let length = headers.first(name: "Content-Length").flatMap(Int.init), length < minBytes { return false }
        for value in headers["Cache-Control"] where value.lowercased().contains("no-transform") { return false }
        return true
    }

    /// The coding the client prefers among those the gateway makes (RFC 9110 §12.5.3): the highest q-value above
    /// 0, where `*` stands for the codings not named; br wins a tie.
    static func choose(_ fields: [String]) -> BodyEncoder.Coding? {
        var named: [String: Double] = [:]
        var any: Double?
        for field in fields {
            for item in field.split(separator: ",") {
                let parts = item.split(separator: ";")
                guard let token = parts.first?.trimmedSpaces.lowercased(), !token.isEmpty else { continue }
                var q = 1.0
                for parameter in parts.dropFirst() {
                    let pair = parameter.split(separator: "=", maxSplits: 1)
                    if pair.count == 2, pair[0].trimmedSpaces.lowercased() == "q" {
                        q = Double(pair[1].trimmedSpaces) ?? 0
                    }
                }
                if token == "*" { any = q } else { named[token] = q }
            }
        }
        let br = named["br"] ?? any ?? 0
        let gzip = named["gzip"] ?? named["x-gzip"] ?? any ?? 0
        if br > 0, br >= gzip { return .br }
        if gzip > 0 { return .gzip }
        return nil
    }
}

/// One answer's streaming encoder: zlib (gzip framing) or Brotli, with bounded state (a 32 KiB window for gzip,
/// 256 KiB for br). The caller flushes at the end of what arrived together (``Step/flush``), so a streamed answer
/// leaves as it comes, and a body that arrives at once is one block.
final class BodyEncoder {
    /// The `Content-Encoding` an encoder produces.
    enum Coding: String {
        case gzip, br
    }

    private enum State {
        case gzip(UnsafeMutablePointer<z_stream>)
        case br(OpaquePointer)
    }

    private let state: State

    init?(_ coding: Coding) {
        switch coding {
        case .gzip:
            guard let stream = GzipStreams.take() else { return nil }
            state = .gzip(stream)
        case .br:
            guard let encoder = BrotliEncoderCreateInstance(nil, nil, nil) else { return nil }
            BrotliEncoderSetParameter(encoder, BROTLI_PARAM_QUALITY, 4)
            BrotliEncoderSetParameter(encoder, BROTLI_PARAM_LGWIN, 18)
            state = .br(encoder)
        }
    }

    deinit {
        switch state {
        case .gzip(let stream):
            GzipStreams.give(stream)
        case .br(let encoder):
            BrotliEncoderDestroyInstance(encoder)
        }
    }

    /// How far an encoding step goes.
    enum Step {
        /// Takes the input; output comes as the encoder's blocks fill.
        case more
        /// Takes the input and flushes everything so far through: what arrived together leaves together.
        case flush
        /// Takes the input and ends the stream (its trailer).
        case finish
    }

    /// Encodes a piece of the body.
    func encode(_ input: ByteBuffer, _ step: Step, allocator: ByteBufferAllocator) -> ByteBuffer {
        var output = allocator.buffer(capacity: max(64, input.readableBytes / 2 + 64))
        input.withUnsafeReadableBytes { bytes in
            switch state {
            case .gzip(let stream): deflate(stream, bytes, step, into: &output)
            case .br(let encoder): brotli(encoder, bytes, step, into: &output)
            }
        }
        return output
    }

    private func deflate(
        _ stream: UnsafeMutablePointer<z_stream>, _ bytes: UnsafeRawBufferPointer, _ step: Step,
        into output: inout ByteBuffer
    ) {
        stream.pointee.next_in = UnsafeMutablePointer(
            mutating: bytes.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.pointee.avail_in = uInt(bytes.count)
        let flush: Int32
        switch step {
        case .more: flush = Z_NO_FLUSH
        case .flush: flush = Z_SYNC_FLUSH
        case .finish: flush = Z_FINISH
        }
        let finish = step == .finish
        var result = Z_OK
        // A step is complete when deflate left output space over (all input taken, all it could give out); the
        // end when it says so.
        repeat {
            output.writeWithUnsafeMutableBytes(minimumWritableBytes: 4096) { space in
                stream.pointee.next_out = space.baseAddress?.assumingMemoryBound(to: Bytef.self)
                stream.pointee.avail_out = uInt(space.count)
                result = CCompression.deflate(stream, flush)
                return space.count - Int(stream.pointee.avail_out)
            }
        } while result != Z_STREAM_ERROR
            && (finish ? result != Z_STREAM_END : stream.pointee.avail_out == 0)
        stream.pointee.next_in = nil
    }

    private func brotli(
        _ encoder: OpaquePointer, _ bytes: UnsafeRawBufferPointer, _ step: Step, into output: inout ByteBuffer
    ) {
        var availableIn = bytes.count
        var nextIn = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self)
        let finish = step == .finish
        let operation: BrotliEncoderOperation
        switch step {
        case .more: operation = BROTLI_OPERATION_PROCESS
        case .flush: operation = BROTLI_OPERATION_FLUSH
        case .finish: operation = BROTLI_OPERATION_FINISH
        }
        repeat {
            var ok = BROTLI_TRUE
            output.writeWithUnsafeMutableBytes(minimumWritableBytes: 4096) { space in
                var availableOut = space.count
                var nextOut = space.baseAddress?.assumingMemoryBound(to: UInt8.self)
                ok = BrotliEncoderCompressStream(
                    encoder, operation, &availableIn, &nextIn, &availableOut, &nextOut, nil)
                return space.count - availableOut
            }
            if ok == BROTLI_FALSE { return }
        } while availableIn > 0 || BrotliEncoderHasMoreOutput(encoder) == BROTLI_TRUE
            || (finish && BrotliEncoderIsFinished(encoder) == BROTLI_FALSE)
    }
}

/// This thread's idle gzip streams, reset and ready: deflate's 256 KiB of state is made once per thread and reused
/// (`deflateReset`), not allocated, zeroed and freed for every answer. At most 8 wait per thread. Each pool is
/// reached through its thread's thread-specific slot only, hence unchecked Sendable.
private final class GzipStreams: @unchecked Sendable {
    private static let current = ThreadSpecificVariable<GzipStreams>()
    private var idle: [UnsafeMutablePointer<z_stream>] = []

    /// A reset stream, or a new one.
    static func take() -> UnsafeMutablePointer<z_stream>? {
        if let stream = current.currentValue?.idle.popLast() { return stream }
        let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
        stream.initialize(to: z_stream())
        // Level 1, nginx's default: most of the saving at a fraction of the CPU of the higher levels.
        guard gatehouse_deflate_init_gzip(stream, 1) == Z_OK else {
            stream.deallocate()
            return nil
        }
        return stream
    }

    /// Keeps a stream for the next answer on this thread, or frees it.
    static func give(_ stream: UnsafeMutablePointer<z_stream>) {
        let pool =
            current.currentValue
            ?? {
                let pool = GzipStreams()
                current.currentValue = pool
                return pool
            }()
        if pool.idle.count < 8, deflateReset(stream) == Z_OK {
            pool.idle.append(stream)
        } else {
            free(stream)
        }
    }

    private static func free(_ stream: UnsafeMutablePointer<z_stream>) {
        deflateEnd(stream)
        stream.deinitialize(count: 1)
        stream.deallocate()
    }

    deinit {
        for stream in idle { Self.free(stream) }
    }
}
