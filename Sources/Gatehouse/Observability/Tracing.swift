import GatehouseConfig
import Instrumentation
import Logging
import NIOHTTP1
import OTel
import ServiceLifecycle
import Synchronization
import Tracing

/// OpenTelemetry tracing (`tracing:`): swift-distributed-tracing spans, exported by swift-otel over OTLP/HTTP
/// (JSON) to `<otlp_endpoint>/v1/traces`.
///
/// Sampling is parent-based and decided here, before any span exists: a client's sampled `traceparent` is always
/// followed, an unsampled one never, and without one `sample_ratio` decides. A request that is not sampled makes no
/// spans at all (its `traceparent` passes on untouched), so `sample_ratio: 0` costs one header lookup. Spans go to
/// swift-otel's batch processor, whose queue is bounded (spans past it are dropped and counted in its log); export
/// runs on its own tasks, never on an event loop.
final class GatewayTracing: Sendable {
    private let tracer: any Tracer
    /// Runs the exporter; the gateway's service group runs it and stops it last, after the drain.
    let service: any Service
    private let sampleRatio: Double

    init(_ config: TracingConfig, logger: Logger) throws {
        var configuration = OTel.Configuration.default
        configuration.serviceName = config.serviceName
        configuration.diagnosticLogger = .custom(logger)
        configuration.diagnosticLogLevel = .warning
        configuration.propagators = [.traceContext]
        configuration.metrics.enabled = false
        configuration.logs.enabled = false
        configuration.traces.enabled = true
        // Whether to trace is decided before a span starts (``begin(_:)``); every span started is recorded.
        configuration.traces.sampler = .parentBasedAlwaysOn
        configuration.traces.exporter = .otlp
        configuration.traces.otlpExporter.protocol = .httpJSON
        configuration.traces.otlpExporter.endpoint = config.otlpEndpoint + "/v1/traces"
        configuration.traces.otlpExporter.timeout = .seconds(5)
        configuration.traces.batchSpanProcessor.maxQueueSize = 8192
        configuration.traces.batchSpanProcessor.maxExportBatchSize = 512
        configuration.traces.batchSpanProcessor.scheduleDelay = .milliseconds(500)
        let backend = try OTel.makeTracingBackend(configuration: configuration)
        tracer = backend.factory
        service = backend.service
        sampleRatio = config.sampleRatio
    }

    /// The trace of a request that is sampled, with its server span started; nil when it is not.
    func begin(_ head: HTTPRequestHead) -> RequestTrace? {
        var parent = InstrumentationContext.topLevel
        if let traceparent = head.headers.first(name: "traceparent") {
            // Parent-based: the client's decision (its flags' last bit) stands; a malformed header is no parent.
            guard let sampled = Self.sampledFlag(traceparent) else { return begin(head, parent: parent) }
            guard sampled else { return nil }
            tracer.extract(head.headers, into: &parent, using: HeaderExtractor())
            return RequestTrace(tracer: tracer, head: head, parent: parent)
        }
        return begin(head, parent: parent)
    }

    private func begin(_ head: HTTPRequestHead, parent: InstrumentationContext) -> RequestTrace? {
        guard sampleRatio >= 1 || (sampleRatio > 0 && Double.random(in: 0..<1) < sampleRatio) else { return nil }
        return RequestTrace(tracer: tracer, head: head, parent: parent)
    }

    /// The sampled bit of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), or nil when it is malformed.
    static func sampledFlag(_ traceparent: String) -> Bool? {
        let utf8 = Array(traceparent.utf8)
        guard utf8.count >= 55, utf8[2] == UInt8(ascii: "-"), utf8[35] == UInt8(ascii: "-"),
            utf8[52] == UInt8(ascii: "-"), let flags = UInt8(String(decoding: utf8[53..<55], as: UTF8.self), radix: 16)
        else { return nil }
        return flags & 1 == 1
    }
}

/// The spans of one sampled request: the server span, the phase under way (auth, rate limit, cache) and the
/// upstream call. Used on the request's event loop only.
final class RequestTrace {
    /// A child span of the server span.
    enum Phase: String {
        case authenticate = "authenticate"
        case rateLimit = "rate limit"
        case cache = "cache lookup"
    }

