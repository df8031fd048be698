import CoreMetrics
import GatehouseConfig
import Instrumentation
import NIOCore
import NIOHTTP1
import Prometheus
import ServiceContextModule
import ServiceLifecycle
import Synchronization
import Tracing
import UpstreamClient
import W3CTraceContext

/// OpenTelemetry tracing (`tracing:`): spans in the OpenTelemetry model, made through swift-distributed-tracing's
/// `Tracer` and `Span` (``SpanTracer``) or, on the request path, ``RequestTrace``; exported as OTLP/HTTP protobuf
/// to `<otlp_endpoint>/v1/traces` by ``SpanExporter``.
///
/// Sampling is parent-based and decided before any span exists: a client's sampled `traceparent` is always
/// followed, an unsampled one never, and without one (or with a malformed one) `sample_ratio` decides. A request
/// that is not sampled makes no spans at all and its `traceparent` passes on untouched, so `sample_ratio: 0` costs
/// one header lookup.
///
/// Why not swift-otel: its tracer hands every span's start and end through async streams to an actor; on this
/// 2-core machine that cost 95 µs of CPU per request (0.39x the throughput of pass-through, `Scripts/bench`),
/// against a budget of 10%. Here a request's spans are plain records, put in a bounded queue in one step when the
/// request ends; encoding and sending happen on the exporter's task, never on an event loop.
final class GatewayTracing: Sendable {
    let tracer: SpanTracer
    /// Runs the export; the gateway's service group runs it, and stops it after the drain.
    let exporter: SpanExporter
    private let sampleRatio: Double

    init(_ config: TracingConfig, client: UpstreamClient, eventLoop: EventLoop, factory: PrometheusMetricsFactory) {
        let queue = SpanQueue(capacity: 32_768, factory: factory)
        tracer = SpanTracer(queue: queue)
        exporter = SpanExporter(config, queue: queue, client: client, eventLoop: eventLoop)
        sampleRatio = config.sampleRatio
    }

    /// The trace of a request that is sampled, with its server span started; nil when it is not.
    func begin(_ head: HTTPRequestHead) -> RequestTrace? {
        if let header = head.headers.first(name: "traceparent"), let parent = TraceParent(header) {
            guard parent.sampled else { return nil }
            return RequestTrace(queue: tracer.queue, head: head, parent: parent, state: head.headers["tracestate"])
        }
        guard sampleRatio >= 1 || (sampleRatio > 0 && Double.random(in: 0..<1) < sampleRatio) else { return nil }
        return RequestTrace(queue: tracer.queue, head: head, parent: nil, state: [])
    }
}

/// A W3C `traceparent` (version 00), checked by swift-w3c-trace-context.
struct TraceParent: Sendable {
    let traceID: TraceIDValue
    let spanID: UInt64
    let sampled: Bool

    init?(_ header: String) {
        guard let context = try? TraceContext(traceParentHeaderValue: header) else { return nil }
        traceID = withUnsafeBytes(of: context.traceID.bytes) { bytes in
            TraceIDValue(high: UInt64(bigEndianBytes: bytes[0..<8]), low: UInt64(bigEndianBytes: bytes[8..<16]))
        }
        spanID = withUnsafeBytes(of: context.spanID.bytes) { UInt64(bigEndianBytes: $0[0..<8]) }
        sampled = context.flags.contains(.sampled)
    }

    init(traceID: TraceIDValue, spanID: UInt64) {
        self.traceID = traceID
        self.spanID = spanID
        sampled = true
    }

    /// `00-<trace id>-<span id>-01`.
    var header: String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(55)
        bytes.append(contentsOf: "00-".utf8)
        Hex.append(traceID.high, to: &bytes)
        Hex.append(traceID.low, to: &bytes)
        bytes.append(UInt8(ascii: "-"))
        Hex.append(spanID, to: &bytes)
        bytes.append(contentsOf: "-01".utf8)
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// A 128-bit trace id.
struct TraceIDValue: Sendable, Hashable {
    let high: UInt64
    let low: UInt64

