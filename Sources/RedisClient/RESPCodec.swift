import CHiredis
import NIOCore

/// Encodes commands with hiredis's `redisFormatCommandArgv` (binary-safe argv, no variadic calls).
enum RESPEncoder {
    static func encode(_ argv: [RedisArgument], into buffer: inout ByteBuffer) {
        // hiredis wants `const char **` and lengths: point into one contiguous copy of the arguments.
        // One trailing byte keeps the buffer non-empty, so it always has a base address.
        var flat: [UInt8] = []
        flat.reserveCapacity(argv.reduce(1) { $0 + $1.byteCount })
        var lengths: [Int] = []
        lengths.reserveCapacity(argv.count)
        for argument in argv {
            let start = flat.count
            switch argument {
            case .string(let text): flat.append(contentsOf: text.utf8)
            case .bytes(let bytes): flat.append(contentsOf: bytes)
            }
            lengths.append(flat.count - start)
        }
        flat.append(0)
        flat.withUnsafeBufferPointer { bytes in
            guard let start = bytes.baseAddress else { return }
            let base = UnsafeRawPointer(start).assumingMemoryBound(to: CChar.self)
            var pointers: [UnsafePointer<CChar>?] = []
            pointers.reserveCapacity(argv.count)
            var offset = 0
            for length in lengths {
                pointers.append(base + offset)
                offset += length
            }
            var target: UnsafeMutablePointer<CChar>?
            let length = pointers.withUnsafeMutableBufferPointer { pointerBuffer in
                lengths.withUnsafeMutableBufferPointer { lengthBuffer in
                    redisFormatCommandArgv(
                        &target, Int32(argv.count), pointerBuffer.baseAddress, lengthBuffer.baseAddress)
                }
            }
            guard length > 0, let target else { return }
            buffer.writeBytes(UnsafeRawBufferPointer(start: target, count: Int(length)))
            redisFreeCommand(target)
        }
    }
}

/// Parses replies with hiredis's reader. Owned by one connection's event loop.
final class RESPDecoder {
    private let reader: UnsafeMutablePointer<redisReader>

    init?() {
        guard let reader = redisReaderCreate() else { return nil }
        self.reader = reader
    }

    deinit { redisReaderFree(reader) }

    func feed(_ buffer: ByteBuffer) {
        buffer.withUnsafeReadableBytes { raw in
            guard let base = raw.baseAddress else { return }
            _ = redisReaderFeed(reader, base.assumingMemoryBound(to: CChar.self), raw.count)
        }
    }

    /// The next complete reply, nil when more bytes are needed; throws on a protocol error.
    func next() throws(RedisError) -> RedisValue? {
        var reply: UnsafeMutableRawPointer?
        guard redisReaderGetReply(reader, &reply) == REDIS_OK else {
            throw RedisError(.protocolError, "unparseable reply")
        }
        guard let reply else { return nil }
        defer { freeReplyObject(reply) }
        return Self.value(reply.assumingMemoryBound(to: redisReply.self))
    }

    private static func value(_ reply: UnsafeMutablePointer<redisReply>) -> RedisValue {
        let r = reply.pointee
        switch r.type {
        case REDIS_REPLY_STRING:
            return .bulk(r.str.map { Array(UnsafeRawBufferPointer(start: $0, count: Int(r.len))) } ?? [])
        case REDIS_REPLY_STATUS:
            return .simple(
                r.str.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: Int(r.len)), as: UTF8.self) }
                    ?? "")
        case REDIS_REPLY_ERROR:
            return .error(
                r.str.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: Int(r.len)), as: UTF8.self) }
                    ?? "")
        case REDIS_REPLY_INTEGER:
            return .integer(r.integer)
        case REDIS_REPLY_NIL:
            return .bulk(nil)
        case REDIS_REPLY_ARRAY:
            guard let elements = r.element else { return .array(r.elements == 0 ? [] : nil) }
            return .array((0..<Int(r.elements)).compactMap { index in elements[index].map(value) })
        default:
            return .error("unknown reply type \(r.type)")
        }
    }
}
