import CCurl
import Foundation
import NIOCore
import Synchronization

/// One thread that owns one libcurl multi handle and drives every transfer given to it.
///
/// The thread waits in `epoll_wait` on the sockets curl asks it to watch (`curl_multi_socket_action`), so each
/// round costs only what is active, not what is open. Other threads talk to it only through ``submit(_:)``,
/// which queues a command and wakes it through an eventfd; the curl handles never leave this thread.
final class UpstreamWorker: @unchecked Sendable {
    enum Command {
        case start(UpstreamTransfer)
        case unpause(UpstreamTransfer)
        case cancel(UpstreamTransfer)
        case openTunnel(UpstreamTunnel)
        /// A tunnel has bytes to send, a pause changed, or it should close.
        case tunnelWake(UpstreamTunnel)
    }

    private let multi: UnsafeMutableRawPointer
    private let epollFD: Int32
    private let wakeFD: Int32
    /// Commands for the worker thread, and whether it sleeps (so that only then is it woken).
    private struct Inbox {
        var queue: [Command] = []
        var stopping = false
        var sleeping = false
    }

    private let commands = Mutex(Inbox())
    private let stopped = DispatchSemaphore(value: 0)

    // Worker-thread state.
    private var idleHandles: [UnsafeMutableRawPointer] = []
    private var ready: [UpstreamTransfer] = []
    private var active: [ObjectIdentifier: UpstreamTransfer] = [:]
    /// Sockets registered with epoll, with the events registered. A pooled connection stays registered while
    /// curl does not watch it (it is usually wanted again at once), which saves two `epoll_ctl` per request;
    /// curl's own interest is `interested`. Entries leave when curl closes the socket.
    private var registered: [Int32: UInt32] = [:]
    private var interested: Set<Int32> = []
    /// Tunnels being connected, by easy handle, and connected ones, by socket (watched here, not by curl).
    private var connectingTunnels: [UnsafeMutableRawPointer: UpstreamTunnel] = [:]
    private var tunnels: [Int32: UpstreamTunnel] = [:]
    /// When curl wants `CURL_SOCKET_TIMEOUT` (monotonic nanoseconds); nil when it wants none.
    private var timerDeadline: UInt64?

    init(index: Int) {
        // curl_multi_init only fails on out-of-memory.
        guard let multi = curl_multi_init() else { fatalError("curl_multi_init failed") }
        self.multi = multi
        epollFD = epoll_create1(Int32(EPOLL_CLOEXEC))
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        precondition(epollFD >= 0 && wakeFD >= 0, "epoll_create1/eventfd failed: \(errno)")
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.fd = wakeFD
        epoll_ctl(epollFD, EPOLL_CTL_ADD, wakeFD, &event)

        _ = gh_multi_setopt_long(multi, CURLMOPT_MAXCONNECTS, 1024)
        let context = Unmanaged.passUnretained(self).toOpaque()
        _ = gh_multi_setopt_pointer(multi, CURLMOPT_SOCKETDATA, context)
        _ = gh_multi_setopt_socket_cb(multi) { _, socket, what, context, _ in
            guard let context else { return 0 }
            Unmanaged<UpstreamWorker>.fromOpaque(context).takeUnretainedValue().watch(socket, what)
            return 0
        }
        _ = gh_multi_setopt_pointer(multi, CURLMOPT_TIMERDATA, context)
        _ = gh_multi_setopt_timer_cb(multi) { _, milliseconds, context in
            guard let context else { return 0 }
            Unmanaged<UpstreamWorker>.fromOpaque(context).takeUnretainedValue().setTimer(milliseconds)
            return 0
        }
        let thread = Thread { [self] in run() }
        thread.name = "gatehouse-upstream-\(index)"
        thread.start()
    }