    static func random() -> TraceIDValue {
        var ids = SpanIDs()
        return TraceIDValue(high: ids.next(), low: ids.next())
    }
}

/// The spans of one sampled request, as the exchange makes them: the server span, one child per phase that does
/// work (authenticate, rate limit, cache lookup) and one per upstream attempt. Plain values with typed attributes,
/// queued together in one step when the request ends.
struct RequestTrace {
    /// A child span of the server span.
    enum Phase: String {
        case authenticate = "authenticate"
        case rateLimit = "rate limit"
        case cache = "cache lookup"
    }

    private let queue: SpanQueue
    private var spans: TracedRequest
    /// The client's `tracestate`, passed on with the gateway's `traceparent`.
    private let state: [String]
    private var phase: (kind: Phase, index: Int)?
    private var upstream: Int?
    /// The status the current upstream attempt answered with.
    var upstreamStatus: Int?

    init(queue: SpanQueue, head: HTTPRequestHead, parent: TraceParent?, state: [String]) {
        self.queue = queue
        self.state = state
        var ids = SpanIDs()
        spans = TracedRequest(
            traceID: parent?.traceID ?? .random(), spanID: ids.next(), parentID: parent?.spanID ?? 0,
            start: SpanRecord.now(), method: head.method.rawValue, http2: head.version.major == 2,
            userAgent: head.headers.first(name: "User-Agent"))
    }

    private mutating func startChild(_ name: String, kind: SpanKind) -> Int {
        var ids = SpanIDs()
        spans.children.append(ChildSpan(spanID: ids.next(), name: name, kind: kind, start: SpanRecord.now()))
        return spans.children.count - 1
    }

    /// Starts a phase's span (ending the one before, if any).
    mutating func begin(_ kind: Phase) {
        end()
        phase = (kind, startChild(kind.rawValue, kind: .internal))
    }

    /// Ends the phase span under way, if it is `kind` (any, when nil).
    mutating func end(_ kind: Phase? = nil) {
        guard let current = phase, kind == nil || current.kind == kind else { return }
        spans.children[current.index].end = SpanRecord.now()
        phase = nil
    }

    /// Starts the span of an upstream attempt and sends its `traceparent` (and the client's `tracestate`) in place
    /// of the client's: the upstream's parent is the gateway's span.
    mutating func beginUpstream(_ headers: inout [(name: String, value: String)], url: String, method: String) {
        endUpstream()
        let index = startChild(method, kind: .client)
        spans.children[index].url = url
        headers.removeAll {
            $0.name.caseInsensitiveEquals("traceparent") || $0.name.caseInsensitiveEquals("tracestate")
        }
        headers.append(
            ("traceparent", TraceParent(traceID: spans.traceID, spanID: spans.children[index].spanID).header))
        for value in state { headers.append(("tracestate", value)) }
        upstream = index
    }

    /// Ends the upstream attempt's span with the status it answered (``upstreamStatus``; nil: no answer).
    mutating func endUpstream() {
        guard let index = upstream else { return }
        spans.children[index].status = upstreamStatus
        spans.children[index].error = upstreamStatus.map { $0 >= 500 } ?? true
        spans.children[index].end = SpanRecord.now()
        upstream = nil
        upstreamStatus = nil
    }

    /// Ends every span, the server span last, with what the request came to, and queues them.
    mutating func finish(_ context: RequestContext) {
        end()
        endUpstream()
        spans.route = context.route?.config.id
        spans.path = context.path.isEmpty ? String(LogPhase.pathOnly(context.head.uri)) : context.path
        spans.scheme = context.scheme
        spans.client = context.clientIP
        spans.host = context.host
        spans.status = context.status
        spans.consumer = context.caller?.id
        spans.cacheStatus = context.cacheStatus
        spans.requestID = context.requestID
        spans.end = SpanRecord.now()
        queue.add(.request(spans))
    }
}

/// A request's spans as exported: the server span's fields and attributes (OpenTelemetry's HTTP semantic
/// conventions, plus the route, consumer and `Cache-Status`), and its children.
struct TracedRequest: Sendable {
    let traceID: TraceIDValue
    let spanID: UInt64
    /// The client's span; 0 for a root span.
    let parentID: UInt64
    let start: UInt64
    var end: UInt64 = 0
    let method: String
    let http2: Bool
    let userAgent: String?
    var route: String?
    var path = ""
    var scheme = ""
    var client = ""
    var host = ""
    var status = 0
    var consumer: String?
    var cacheStatus: String?
    var requestID = ""
    var children: [ChildSpan] = []

