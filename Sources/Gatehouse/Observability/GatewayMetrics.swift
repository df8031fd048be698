import CoreMetrics
import Prometheus
import Synchronization

/// The gateway's metrics, kept in its own Prometheus registry and rendered by `GET /metrics`.
///
/// Metric objects are made once and labelled by route id or upstream name, never by raw path.
final class GatewayMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    let factory: PrometheusMetricsFactory

    init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50),
            .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5),
            .seconds(10),
        ]
        self.factory = factory
    }

    /// The Prometheus text exposition of every metric.
    func render() -> String {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }

    func routeMetrics(_ routeID: String) -> RouteMetrics { RouteMetrics(route: routeID, factory: factory) }

    /// Token requests sent to an upstream's OAuth2 token endpoint.
    func oauth2Fetches(_ upstream: String) -> CoreMetrics.Counter {
        CoreMetrics.Counter(
            label: "gatehouse_upstream_oauth2_token_fetches_total", dimensions: [("upstream", upstream)],
            factory: factory)
    }
}

/// The metrics of one route: requests by status, latency, upstream errors.
final class RouteMetrics: Sendable {
    let route: String
    let latency: CoreMetrics.Timer
    private let factory: PrometheusMetricsFactory
    private let byStatus = Mutex<[Int: CoreMetrics.Counter]>([:])
    private let upstreamErrors = Mutex<[String: CoreMetrics.Counter]>([:])

    init(route: String, factory: PrometheusMetricsFactory) {
        self.route = route
        self.factory = factory
        latency = CoreMetrics.Timer(
            label: "gatehouse_request_duration_seconds", dimensions: [("route", route)], factory: factory)
    }

    func record(status: Int, nanoseconds: Int64) {
        let counter = byStatus.withLock { cache in
            if let counter = cache[status] { return counter }
            let counter = CoreMetrics.Counter(
                label: "gatehouse_requests_total", dimensions: [("route", route), ("status", String(status))],
                factory: factory)
            cache[status] = counter
            return counter
        }
        counter.increment()
        latency.recordNanoseconds(nanoseconds)
    }

    func recordUpstreamError(upstream: String, kind: String) {
        let key = upstream + "|" + kind
        let counter = upstreamErrors.withLock { cache in
            if let counter = cache[key] { return counter }
            let counter = CoreMetrics.Counter(
                label: "gatehouse_upstream_errors_total",
                dimensions: [("route", route), ("upstream", upstream), ("kind", kind)],
                factory: factory)
            cache[key] = counter
            return counter
        }
        counter.increment()
    }
}
