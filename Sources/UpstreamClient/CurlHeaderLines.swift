import CCurl

/// A request's header lines as curl reads them (`CURLOPT_HTTPHEADER`): the list's nodes and the NUL-terminated
/// lines in one allocation, where `curl_slist_append` makes two per line. curl only reads the list, until the
/// transfer ends; then ``free()``.
struct CurlHeaderLines {
    private let memory: UnsafeMutableRawPointer
    /// The first node, for `CURLOPT_HTTPHEADER`.
    let list: UnsafeMutablePointer<curl_slist>?

    /// `name: value` per header (`name;` for an empty value, curl's way to send one), then `Expect:` and `Accept:`
    /// (empty: curl sends none of its own), and `Transfer-Encoding: chunked`, as asked.
    init(_ headers: [(name: String, value: String)], expect: Bool, accept: Bool, chunked: Bool) {
        let extras: [StaticString] = ["Expect:", "Accept:", "Transfer-Encoding: chunked"]
        let wanted = [expect, accept, chunked]
        var count = 0
        var bytes = 0
        for (name, value) in headers {
            bytes += name.utf8.count + (value.isEmpty ? 1 : 2 + value.utf8.count) + 1
            count += 1
        }
        for (extra, wanted) in zip(extras, wanted) where wanted {
            bytes += extra.utf8CodeUnitCount + 1
            count += 1
        }
        let nodeBytes = count * MemoryLayout<curl_slist>.stride
        memory = UnsafeMutableRawPointer.allocate(
            byteCount: max(1, nodeBytes + bytes), alignment: MemoryLayout<curl_slist>.alignment)
        let nodes = memory.bindMemory(to: curl_slist.self, capacity: count)
        var cursor = (memory + nodeBytes).bindMemory(to: UInt8.self, capacity: bytes)
        var index = 0
        func copy(_ source: UnsafeRawBufferPointer) {
            guard let base = source.baseAddress, source.count > 0 else { return }
            UnsafeMutableRawPointer(cursor).copyMemory(from: base, byteCount: source.count)
            cursor += source.count
        }
        func copy(_ text: String) {
            var text = text
            text.withUTF8 { copy(UnsafeRawBufferPointer($0)) }
        }
        func copy(_ text: StaticString) { text.withUTF8Buffer { copy(UnsafeRawBufferPointer($0)) } }
        func line(_ write: () -> Void) {
            let start = cursor
            write()
            cursor.pointee = 0
            cursor += 1
            let next = index + 1 < count ? nodes + index + 1 : nil
            (nodes + index).initialize(
                to: curl_slist(data: UnsafeMutableRawPointer(start).assumingMemoryBound(to: CChar.self), next: next))
            index += 1
        }
        for (name, value) in headers {
            line {
                copy(name)
                if value.isEmpty {
                    copy(";")
                } else {
                    copy(": ")
                    copy(value)
                }
            }
        }
        for (extra, wanted) in zip(extras, wanted) where wanted {
            line { copy(extra) }
        }
        list = count > 0 ? nodes : nil
    }

    func free() { memory.deallocate() }
}