    init(
        traceID: TraceIDValue, spanID: UInt64, parentID: UInt64, start: UInt64, method: String, http2: Bool,
        userAgent: String?
    ) {
        self.traceID = traceID
        self.spanID = spanID
        self.parentID = parentID
        self.start = start
        self.method = method
        self.http2 = http2
        self.userAgent = userAgent
    }
}

/// A child of a request's server span: a phase, or an upstream attempt (with its URL and status).
struct ChildSpan: Sendable {
    let spanID: UInt64
    let name: String
    let kind: SpanKind
    let start: UInt64
    var end: UInt64 = 0
    var url: String?
    var status: Int?
    var error = false

    init(spanID: UInt64, name: String, kind: SpanKind, start: UInt64) {
        self.spanID = spanID
        self.name = name
        self.kind = kind
        self.start = start
    }
}

/// What waits in the export queue: a request's spans, or one span made through ``SpanTracer``.
enum QueuedSpans: Sendable {
    case request(TracedRequest)
    case span(SpanRecord)

    var count: Int {
        switch self {
        case .request(let request): 1 + request.children.count
        case .span: 1
        }
    }
}

/// One span made through ``SpanTracer``: ids, name, kind, times, attributes, and whether it failed.
struct SpanRecord: Sendable {
    let traceID: TraceIDValue
    let spanID: UInt64
    /// 0: a root span.
    let parentID: UInt64
    var name: String
    let kind: SpanKind
    let start: UInt64
    /// Nanoseconds since the epoch, set when the span ends.
    var end: UInt64 = 0
    var attributes: [(key: String, value: SpanValue)] = []
    var error = false

    init(traceID: TraceIDValue, parentID: UInt64, name: String, kind: SpanKind) {
        var ids = SpanIDs()
        self.traceID = traceID
        spanID = ids.next()
        self.parentID = parentID
        self.name = name
        self.kind = kind
        start = Self.now()
    }

    /// Wall-clock nanoseconds since the epoch.
    static func now() -> UInt64 { DefaultTracerClock.now.nanosecondsSinceEpoch }
}

/// An attribute's value, as OTLP carries it.
enum SpanValue: Sendable {
    case string(String)
    case int(Int)
    case double(Double)
    case bool(Bool)
    case strings([String])

    init(_ attribute: SpanAttribute) {
        switch attribute {
        case .int32(let value): self = .int(Int(value))
        case .int64(let value): self = .int(Int(value))
        case .double(let value): self = .double(value)
        case .bool(let value): self = .bool(value)
        case .string(let value): self = .string(value)
        case .stringArray(let values): self = .strings(values)
        default: self = .string("\(attribute)")
        }
    }
}

/// The gateway's swift-distributed-tracing tracer, for instrumentation beyond the request path: W3C trace context
/// in and out (`traceparent`), every span it starts recorded and queued for export when it ends.
final class SpanTracer: Tracer, Sendable {
    let queue: SpanQueue

    init(queue: SpanQueue) {
        self.queue = queue
    }

    func startSpan<Instant: TracerInstant>(
        _ operationName: String, context: @autoclosure () -> InstrumentationContext, ofKind kind: SpanKind,
        at instant: @autoclosure () -> Instant, function: String, file fileID: String, line: UInt
    ) -> RecordedSpan {
        let parent = context()[TraceParentKey.self]
        return RecordedSpan(
            SpanRecord(
                traceID: parent?.traceID ?? .random(), parentID: parent?.spanID ?? 0, name: operationName, kind: kind),
            queue: queue)
    }

    func forceFlush() {}

