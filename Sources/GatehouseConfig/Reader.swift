import Foundation
import Yams

/// One problem found in a config file, located by line and key path.
public struct ConfigIssue: Sendable, Hashable, CustomStringConvertible {
    public let file: String
    public let line: Int
    public let path: String
    public let message: String

    public var description: String {
        path.isEmpty ? "\(file):\(line): \(message)" : "\(file):\(line): \(path): \(message)"
    }
}

/// Every problem found in a config file; thrown by ``ConfigLoader``.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public let issues: [ConfigIssue]
    public var description: String { issues.map(\.description).joined(separator: "\n") }
}

/// Walks a composed YAML tree, reading typed values and collecting every error with its line and key path.
final class NodeReader {
    let file: String
    let environment: [String: String]
    private(set) var issues: [ConfigIssue] = []

    init(file: String, environment: [String: String]) {
        self.file = file
        self.environment = environment
    }

    func fail(_ node: Node?, _ path: String, _ message: String) {
        issues.append(ConfigIssue(file: file, line: node?.mark?.line ?? 1, path: path, message: message))
    }

    /// Reads a mapping, reporting keys not in `allowed` and repeated keys. Returns values by key.
    func fields(_ node: Node, _ path: String, allowed: [String]) -> Fields? {
        guard case .mapping(let mapping) = node else {
            fail(node, path, "expected a mapping, found \(kind(node))")
            return nil
        }
        var values: [String: Node] = [:]
        for (keyNode, value) in mapping {
            guard let key = keyNode.scalar?.string else {
                fail(keyNode, path, "keys must be plain strings")
                continue
            }
            let keyPath = path.isEmpty ? key : "\(path).\(key)"
            if !allowed.contains(key) {
                fail(keyNode, keyPath, "unknown key \"\(key)\"\(suggestion(key, allowed))")
            } else if values[key] != nil {
                fail(keyNode, keyPath, "key given twice")
            } else {
                values[key] = value
            }
        }
        return Fields(reader: self, node: node, path: path, values: values)
    }

    /// Reads a mapping with free-form keys, in file order.
    func pairs(_ node: Node, _ path: String) -> [(key: String, keyNode: Node, value: Node)] {
        guard case .mapping(let mapping) = node else {
            fail(node, path, "expected a mapping, found \(kind(node))")
            return []
        }
        var seen = Set<String>()
        var out: [(key: String, keyNode: Node, value: Node)] = []
        for (keyNode, value) in mapping {
            guard let key = keyNode.scalar?.string else {
                fail(keyNode, path, "keys must be plain strings")
                continue
            }
            if !seen.insert(key).inserted {
                fail(keyNode, "\(path).\(key)", "key given twice")
                continue
            }
            out.append((key, keyNode, value))
        }
        return out
    }

    func list(_ node: Node, _ path: String) -> [Node]? {
        guard case .sequence(let sequence) = node else {
            fail(node, path, "expected a list, found \(kind(node))")
            return nil
        }
        return Array(sequence)
    }

    func isNull(_ node: Node) -> Bool {
        guard case .scalar(let scalar) = node else { return false }
        return scalar.style == .plain && ["", "~", "null", "Null", "NULL"].contains(scalar.string)
    }

    /// A scalar as text, with `${NAME}` replaced from the environment.
    func string(_ node: Node, _ path: String) -> String? {
        guard case .scalar(let scalar) = node else {
            fail(node, path, "expected a string, found \(kind(node))")
            return nil
        }
        return interpolate(scalar.string, node, path)
    }

    func int(_ node: Node, _ path: String, min: Int? = nil, max: Int? = nil) -> Int? {
        guard let text = string(node, path) else { return nil }
        guard let value = Int(text) else {
            fail(node, path, "expected a whole number, found \"\(text)\"")
            return nil
        }
        return checkRange(value, node, path, min: min, max: max)
    }

    func double(_ node: Node, _ path: String, min: Double, max: Double) -> Double? {
        guard let text = string(node, path) else { return nil }
        guard let value = Double(text), value >= min, value <= max else {
            fail(node, path, "expected a number from \(min) to \(max), found \"\(text)\"")
            return nil
        }
        return value
    }

    func bool(_ node: Node, _ path: String) -> Bool? {
        guard let text = string(node, path) else { return nil }
        switch text {
        case "true", "True", "TRUE", "yes", "on": return true
        case "false", "False", "FALSE", "no", "off": return false
        default:
            fail(node, path, "expected true or false, found \"\(text)\"")
            return nil
        }
    }

