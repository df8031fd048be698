import CCurl
import Synchronization

/// Forwards requests to upstreams through libcurl's multi interface on a few dedicated threads.
///
/// Knows nothing of routes: it takes an absolute URL, headers and a body stream, and reports
/// the response head, body chunks and completion to a delegate.
public final class UpstreamClient: Sendable {
    private let workers: [UpstreamWorker]
    private let next = Atomic<Int>(0)

    private static let globalInit: Void = {
        curl_global_init(Int(CURL_GLOBAL_ALL))
    }()

    /// Starts `threads` worker threads (at least one).
    public init(threads: Int) {
        _ = Self.globalInit
        workers = (0..<max(1, threads)).map { UpstreamWorker(index: $0) }
    }

    /// Begins an exchange; events arrive at `delegate` on its event loop.
    ///
    /// `worker` pins the exchange to one worker thread (modulo their number): giving every exchange of one
    /// event loop the same worker lets that worker hand each round's events to one loop in one task.
    /// Without it, workers take turns.
    public func start(_ request: UpstreamRequest, delegate: UpstreamTransferDelegate, worker: Int? = nil)
        -> UpstreamTransfer
    {
        let worker = self.worker(worker)
        let transfer = UpstreamTransfer(request: request, delegate: delegate, worker: worker)
        worker.submit(.start(transfer))
        return transfer
    }

    /// Opens a byte tunnel (see ``UpstreamTunnel``); `worker` as for ``start(_:delegate:worker:)``.
    public func openTunnel(_ request: TunnelRequest, delegate: UpstreamTunnelDelegate, worker: Int? = nil)
        -> UpstreamTunnel
    {
        let worker = self.worker(worker)
        let tunnel = UpstreamTunnel(request: request, delegate: delegate, worker: worker)
        worker.submit(.openTunnel(tunnel))
        return tunnel
    }

    /// The worker `index` names (modulo their number), or the next in turn.
    private func worker(_ index: Int?) -> UpstreamWorker {
        workers[(index ?? next.wrappingAdd(1, ordering: .relaxed).oldValue) % workers.count]
    }

    /// Cancels running exchanges and stops the threads.
    public func shutdown() {
        for worker in workers { worker.shutdown() }
    }
}