    func extract<Carrier, Extract: Extractor>(
        _ carrier: Carrier, into context: inout InstrumentationContext, using extractor: Extract
    ) where Extract.Carrier == Carrier {
        guard let header = extractor.extract(key: "traceparent", from: carrier), let parent = TraceParent(header)
        else { return }
        context[TraceParentKey.self] = parent
    }

    func inject<Carrier, Inject: Injector>(
        _ context: InstrumentationContext, into carrier: inout Carrier, using injector: Inject
    ) where Inject.Carrier == Carrier {
        guard let parent = context[TraceParentKey.self] else { return }
        injector.inject(parent.header, forKey: "traceparent", into: &carrier)
    }
}

/// Where a span's trace context lives in a swift-distributed-tracing context.
enum TraceParentKey: ServiceContextKey {
    typealias Value = TraceParent
}

/// A span made through ``SpanTracer``; queued for export once, when it ends.
final class RecordedSpan: Span, Sendable {
    private let record: Mutex<(span: SpanRecord, ended: Bool)>
    private let queue: SpanQueue
    private let identity: TraceParent

    init(_ record: SpanRecord, queue: SpanQueue) {
        identity = TraceParent(traceID: record.traceID, spanID: record.spanID)
        self.record = Mutex((record, false))
        self.queue = queue
    }

    var context: InstrumentationContext {
        var context = InstrumentationContext.topLevel
        context[TraceParentKey.self] = identity
        return context
    }

    var operationName: String {
        get { record.withLock { $0.span.name } }
        set { record.withLock { $0.span.name = newValue } }
    }

    var attributes: SpanAttributes {
        get {
            var attributes = SpanAttributes()
            for (key, value) in record.withLock({ $0.span.attributes }) {
                switch value {
                case .string(let text): attributes[key] = text
                case .int(let number): attributes[key] = number
                case .double(let number): attributes[key] = number
                case .bool(let flag): attributes[key] = flag
                case .strings(let texts): attributes[key] = texts
                }
            }
            return attributes
        }
        set {
            var list: [(key: String, value: SpanValue)] = []
            newValue.forEach { key, value in list.append((key, SpanValue(value))) }
            record.withLock { $0.span.attributes = list }
        }
    }

    var isRecording: Bool { record.withLock { !$0.ended } }

    func setStatus(_ status: SpanStatus) {
        record.withLock { $0.span.error = status.code == .error }
    }

    /// Events and links are not exported.
    func addEvent(_ event: SpanEvent) {}
    func addLink(_ link: SpanLink) {}

    func recordError<Instant: TracerInstant>(
        _ error: Error, attributes: SpanAttributes, at instant: @autoclosure () -> Instant
    ) {
        record.withLock {
            $0.span.error = true
            $0.span.attributes.append(("exception.message", .string("\(error)")))
        }
    }

    func end<Instant: TracerInstant>(at instant: @autoclosure () -> Instant) {
        let end = instant().nanosecondsSinceEpoch
        guard
            let finished = record.withLock({ state -> SpanRecord? in
                guard !state.ended else { return nil }
                state.ended = true
                state.span.end = end
                return state.span
            })
        else { return }
        queue.add(.span(finished))
    }
}

/// Ended spans waiting for export: at most `capacity` spans; past it spans are dropped and counted
/// (`gatehouse_tracing_spans_dropped_total`), so a slow or absent collector never grows memory. A request's spans
/// go in with one lock.
final class SpanQueue: Sendable {
    private let queued = Mutex<(items: [QueuedSpans], spans: Int)>(([], 0))
    private let capacity: Int
    let dropped: CoreMetrics.Counter
    let exported: CoreMetrics.Counter
    /// Wakes the exporter early when a batch's worth is waiting.
    private let wake: AsyncStream<Void>.Continuation
    let wakes: AsyncStream<Void>
    /// Spans per export request.
    static let batch = 2048