    private let tracer: any Tracer
    let server: any Span
    private var phase: (kind: Phase, span: any Span)?
    private var upstream: (any Span)?
    /// The status the current upstream attempt answered with.
    var upstreamStatus: Int?

    init(tracer: any Tracer, head: HTTPRequestHead, parent: InstrumentationContext) {
        self.tracer = tracer
        server = tracer.startSpan(head.method.rawValue, context: parent, ofKind: .server)
        server.updateAttributes { attributes in
            attributes["http.request.method"] = head.method.rawValue
            attributes["network.protocol.version"] = head.version.major == 2 ? "2" : "1.1"
            if let agent = head.headers.first(name: "User-Agent") { attributes["user_agent.original"] = agent }
        }
    }

    /// Starts a phase's span (ending the one before, if any).
    func begin(_ kind: Phase) {
        end()
        phase = (kind, tracer.startSpan(kind.rawValue, context: server.context, ofKind: .internal))
    }

    /// Ends the phase span under way, if it is `kind` (any, when nil).
    func end(_ kind: Phase? = nil) {
        guard let current = phase, kind == nil || current.kind == kind else { return }
        current.span.end()
        phase = nil
    }

    /// Starts the span of an upstream attempt and adds its `traceparent` (and `tracestate`) to the request, in
    /// place of the client's: the upstream's parent is the gateway's span.
    func beginUpstream(_ headers: inout [(name: String, value: String)], url: String, method: String) {
        endUpstream()
        let span = tracer.startSpan(method, context: server.context, ofKind: .client)
        span.updateAttributes { attributes in
            attributes["http.request.method"] = method
            attributes["url.full"] = Self.withoutQuery(url)
        }
        headers.removeAll {
            $0.name.caseInsensitiveEquals("traceparent") || $0.name.caseInsensitiveEquals("tracestate")
        }
        tracer.inject(span.context, into: &headers, using: HeaderInjector())
        upstream = span
    }

    /// Ends the upstream attempt's span with the status it answered (``upstreamStatus``; nil: no answer).
    func endUpstream() {
        guard let span = upstream else { return }
        if let status = upstreamStatus {
            span.attributes["http.response.status_code"] = status
            if status >= 500 { span.setStatus(SpanStatus(code: .error)) }
        } else {
            span.setStatus(SpanStatus(code: .error))
        }
        span.end()
        upstream = nil
        upstreamStatus = nil
    }

    /// Ends every span, the server span last, with what the request came to.
    func finish(_ context: RequestContext) {
        end()
        endUpstream()
        let route = context.route?.config.id
        if let route { server.operationName = context.head.method.rawValue + " " + route }
        server.updateAttributes { attributes in
            attributes["url.path"] = context.path.isEmpty ? String(LogPhase.pathOnly(context.head.uri)) : context.path
            attributes["url.scheme"] = context.scheme
            attributes["client.address"] = context.clientIP
            attributes["server.address"] = context.host
            attributes["http.response.status_code"] = context.status
            if let route { attributes["http.route"] = route }
            if let caller = context.caller { attributes["gatehouse.consumer"] = caller.id }
            if let status = context.cacheStatus { attributes["http.response.header.cache-status"] = [status] }
            attributes["gatehouse.request_id"] = context.requestID
            if context.status >= 500 { attributes["error.type"] = String(context.status) }
        }
        if context.status >= 500 || context.status == 0 { server.setStatus(SpanStatus(code: .error)) }
        server.end()
    }

    private static func withoutQuery(_ url: String) -> String {
        url.firstIndex(of: "?").map { String(url[..<$0]) } ?? url
    }
}

/// Reads trace headers from a request.
private struct HeaderExtractor: Extractor {
    func extract(key: String, from carrier: HTTPHeaders) -> String? { carrier.first(name: key) }
}

/// Writes trace headers into an upstream request.
private struct HeaderInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout [(name: String, value: String)]) {
        carrier.append((key, value))
    }
}
