"""The hostile-input defences, in the order a request meets them: the guard (keys, sizes, content
types, before any body is parsed), JSON limits (``safejson``), admission (bounds, rate, Retry-After),
uploads (sniffing and sandboxed decoding), client paths (the opt-in allow-listed directories), intake
(body → library params) and the one error model (``errors``)."""