    init(capacity: Int, factory: PrometheusMetricsFactory) {
        self.capacity = capacity
        dropped = CoreMetrics.Counter(label: "gatehouse_tracing_spans_dropped_total", factory: factory)
        exported = CoreMetrics.Counter(label: "gatehouse_tracing_spans_exported_total", factory: factory)
        (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    func add(_ item: QueuedSpans) {
        let count = item.count
        let (kept, full) = queued.withLock { queued -> (Bool, Bool) in
            guard queued.spans + count <= capacity else { return (false, false) }
            let before = queued.spans
            queued.items.append(item)
            queued.spans += count
            return (true, before < Self.batch && queued.spans >= Self.batch)
        }
        if !kept { dropped.increment(by: count) }
        if full { wake.yield() }
    }

    /// Everything waiting, emptied.
    func takeAll() -> [QueuedSpans] {
        queued.withLock { queued in
            defer { queued = ([], 0) }
            return queued.items
        }
    }

    /// The exporter's timer: wakes it when anything waits.
    func tick() {
        if queued.withLock({ $0.spans > 0 }) { wake.yield() }
    }

    func finish() { wake.finish() }
}

/// Posts the queued spans to the collector in OTLP/HTTP protobuf batches of about 2048 spans, every 200 ms or as soon
/// as a batch is waiting, through the upstream client (libcurl, on its worker threads); a batch the collector does
/// not take is dropped and counted. Stops after the gateway's drain, sending what is left.
final class SpanExporter: Service, Sendable {
    private let queue: SpanQueue
    private let client: UpstreamClient
    private let eventLoop: EventLoop
    private let url: String
    private let serviceName: String

    init(_ config: TracingConfig, queue: SpanQueue, client: UpstreamClient, eventLoop: EventLoop) {
        self.queue = queue
        self.client = client
        self.eventLoop = eventLoop
        url = config.otlpEndpoint + "/v1/traces"
        serviceName = config.serviceName
    }

    func run() async throws {
        let queue = self.queue
        // A tick every 200 ms joins the early wakes; the shutdown ends both.
        let ticker = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(200))
                queue.tick()
            }
        }
        await withGracefulShutdownHandler {
            for await _ in queue.wakes { await exportQueued() }
        } onGracefulShutdown: {
            queue.finish()
        }
        ticker.cancel()
        // At shutdown, a collector that fails a batch gets no more: the rest is dropped and counted.
        await exportQueued(stopAtFailure: true)
    }

    private func exportQueued(stopAtFailure: Bool = false) async {
        var items = queue.takeAll()[...]
        while !items.isEmpty {
            var spans = 0
            var end = items.startIndex
            while end < items.endIndex, spans < SpanQueue.batch {
                spans += items[end].count
                end += 1
            }
            let body = OTLPProtobuf.request(items[..<end], serviceName: serviceName)
            items = items[end...]
            let request = UpstreamRequest(
                url: url, method: "POST",
                headers: [("Content-Type", "application/x-protobuf"), ("User-Agent", "gatehouse")],
                bodyLength: Int64(body.readableBytes), connectTimeoutMilliseconds: 1000, timeoutMilliseconds: 5000,
                verifyTLS: true, caFile: nil)
            let answer = try? await UpstreamFetch.send(
                request, body: body, client: client, on: eventLoop, limit: 64 * 1024
            ).get()
            if let answer, (200..<300).contains(answer.status) {
                queue.exported.increment(by: spans)
            } else {
                queue.dropped.increment(by: spans)
                if stopAtFailure {
                    queue.dropped.increment(by: items.reduce(0) { $0 + $1.count })
                    return
                }
            }
        }
    }
}