    func duration(_ node: Node, _ path: String) -> ConfigDuration? {
        guard let text = string(node, path) else { return nil }
        guard let value = ConfigDuration.parse(text) else {
            fail(node, path, "expected a duration such as 250ms, 10s, 5m or 1h, found \"\(text)\"")
            return nil
        }
        return value
    }

    func size(_ node: Node, _ path: String) -> Int? {
        guard let text = string(node, path) else { return nil }
        guard let value = ConfigSize.parse(text) else {
            fail(node, path, "expected a size in bytes such as 65536, 64KiB or 10MiB, found \"\(text)\"")
            return nil
        }
        return value
    }

    func choice<T: RawRepresentable & CaseIterable>(_ node: Node, _ path: String, as: T.Type) -> T?
    where T.RawValue == String {
        guard let text = string(node, path) else { return nil }
        guard let value = T(rawValue: text) else {
            let names = T.allCases.map(\.rawValue).joined(separator: " | ")
            fail(node, path, "expected one of \(names), found \"\(text)\"")
            return nil
        }
        return value
    }

    func strings(_ node: Node, _ path: String) -> [String]? {
        guard let items = list(node, path) else { return nil }
        return items.enumerated().compactMap { index, item in string(item, "\(path)[\(index)]") }
    }

    private func checkRange(_ value: Int, _ node: Node, _ path: String, min: Int?, max: Int?) -> Int? {
        if let min, value < min {
            fail(node, path, "must be at least \(min), found \(value)")
            return nil
        }
        if let max, value > max {
            fail(node, path, "must be at most \(max), found \(value)")
            return nil
        }
        return value
    }

    private func interpolate(_ text: String, _ node: Node, _ path: String) -> String? {
        guard text.contains("${") else { return text }
        var out = ""
        var rest = Substring(text)
        var ok = true
        while let start = rest.range(of: "${") {
            out += rest[..<start.lowerBound]
            guard let end = rest[start.upperBound...].firstIndex(of: "}") else {
                fail(node, path, "unclosed ${ in \"\(text)\"")
                return nil
            }
            let name = String(rest[start.upperBound..<end])
            if let value = environment[name] {
                out += value
            } else {
                fail(node, path, "environment variable \(name) is not set")
                ok = false
            }
            rest = rest[rest.index(after: end)...]
        }
        out += rest
        return ok ? out : nil
    }

    private func kind(_ node: Node) -> String {
        switch node {
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .scalar(let scalar): return "\"\(scalar.string)\""
        case .alias: return "an alias"
        }
    }

    private func suggestion(_ key: String, _ allowed: [String]) -> String {
        let best = allowed.min { editDistance($0, key) < editDistance($1, key) }
        guard let best, editDistance(best, key) <= 2 else { return "" }
        return "; did you mean \"\(best)\"?"
    }

    private func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a)
        let b = Array(b)
        var row = Array(0...b.count)
        for i in 1...max(a.count, 1) where i <= a.count {
            var previous = row[0]
            row[0] = i
            for j in 1...max(b.count, 1) where j <= b.count {
                let current = row[j]
                row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
                previous = current
            }
        }
        return row[b.count]
    }
}

/// The checked keys of one mapping, with typed accessors that report errors under the right path.
struct Fields {
    let reader: NodeReader
    let node: Node
    let path: String
    let values: [String: Node]

    func path(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    /// The value under `key`, or nil when absent or null.
    subscript(_ key: String) -> Node? {
        guard let value = values[key], !reader.isNull(value) else { return nil }
        return value
    }

    func require(_ key: String) -> Node? {
        if let value = self[key] { return value }
        reader.fail(node, path(key), "required")
        return nil
    }

    func string(_ key: String) -> String? { self[key].flatMap { reader.string($0, path(key)) } }
    func int(_ key: String, min: Int? = nil, max: Int? = nil) -> Int? {
        self[key].flatMap { reader.int($0, path(key), min: min, max: max) }
    }
    func bool(_ key: String) -> Bool? { self[key].flatMap { reader.bool($0, path(key)) } }
    func duration(_ key: String) -> ConfigDuration? { self[key].flatMap { reader.duration($0, path(key)) } }
    func size(_ key: String) -> Int? { self[key].flatMap { reader.size($0, path(key)) } }
    func strings(_ key: String) -> [String]? { self[key].flatMap { reader.strings($0, path(key)) } }
    func choice<T: RawRepresentable & CaseIterable>(_ key: String, as type: T.Type) -> T? where T.RawValue == String {
        self[key].flatMap { reader.choice($0, path(key), as: type) }
    }
    func fail(_ key: String, _ message: String) { reader.fail(values[key] ?? node, path(key), message) }
    func line(_ key: String) -> Int { (values[key] ?? node).mark?.line ?? 1 }
}
