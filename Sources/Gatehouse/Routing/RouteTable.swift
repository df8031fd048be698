import GatehouseConfig

/// The routes of one config, indexed so that matching does not grow with the number of routes.
///
/// Hosts are tried from the most specific (exact name, then the longest `*.suffix`, then routes without a host);
/// within a host, an exact path wins over a template, and a template over the longest prefix; ties go to the
/// route that comes first in the file. A route whose methods do not allow the request's is skipped; if only such
/// routes match, the answer is 405 with their methods.
final class RouteTable: Sendable {
    /// The outcome of matching one request.
    enum Match {
        case found(routeIndex: Int, parameters: [(name: String, value: Substring)])
        case methodNotAllowed(allow: [String])
        case notFound
    }

    private let exactHosts: [String: PathIndex]
    private let wildcardHosts: [String: PathIndex]
    private let anyHost: PathIndex
    private let methods: [Set<String>?]

    init(_ routes: [RouteConfig]) {
        var exactHosts: [String: PathIndex] = [:]
        var wildcardHosts: [String: PathIndex] = [:]
        var anyHost = PathIndex()
        var methods: [Set<String>?] = []
        for (index, route) in routes.enumerated() {
            methods.append(route.match.methods.map(Set.init))
            if let host = route.match.host {
                if host.hasPrefix("*.") {
                    wildcardHosts[String(host.dropFirst(2)), default: PathIndex()].insert(route.match, index)
                } else {
                    exactHosts[host, default: PathIndex()].insert(route.match, index)
                }
            } else {
                anyHost.insert(route.match, index)
            }
        }
        self.exactHosts = exactHosts
        self.wildcardHosts = wildcardHosts
        self.anyHost = anyHost
        self.methods = methods
    }

    /// Matches a lower-cased host without port, a normalised path and a method.
    func match(host: String, path: String, method: String) -> Match {
        var allow: Set<String> = []
        var sawPath = false
        func attempt(_ index: PathIndex?) -> Match? {
            guard let index else { return nil }
            var found: Match?
            index.forEachCandidate(for: path) { routeIndex, parameters in
                sawPath = true
                if let allowed = methods[routeIndex], !allowed.contains(method) {
                    allow.formUnion(allowed)
                    if allowed.contains("GET") { allow.insert("HEAD") }
                    guard method == "HEAD", allowed.contains("GET") else { return true }
                }
                found = .found(routeIndex: routeIndex, parameters: parameters)
                return false
            }
            return found
        }
        if let found = attempt(exactHosts[host]) { return found }
        var suffix = Substring(host)
        while !wildcardHosts.isEmpty, let dot = suffix.firstIndex(of: ".") {
            suffix = suffix[suffix.index(after: dot)...]
            if let found = attempt(wildcardHosts[String(suffix)]) { return found }
        }
        if let found = attempt(anyHost) { return found }
        return sawPath ? .methodNotAllowed(allow: allow.sorted()) : .notFound
    }
}

/// The paths of the routes for one host: exact paths in a dictionary, templates in a segment trie,
/// prefixes in a byte trie.
struct PathIndex: Sendable {
    struct Candidate {
        var routeIndex: Int
        var parameters: [(name: String, value: Substring)]
    }

    private var exact: [String: [Int]] = [:]
    private var templates = TemplateNode()
    private var prefixes = PrefixTrie()

    mutating func insert(_ match: RouteMatch, _ index: Int) {
        if let path = match.path {
            if path.contains("{") {
                templates.insert(
                    path.split(separator: "/", omittingEmptySubsequences: false).dropFirst(), index, names: [])
            } else {
                exact[path, default: []].append(index)
            }
        } else if let prefix = match.pathPrefix {
            prefixes.insert(prefix.utf8, index)
        }
    }

    /// Calls `visit` with every route whose path matches, best first, until it returns false.
    func forEachCandidate(
        for path: String, _ visit: (_ routeIndex: Int, _ parameters: [(name: String, value: Substring)]) -> Bool
    ) {
        for index in exact[path] ?? [] where !visit(index, []) { return }
        if !templates.isEmpty {
            let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
            var bound: [Substring] = []
            var matches: [Candidate] = []
            templates.collect(segments, &bound, &matches)
            // Among templates, the first in the file wins (SPEC §2), however specific the others are.
            for match in matches.sorted(by: { $0.routeIndex < $1.routeIndex })
            where !visit(match.routeIndex, match.parameters) {
                return
            }
        }
        prefixes.forEachMatch(path.utf8) { index in visit(index, []) }
    }
}

/// A trie over path segments; `{name}` segments take any one segment.
struct TemplateNode: Sendable {
    private var literal: [Substring: TemplateNode] = [:]
    private var parameter: [TemplateNode] = []
    /// Routes ending here, with their parameter names in order.
    private var routes: [(index: Int, names: [String])] = []

    var isEmpty: Bool { literal.isEmpty && parameter.isEmpty && routes.isEmpty }

    mutating func insert(_ segments: ArraySlice<Substring>, _ index: Int, names: [String]) {
        guard let first = segments.first else {
            routes.append((index, names))
            return
        }
        if first.hasPrefix("{"), first.hasSuffix("}") {
            if parameter.isEmpty { parameter.append(TemplateNode()) }
            parameter[0].insert(segments.dropFirst(), index, names: names + [String(first.dropFirst().dropLast())])
        } else {
            literal[first, default: TemplateNode()].insert(segments.dropFirst(), index, names: names)
        }
    }

    func collect(_ segments: ArraySlice<Substring>, _ bound: inout [Substring], _ out: inout [PathIndex.Candidate]) {
        guard let first = segments.first else {
            for route in routes {
                out.append(PathIndex.Candidate(routeIndex: route.index, parameters: Array(zip(route.names, bound))))
            }
            return
        }
        if let next = literal[first] { next.collect(segments.dropFirst(), &bound, &out) }
        if let next = parameter.first, !first.isEmpty {
            bound.append(first)
            next.collect(segments.dropFirst(), &bound, &out)
            bound.removeLast()
        }
    }
}

/// A trie over the bytes of path prefixes, in flat arrays: matching walks node numbers, with no dictionary
/// hashing or copying of nodes per byte.
struct PrefixTrie: Sendable {
    /// Per node: its children by byte, the routes whose prefix ends there, and its parent (-1 for the root).
    private var children: [[(byte: UInt8, node: Int)]] = [[]]
    private var routes: [[Int]] = [[]]
    private var parents: [Int] = [-1]

    mutating func insert(_ bytes: some Sequence<UInt8>, _ index: Int) {
        var node = 0
        for byte in bytes {
            if let next = children[node].first(where: { $0.byte == byte })?.node {
                node = next
                continue
            }
            children.append([])
            routes.append([])
            parents.append(node)
            children[node].append((byte, children.count - 1))
            node = children.count - 1
        }
        routes[node].append(index)
    }

    /// Calls `visit` with the routes of every prefix of `bytes`, longest first, until it returns false.
    func forEachMatch(_ bytes: String.UTF8View, _ visit: (Int) -> Bool) {
        var node = 0
        for byte in bytes {
            guard let next = children[node].first(where: { $0.byte == byte })?.node else { break }
            node = next
        }
        while node >= 0 {
            for index in routes[node] where !visit(index) { return }
            node = parents[node]
        }
    }
}