/// OTLP's protobuf encoding of spans (an ExportTraceServiceRequest, opentelemetry-proto's trace/v1). Each span is
/// written with plain stores into room reserved for it (``ProtoWriter``); a nested message's length is written as
/// a 4-byte varint once its end is known (protobuf readers accept such padded varints).
enum OTLPProtobuf {
    static func request(_ items: ArraySlice<QueuedSpans>, serviceName: String) -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: items.count * 768 + 256)
        var resourceSpans = 0
        var scopeSpans = 0
        let base = out.writerIndex  // where the first write's offsets count from, for the two outer lengths
        write(into: &out, room: 256 + serviceName.utf8.count) { writer in
            resourceSpans = writer.open(1)  // ExportTraceServiceRequest.resource_spans
            let resource = writer.open(1)  // ResourceSpans.resource
            writer.attribute(1, "service.name", .string(serviceName))  // Resource.attributes
            writer.close(resource)
            scopeSpans = writer.open(2)  // ResourceSpans.scope_spans
            let scope = writer.open(1)  // ScopeSpans.scope
            writer.string(1, "gatehouse")
            writer.close(scope)
        }
        for item in items {
            switch item {
            case .request(let request): write(into: &out, room: room(request)) { encode(request, &$0) }
            case .span(let span): write(into: &out, room: room(span)) { encode(span, &$0) }
            }
        }
        ProtoWriter.patchLength(in: &out, at: base + scopeSpans)
        ProtoWriter.patchLength(in: &out, at: base + resourceSpans)
        return out
    }

    /// Writes with a ``ProtoWriter`` into `room` reserved bytes; a part that would not fit is left out whole.
    private static func write(into out: inout ByteBuffer, room: Int, _ body: (inout ProtoWriter) -> Void) {
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: room) { bytes in
            var writer = ProtoWriter(bytes)
            body(&writer)
            return writer.overflowed ? 0 : writer.count
        }
    }

    /// More than a request's spans can take: fixed parts, and every string they carry.
    private static func room(_ request: TracedRequest) -> Int {
        var strings = request.method.utf8.count + request.path.utf8.count + request.scheme.utf8.count
        strings += request.client.utf8.count + request.host.utf8.count + request.requestID.utf8.count
        strings += (request.route?.utf8.count ?? 0) * 2 + (request.userAgent?.utf8.count ?? 0)
        strings += (request.consumer?.utf8.count ?? 0) + (request.cacheStatus?.utf8.count ?? 0)
        var children = 0
        for child in request.children { children += 512 + child.name.utf8.count * 2 + (child.url?.utf8.count ?? 0) }
        return 1024 + strings + children
    }

    private static func room(_ span: SpanRecord) -> Int {
        var room = 512 + span.name.utf8.count
        for (key, value) in span.attributes {
            room += 32 + key.utf8.count
            switch value {
            case .string(let text): room += text.utf8.count
            case .strings(let texts): room += texts.reduce(0) { $0 + 16 + $1.utf8.count }
            default: room += 16
            }
        }
        return room
    }

    /// A request's server span and its children.
    private static func encode(_ request: TracedRequest, _ writer: inout ProtoWriter) {
        let span = begin(
            request.traceID, request.spanID, request.parentID, name: request.method, suffix: request.route,
            kind: .server, start: request.start, end: request.end, &writer)
        writer.attribute(9, "http.request.method", .string(request.method))
        writer.attribute(9, "network.protocol.version", .string(request.http2 ? "2" : "1.1"))
        writer.attribute(9, "url.path", .string(request.path))
        writer.attribute(9, "url.scheme", .string(request.scheme))
        writer.attribute(9, "client.address", .string(request.client))
        writer.attribute(9, "server.address", .string(request.host))
        writer.attribute(9, "http.response.status_code", .int(request.status))
        writer.attribute(9, "gatehouse.request_id", .string(request.requestID))
        if let agent = request.userAgent { writer.attribute(9, "user_agent.original", .string(agent)) }
        if let route = request.route { writer.attribute(9, "http.route", .string(route)) }
        if let consumer = request.consumer { writer.attribute(9, "gatehouse.consumer", .string(consumer)) }
        if let cacheStatus = request.cacheStatus {
            writer.attribute(9, "http.response.header.cache-status", .strings([cacheStatus]))
        }
        if request.status >= 500 { writer.attribute(9, "error.type", .string(String(request.status))) }
        writer.status(error: request.status >= 500 || request.status == 0)
        writer.close(span)
        for child in request.children {
            let span = begin(
                request.traceID, child.spanID, request.spanID, name: child.name, suffix: nil, kind: child.kind,
                start: child.start, end: child.end, &writer)
            if let url = child.url {
                writer.attribute(9, "http.request.method", .string(child.name))
                let withoutQuery = url.utf8.firstIndex(of: UInt8(ascii: "?")).map { String(url[..<$0]) } ?? url
                writer.attribute(9, "url.full", .string(withoutQuery))
                if let status = child.status { writer.attribute(9, "http.response.status_code", .int(status)) }
            }
            writer.status(error: child.error)
            writer.close(span)
        }
    }

    /// A span made through ``SpanTracer``.
    private static func encode(_ record: SpanRecord, _ writer: inout ProtoWriter) {
        let span = begin(
            record.traceID, record.spanID, record.parentID, name: record.name, suffix: nil, kind: record.kind,
            start: record.start, end: record.end, &writer)
        for (key, value) in record.attributes { writer.attribute(9, key, value) }
        writer.status(error: record.error)
        writer.close(span)
    }

    /// Opens a span (ScopeSpans.spans, 2) and writes its ids, name (`name suffix` with a suffix), kind and times.
    private static func begin(
        _ trace: TraceIDValue, _ spanID: UInt64, _ parent: UInt64, name: String, suffix: String?, kind: SpanKind,
        start: UInt64, end: UInt64, _ writer: inout ProtoWriter
    ) -> Int {
        let span = writer.open(2)
        writer.tag(1, .bytes)  // trace_id
        writer.byte(16)
        writer.bigEndian(trace.high)
        writer.bigEndian(trace.low)
        writer.tag(2, .bytes)  // span_id
        writer.byte(8)
        writer.bigEndian(spanID)
        if parent != 0 {
            writer.tag(4, .bytes)  // parent_span_id
            writer.byte(8)
            writer.bigEndian(parent)
        }
        writer.tag(5, .bytes)  // name
        if let suffix {
            writer.varint(UInt64(name.utf8.count + 1 + suffix.utf8.count))
            writer.text(name)
            writer.byte(UInt8(ascii: " "))
            writer.text(suffix)
        } else {
            writer.varint(UInt64(name.utf8.count))
            writer.text(name)
        }
        writer.tag(6, .varint)  // kind
        writer.byte(number(kind))
        writer.tag(7, .fixed64)  // start_time_unix_nano
        writer.littleEndian(start)
        writer.tag(8, .fixed64)  // end_time_unix_nano
        writer.littleEndian(end)
        return span
    }

    /// OTLP's SpanKind numbers.
    static func number(_ kind: SpanKind) -> UInt8 {
        switch kind {
        case .internal: 1
        case .server: 2
        case .client: 3
        case .producer: 4
        case .consumer: 5
        }
    }
}