    /// Queues a command for the worker thread and wakes it if it sleeps.
    func submit(_ command: Command) {
        let mustWake = commands.withLock { inbox -> Bool in
            inbox.queue.append(command)
            defer { inbox.sleeping = false }
            return inbox.sleeping
        }
        if mustWake { wake() }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    /// Stops the thread after cancelling what is still running; waits for it.
    func shutdown() {
        commands.withLock { $0.stopping = true }
        wake()
        stopped.wait()
    }

    /// Called on this thread: the transfer has events to hand over at the end of this round.
    func markReady(_ transfer: UpstreamTransfer) {
        guard !transfer.queuedForHandOver else { return }
        transfer.queuedForHandOver = true
        ready.append(transfer)
    }

    /// curl's socket callback: watch `socket` for what curl asks, or stop watching it.
    private func watch(_ socket: curl_socket_t, _ what: Int32) {
        if what == CURL_POLL_REMOVE {
            interested.remove(socket)
            return
        }
        interested.insert(socket)
        register(
            socket,
            (what & CURL_POLL_IN != 0 ? EPOLLIN.rawValue : 0) | (what & CURL_POLL_OUT != 0 ? EPOLLOUT.rawValue : 0))
    }

    /// Watches `socket` for `wanted` (EPOLLIN, EPOLLOUT), adding it to epoll or changing what it is watched for.
    private func register(_ socket: Int32, _ wanted: UInt32) {
        if registered[socket] == wanted { return }
        var event = epoll_event()
        event.events = wanted
        event.data.fd = socket
        let operation = registered[socket] == nil ? EPOLL_CTL_ADD : EPOLL_CTL_MOD
        if epoll_ctl(epollFD, operation, socket, &event) != 0 {
            epoll_ctl(epollFD, operation == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, socket, &event)
        }
        registered[socket] = wanted
    }

    /// curl's close-socket callback: forget the socket, then close it.
    fileprivate func closeSocket(_ socket: curl_socket_t) -> Int32 {
        if registered.removeValue(forKey: socket) != nil { epoll_ctl(epollFD, EPOLL_CTL_DEL, socket, nil) }
        interested.remove(socket)
        return close(socket)
    }

    /// An event on a registered socket curl does not watch: an idle pooled connection the peer closed.
    /// Stop watching it; curl finds it dead when it next looks.
    private func unwatchIdle(_ socket: curl_socket_t) {
        registered.removeValue(forKey: socket)
        epoll_ctl(epollFD, EPOLL_CTL_DEL, socket, nil)
    }

    /// curl's timer callback: call back with `CURL_SOCKET_TIMEOUT` in `milliseconds` (-1: no timer).
    private func setTimer(_ milliseconds: Int) {
        // Capped at a day: curl never asks for more, and a huge value must not overflow.
        timerDeadline = milliseconds < 0 ? nil : Self.now() + UInt64(min(milliseconds, 86_400_000)) * 1_000_000
    }

    private static func now() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }

    private func run() {
        var running: Int32 = 0
        var batch: [Command] = []
        var events = [epoll_event](repeating: epoll_event(), count: 256)
        while true {
            let stopping = commands.withLock { state -> Bool in
                swap(&batch, &state.queue)
                return state.stopping
            }
            for command in batch { apply(command) }
            batch.removeAll(keepingCapacity: true)
            if stopping { break }
            if let deadline = timerDeadline, deadline <= Self.now() {
                timerDeadline = nil
                curl_multi_socket_action(multi, GH_CURL_SOCKET_TIMEOUT, 0, &running)
            }
            collectFinished()
            flushReady()

            var timeout: Int32 = 1000
            if let deadline = timerDeadline {
                let now = Self.now()
                timeout = deadline <= now ? 0 : Int32(min(1000, (deadline - now + 999_999) / 1_000_000))
            }
            // Look without sleeping first: under load the next event is usually there already. Only a thread
            // that found nothing to do, not even a queued command, marks itself sleeping and blocks.
            var count = epoll_wait(epollFD, &events, Int32(events.count), 0)
            if count == 0, timeout != 0 {
                let sleep = commands.withLock { inbox -> Bool in
                    guard inbox.queue.isEmpty, !inbox.stopping else { return false }
                    inbox.sleeping = true
                    return true
                }
                guard sleep else { continue }
                count = epoll_wait(epollFD, &events, Int32(events.count), timeout)
                commands.withLock { $0.sleeping = false }
            }
            guard count > 0 else { continue }
            for index in 0..<Int(count) {
                let fd = events[index].data.fd
                let flags = events[index].events
                if fd == wakeFD {
                    var value: UInt64 = 0
                    _ = Glibc.read(wakeFD, &value, 8)
                    continue
                }
                if let tunnel = tunnels[fd] {
                    serviceTunnel(tunnel)
                    continue
                }
                guard interested.contains(fd) else {
                    unwatchIdle(fd)
                    continue
                }
                var mask: Int32 = 0
                if flags & EPOLLIN.rawValue != 0 { mask |= CURL_CSELECT_IN }
                if flags & EPOLLOUT.rawValue != 0 { mask |= CURL_CSELECT_OUT }
                if flags & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0 { mask |= CURL_CSELECT_ERR }
                curl_multi_socket_action(multi, fd, mask, &running)
            }
            collectFinished()
            flushReady()
        }
        cancelAll()
        flushReady()
        for handle in idleHandles { curl_easy_cleanup(handle) }
        curl_multi_cleanup(multi)
        close(epollFD)
        close(wakeFD)
        stopped.signal()
    }

    private func apply(_ command: Command) {
        switch command {
        case .start(let transfer):
            start(transfer)
        case .unpause(let transfer):
            guard let handle = transfer.handle, !transfer.finished else { return }
            curl_easy_pause(handle, GH_CURLPAUSE_CONT)
            flushReady()
        case .cancel(let transfer):
            guard transfer.handle != nil, !transfer.finished else { return }
            finish(
                transfer,
                UpstreamCompletion(error: UpstreamError(kind: .cancelled, detail: "cancelled"), totalMicroseconds: 0))
        case .openTunnel(let tunnel):
            openTunnel(tunnel)
        case .tunnelWake(let tunnel):
            if tunnel.connected, !tunnel.closed {
                serviceTunnel(tunnel)
            } else if !tunnel.closed, tunnel.shared.withLock({ $0.closing }) {
                closeTunnel(tunnel, error: UpstreamError(kind: .cancelled, detail: "closed before connecting"))
            }
        }
    }

    // MARK: tunnels

