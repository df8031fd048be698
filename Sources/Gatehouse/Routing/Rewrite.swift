import GatehouseConfig

/// Applies a route's `rewrite` to a normalised path.
enum PathRewrite {
    static func apply(
        _ rewrite: RouteRewrite?, to path: String, parameters: [(name: String, value: Substring)]
    ) -> String {
        guard let rewrite else { return path }
        if let template = rewrite.path {
            var out = ""
            for segment in template.split(separator: "/", omittingEmptySubsequences: false).dropFirst() {
                out += "/"
                if segment.hasPrefix("{"), segment.hasSuffix("}"),
                    let value = parameters.first(where: { $0.name == segment.dropFirst().dropLast() })?.value
                {
                    out += value
                } else {
                    out += segment
                }
            }
            return out.isEmpty ? "/" : out
        }
        var result = path
        if let strip = rewrite.stripPrefix, strip != "/" {
            let bare = strip.hasSuffix("/") ? String(strip.dropLast()) : strip
            if result == bare {
                result = "/"
            } else if result.hasPrefix(bare + "/") {
                result = String(result.dropFirst(bare.count))
            }
        }
        if let add = rewrite.addPrefix, add != "/" {
            result = add + result
        }
        return result
    }
}