/// Writes protobuf into reserved bytes with plain stores. Past the end it writes nothing and says so
/// (``overflowed``), so a wrong estimate loses a span, never memory.
struct ProtoWriter {
    /// Protobuf's wire types.
    enum Wire: UInt8 {
        case varint = 0, fixed64 = 1, bytes = 2
    }

    private let bytes: UnsafeMutableRawBufferPointer
    private(set) var count = 0
    private(set) var overflowed = false

    init(_ bytes: UnsafeMutableRawBufferPointer) {
        self.bytes = bytes
    }

    private mutating func fits(_ size: Int) -> Bool {
        if count + size > bytes.count { overflowed = true }
        return !overflowed
    }

    mutating func byte(_ value: UInt8) {
        guard fits(1) else { return }
        bytes[count] = value
        count += 1
    }

    mutating func bigEndian(_ value: UInt64) {
        guard fits(8) else { return }
        bytes.storeBytes(of: value.bigEndian, toByteOffset: count, as: UInt64.self)
        count += 8
    }

    mutating func littleEndian(_ value: UInt64) {
        guard fits(8) else { return }
        bytes.storeBytes(of: value.littleEndian, toByteOffset: count, as: UInt64.self)
        count += 8
    }

    mutating func text(_ value: String) {
        var value = value
        value.withUTF8 { utf8 in
            guard fits(utf8.count), let source = utf8.baseAddress, let target = bytes.baseAddress else { return }
            (target + count).copyMemory(from: source, byteCount: utf8.count)
            count += utf8.count
        }
    }

    mutating func tag(_ field: UInt8, _ wire: Wire) { byte(field << 3 | wire.rawValue) }