    /// Starts connecting a tunnel: curl makes the connection (and TLS) and stops there.
    private func openTunnel(_ tunnel: UpstreamTunnel) {
        guard let handle = curl_easy_init() else {
            tunnel.closed = true
            let delegate = tunnel.delegate
            delegate.eventLoop.execute {
                delegate.tunnelClosed(tunnel, error: UpstreamError(kind: .other, detail: "curl_easy_init failed"))
            }
            return
        }
        let request = tunnel.request
        tunnel.handle = handle
        _ = gh_easy_setopt_string(handle, CURLOPT_URL, request.url)
        _ = gh_easy_setopt_long(handle, CURLOPT_CONNECT_ONLY, 1)
        _ = gh_easy_setopt_long(handle, CURLOPT_NOSIGNAL, 1)
        _ = gh_easy_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, request.connectTimeoutMilliseconds)
        _ = gh_easy_setopt_long(handle, CURLOPT_TCP_NODELAY, 1)
        _ = gh_easy_setopt_string(handle, CURLOPT_PROTOCOLS_STR, "http,https")
        _ = gh_easy_setopt_string(handle, CURLOPT_PROXY, "")
        // ALPN offers HTTP/1.1 only: the handshake that follows is an HTTP/1.1 upgrade.
        _ = gh_easy_setopt_long(handle, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_1_1)
        if request.url.hasPrefix("https:") {
            _ = gh_easy_setopt_long(handle, CURLOPT_SSL_VERIFYPEER, request.verifyTLS ? 1 : 0)
            _ = gh_easy_setopt_long(handle, CURLOPT_SSL_VERIFYHOST, request.verifyTLS ? 2 : 0)
            if let caFile = request.caFile { _ = gh_easy_setopt_string(handle, CURLOPT_CAINFO, caFile) }
        }
        _ = gh_easy_setopt_pointer(handle, CURLOPT_CLOSESOCKETDATA, Unmanaged.passUnretained(self).toOpaque())
        _ = gh_easy_setopt_closesocket_cb(handle) { worker, socket in
            guard let worker else { return close(socket) }
            return Unmanaged<UpstreamWorker>.fromOpaque(worker).takeUnretainedValue().closeSocket(socket)
        }
        connectingTunnels[handle] = tunnel
        let code = curl_multi_add_handle(multi, handle)
        if code != CURLM_OK {
            connectingTunnels[handle] = nil
            closeTunnel(
                tunnel, error: UpstreamError(kind: .other, detail: String(cString: curl_multi_strerror(code))))
        }
    }

    /// curl finished connecting a tunnel: from now on this thread watches its socket.
    private func tunnelConnectDone(_ tunnel: UpstreamTunnel, handle: UnsafeMutableRawPointer, code: CURLcode) {
        guard code == CURLE_OK else {
            closeTunnel(tunnel, error: Self.error(for: code, handle: handle))
            return
        }
        var socket: curl_socket_t = -1
        _ = gh_easy_getinfo_socket(handle, CURLINFO_ACTIVESOCKET, &socket)
        guard socket >= 0 else {
            closeTunnel(tunnel, error: UpstreamError(kind: .connect, detail: "no socket after connecting"))
            return
        }
        tunnel.socket = socket
        tunnel.connected = true
        tunnels[socket] = tunnel
        let delegate = tunnel.delegate
        delegate.eventLoop.execute { delegate.tunnelConnected(tunnel) }
        serviceTunnel(tunnel)
    }

    /// Sends what a tunnel has queued, reads what its upstream sent, and watches its socket for what is next.
    private func serviceTunnel(_ tunnel: UpstreamTunnel) {
        guard tunnel.connected, !tunnel.closed else { return }
        let (receivePaused, closing) = tunnel.shared.withLock { ($0.receivePaused, $0.closing) }
        let drained: Bool
        switch tunnel.flushOutbound() {
        case .failure(let error):
            closeTunnel(tunnel, error: error)
            return
        case .success(let all):
            drained = all
        }
        if closing, drained {
            closeTunnel(tunnel, error: nil)
            return
        }
        if !receivePaused {
            switch tunnel.receive(limit: 256 * 1024) {
            case .failure(let error):
                closeTunnel(tunnel, error: error)
                return
            case .success(nil):
                closeTunnel(tunnel, error: nil)
                return
            case .success(let chunks?):
                if !chunks.isEmpty { tunnel.deliver(chunks) }
            }
        }
        register(tunnel.socket, (receivePaused ? 0 : EPOLLIN.rawValue) | (drained ? 0 : EPOLLOUT.rawValue))
    }

    /// Ends a tunnel: curl closes its connection; the delegate hears of it once.
    private func closeTunnel(_ tunnel: UpstreamTunnel, error: UpstreamError?) {
        guard !tunnel.closed else { return }
        tunnel.closed = true
        if tunnel.socket >= 0 {
            tunnels[tunnel.socket] = nil
            if registered.removeValue(forKey: tunnel.socket) != nil {
                epoll_ctl(epollFD, EPOLL_CTL_DEL, tunnel.socket, nil)
            }
        }
        if let handle = tunnel.handle {
            connectingTunnels[handle] = nil
            curl_multi_remove_handle(multi, handle)
            curl_easy_cleanup(handle)
            tunnel.handle = nil
        }
        let delegate = tunnel.delegate
        delegate.eventLoop.execute { delegate.tunnelClosed(tunnel, error: error) }
    }

    private func start(_ transfer: UpstreamTransfer) {
        let handle: UnsafeMutableRawPointer
        if let reused = idleHandles.popLast() {
            curl_easy_reset(reused)
            handle = reused
        } else if let fresh = curl_easy_init() {
            handle = fresh
        } else {
            transfer.complete(
                UpstreamCompletion(
                    error: UpstreamError(kind: .other, detail: "curl_easy_init failed"), totalMicroseconds: 0))
            return
        }
        transfer.handle = handle
        configure(handle, for: transfer)
        active[ObjectIdentifier(transfer)] = transfer
        let code = curl_multi_add_handle(multi, handle)
        if code != CURLM_OK {
            finish(
                transfer,
                UpstreamCompletion(
                    error: UpstreamError(kind: .other, detail: String(cString: curl_multi_strerror(code))),
                    totalMicroseconds: 0))
        }
    }

    private func configure(_ handle: UnsafeMutableRawPointer, for transfer: UpstreamTransfer) {
        let request = transfer.request
        let context = Unmanaged.passRetained(transfer).toOpaque()
        _ = gh_easy_setopt_string(handle, CURLOPT_URL, request.url)
        _ = gh_easy_setopt_pointer(handle, CURLOPT_PRIVATE, context)
        _ = gh_easy_setopt_long(handle, CURLOPT_NOSIGNAL, 1)
        _ = gh_easy_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, request.connectTimeoutMilliseconds)
        _ = gh_easy_setopt_long(handle, CURLOPT_TIMEOUT_MS, request.timeoutMilliseconds)
        _ = gh_easy_setopt_long(handle, CURLOPT_TCP_NODELAY, 1)
        _ = gh_easy_setopt_string(handle, CURLOPT_PROTOCOLS_STR, "http,https")
        _ = gh_easy_setopt_long(handle, CURLOPT_FOLLOWLOCATION, 0)
        _ = gh_easy_setopt_long(handle, CURLOPT_PATH_AS_IS, 1)
        // Targets come from the config only: no proxy from the environment (and no getenv per request).
        _ = gh_easy_setopt_string(handle, CURLOPT_PROXY, "")
        _ = gh_easy_setopt_long(handle, CURLOPT_HTTP_CONTENT_DECODING, 0)
        _ = gh_easy_setopt_long(handle, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1)
        let tls = request.url.hasPrefix("https:")
        if tls {
            _ = gh_easy_setopt_long(handle, CURLOPT_SSL_VERIFYPEER, request.verifyTLS ? 1 : 0)
            _ = gh_easy_setopt_long(handle, CURLOPT_SSL_VERIFYHOST, request.verifyTLS ? 2 : 0)
            if let caFile = request.caFile { _ = gh_easy_setopt_string(handle, CURLOPT_CAINFO, caFile) }
        }
        switch (request.httpVersion, tls) {
        case (.http1, _), (.auto, false):
            _ = gh_easy_setopt_long(handle, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_1_1)
        case (.auto, true), (.http2, true):
            _ = gh_easy_setopt_long(handle, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS)
            _ = gh_easy_setopt_long(handle, CURLOPT_PIPEWAIT, 1)
        case (.http2, false):
            // h2c with prior knowledge. Debian's libcurl 7.88.1 fails every stream after the first on such a
            // connection ("Error in the HTTP2 framing layer", reused or multiplexed alike: http.c switches a
            // connection without ALPN to HTTP/2 again, and the second connection preface breaks it). So each
            // exchange gets a connection of its own, closed after it with a reset: a FIN would leave a TIME_WAIT
            // per call, and a busy target would run the gateway out of ports.
            _ = gh_easy_setopt_long(handle, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE)
            _ = gh_easy_setopt_long(handle, CURLOPT_FRESH_CONNECT, 1)
            _ = gh_easy_setopt_long(handle, CURLOPT_FORBID_REUSE, 1)
            _ = gh_easy_close_with_reset(handle)
        }

        _ = gh_easy_setopt_pointer(handle, CURLOPT_CLOSESOCKETDATA, Unmanaged.passUnretained(self).toOpaque())
        _ = gh_easy_setopt_closesocket_cb(handle) { worker, socket in
            guard let worker else { return close(socket) }
            return Unmanaged<UpstreamWorker>.fromOpaque(worker).takeUnretainedValue().closeSocket(socket)
        }
        _ = gh_easy_setopt_pointer(handle, CURLOPT_HEADERDATA, context)
        _ = gh_easy_setopt_data_cb(handle, CURLOPT_HEADERFUNCTION) { pointer, size, count, context in
            guard let pointer, let context else { return 0 }
            let transfer = Unmanaged<UpstreamTransfer>.fromOpaque(context).takeUnretainedValue()
            return transfer.headerLine(pointer, count: size * count)
        }
        _ = gh_easy_setopt_pointer(handle, CURLOPT_WRITEDATA, context)
        _ = gh_easy_setopt_data_cb(handle, CURLOPT_WRITEFUNCTION) { pointer, size, count, context in
            guard let pointer, let context else { return 0 }
            let transfer = Unmanaged<UpstreamTransfer>.fromOpaque(context).takeUnretainedValue()
            return transfer.writeBody(pointer, count: size * count)
        }

        switch (request.method, request.bodyLength) {
        case ("HEAD", _):
            _ = gh_easy_setopt_long(handle, CURLOPT_NOBODY, 1)
        case ("GET", nil):
            _ = gh_easy_setopt_long(handle, CURLOPT_HTTPGET, 1)
        case (let method, nil):
            _ = gh_easy_setopt_string(handle, CURLOPT_CUSTOMREQUEST, method)
        case (let method, .some(let length)):
            _ = gh_easy_setopt_long(handle, CURLOPT_UPLOAD, 1)
            _ = gh_easy_setopt_string(handle, CURLOPT_CUSTOMREQUEST, method)
            _ = gh_easy_setopt_off(handle, CURLOPT_INFILESIZE_LARGE, curl_off_t(length))
            _ = gh_easy_setopt_pointer(handle, CURLOPT_READDATA, context)
            _ = gh_easy_setopt_data_cb(handle, CURLOPT_READFUNCTION) { pointer, size, count, context in
                guard let pointer, let context else { return 0 }
                let transfer = Unmanaged<UpstreamTransfer>.fromOpaque(context).takeUnretainedValue()
                return transfer.readBody(into: pointer, capacity: size * count)
            }
        }

        // Stop curl from adding headers the client did not send: an empty "Expect:" and "Accept:" remove them.
        let sawAccept = request.headers.contains { $0.name.utf8.count == 6 && $0.name.lowercased() == "accept" }
        let lines = CurlHeaderLines(
            request.headers, expect: true, accept: !sawAccept, chunked: request.bodyLength == -1)
        transfer.headerLines = lines
        let list = lines.list
        _ = gh_easy_setopt_slist(handle, CURLOPT_HTTPHEADER, list)
    }

    private func collectFinished() {
        var remaining: Int32 = 0
        while let message = curl_multi_info_read(multi, &remaining) {
            guard message.pointee.msg == CURLMSG_DONE, let handle = message.pointee.easy_handle else { continue }
            let code = message.pointee.data.result
            if let tunnel = connectingTunnels.removeValue(forKey: handle) {
                tunnelConnectDone(tunnel, handle: handle, code: code)
                continue
            }
            var contextPointer: UnsafeMutableRawPointer?
            _ = gh_easy_getinfo_pointer(handle, CURLINFO_PRIVATE, &contextPointer)
            guard let contextPointer else { continue }
            let transfer = Unmanaged<UpstreamTransfer>.fromOpaque(contextPointer).takeUnretainedValue()
            var total: curl_off_t = 0
            _ = gh_easy_getinfo_off(handle, CURLINFO_TOTAL_TIME_T, &total)
            let error = code == CURLE_OK ? nil : Self.error(for: code, handle: handle)
            finish(transfer, UpstreamCompletion(error: error, totalMicroseconds: Int64(total)))
        }
    }

    private static func error(for code: CURLcode, handle: UnsafeMutableRawPointer) -> UpstreamError {
        let detail = String(cString: curl_easy_strerror(code))
        switch code {
        case CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_RESOLVE_PROXY:
            return UpstreamError(kind: .connect, detail: detail)
        case CURLE_OPERATION_TIMEDOUT:
            var connectTime: curl_off_t = 0
            _ = gh_easy_getinfo_off(handle, CURLINFO_CONNECT_TIME_T, &connectTime)
            return UpstreamError(kind: connectTime == 0 ? .connectTimeout : .timeout, detail: detail)
        case CURLE_SSL_CONNECT_ERROR, CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CERTPROBLEM, CURLE_SSL_CIPHER,
            CURLE_SSL_CACERT_BADFILE, CURLE_SSL_ISSUER_ERROR, CURLE_SSL_PINNEDPUBKEYNOTMATCH:
            return UpstreamError(kind: .tls, detail: detail)
        case CURLE_ABORTED_BY_CALLBACK, CURLE_READ_ERROR:
            return UpstreamError(kind: .requestBody, detail: detail)
        case CURLE_GOT_NOTHING, CURLE_RECV_ERROR, CURLE_SEND_ERROR, CURLE_PARTIAL_FILE, CURLE_WEIRD_SERVER_REPLY,
            CURLE_HTTP2, CURLE_HTTP2_STREAM:
            return UpstreamError(kind: .reset, detail: detail)
        default:
            return UpstreamError(kind: .other, detail: detail)
        }
    }

    private func finish(_ transfer: UpstreamTransfer, _ completion: UpstreamCompletion) {
        guard let handle = transfer.handle else { return }
        curl_multi_remove_handle(multi, handle)
        transfer.headerLines?.free()
        transfer.headerLines = nil
        transfer.handle = nil
        idleHandles.append(handle)
        active[ObjectIdentifier(transfer)] = nil
        transfer.complete(completion)
        Unmanaged.passUnretained(transfer).release()
    }

    /// Hands the events of this round over: one task per event loop, carrying every transfer that loop serves.
    private func flushReady() {
        guard !ready.isEmpty else { return }
        // A worker serves one event loop's connections, so there is usually one batch: no dictionary for it.
        var batches: [(EventLoop, [(UpstreamTransfer, UpstreamEvents)])] = []
        for transfer in ready {
            transfer.queuedForHandOver = false
            guard transfer.hasEvents else { continue }
            let loop = transfer.delegate.eventLoop
            let events = (transfer, transfer.takeEvents())
            if let index = batches.firstIndex(where: { $0.0 === loop }) {
                batches[index].1.append(events)
            } else {
                batches.append((loop, [events]))
            }
        }
        ready.removeAll(keepingCapacity: true)
        for (loop, batch) in batches {
            loop.execute {
                for (transfer, events) in batch { transfer.delegate.upstreamTransfer(transfer, received: events) }
            }
        }
    }

    private func cancelAll() {
        for tunnel in Array(tunnels.values) + Array(connectingTunnels.values) {
            closeTunnel(tunnel, error: UpstreamError(kind: .cancelled, detail: "shutting down"))
        }
        for transfer in Array(active.values) {
            finish(
                transfer,
                UpstreamCompletion(
                    error: UpstreamError(kind: .cancelled, detail: "shutting down"), totalMicroseconds: 0))
        }
    }
}