    mutating func varint(_ value: UInt64) {
        var rest = value
        while rest >= 0x80 {
            byte(UInt8(truncatingIfNeeded: rest) | 0x80)
            rest >>= 7
        }
        byte(UInt8(rest))
    }

    mutating func string(_ field: UInt8, _ value: String) {
        tag(field, .bytes)
        varint(UInt64(value.utf8.count))
        text(value)
    }

    /// Starts a length-delimited field; returns where its 4-byte length goes (relative to this writer).
    mutating func open(_ field: UInt8) -> Int {
        tag(field, .bytes)
        let at = count
        guard fits(4) else { return at }
        count += 4
        return at
    }

    /// Ends a field ``open(_:)`` started: its length, as a varint padded to 4 bytes.
    mutating func close(_ at: Int) {
        guard !overflowed else { return }
        bytes.storeBytes(of: Self.padded(UInt32(count - at - 4)).littleEndian, toByteOffset: at, as: UInt32.self)
    }

    /// A length as a 4-byte varint.
    static func padded(_ length: UInt32) -> UInt32 {
        (length & 0x7F | 0x80) | ((length >> 7) & 0x7F | 0x80) << 8 | ((length >> 14) & 0x7F | 0x80) << 16
            | ((length >> 21) & 0x7F) << 24
    }

    /// Ends a field opened in an earlier write: `at` is its length's place in `buffer`'s storage.
    static func patchLength(in buffer: inout ByteBuffer, at: Int) {
        let length = UInt32(buffer.writerIndex - at - 4)
        buffer.setInteger(padded(length), at: at, endianness: .little)
    }

    /// A KeyValue as field `field` (Span.attributes is 9, Resource.attributes 1).
    mutating func attribute(_ field: UInt8, _ key: String, _ value: SpanValue) {
        let keyValue = open(field)
        string(1, key)
        let any = open(2)  // KeyValue.value: AnyValue
        switch value {
        case .string(let text): string(1, text)
        case .bool(let flag):
            tag(2, .varint)
            byte(flag ? 1 : 0)
        case .int(let number):
            tag(3, .varint)
            varint(UInt64(bitPattern: Int64(number)))
        case .double(let number):
            tag(4, .fixed64)
            littleEndian(number.bitPattern)
        case .strings(let texts):
            let array = open(5)  // ArrayValue { values (1): AnyValue }
            for text in texts {
                let element = open(1)
                string(1, text)
                close(element)
            }
            close(array)
        }
        close(any)
        close(keyValue)
    }

    /// Span.status (15) { code (3): 2 for an error, else unset }.
    mutating func status(error: Bool) {
        tag(15, .bytes)
        if error {
            byte(2)
            tag(3, .varint)
            byte(2)
        } else {
            byte(0)
        }
    }
}

/// Lower-case hex of ids, for `traceparent`.
enum Hex {
    static let digits = Array("0123456789abcdef".utf8)

    /// The 16 hex digits of a 64-bit value, most significant first.
    static func append(_ value: UInt64, to out: inout [UInt8]) {
        var shift: UInt64 = 60
        for _ in 0..<16 {
            out.append(digits[Int((value >> shift) & 0xF)])
            shift &-= 4
        }
    }
}

extension UInt64 {
    /// The value of 8 big-endian bytes.
    init(bigEndianBytes bytes: Slice<UnsafeRawBufferPointer>) {
        var value: UInt64 = 0
        for byte in bytes { value = value << 8 | UInt64(byte) }
        self = value
    }
}

/// Span and trace ids: SplitMix64 over a per-process random seed and a shared counter, so that ids are unique,
/// never 0, evenly spread (trace ids carry the randomness W3C sampling expects) and cost no system call.
struct SpanIDs: RandomNumberGenerator {
    private static let seed = UInt64.random(in: 0...UInt64.max)
    private static let counter = Atomic<UInt64>(0)

    mutating func next() -> UInt64 {
        var z = Self.seed &+ Self.counter.wrappingAdd(1, ordering: .relaxed).newValue &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return z == 0 ? 1 : z
    }
}
