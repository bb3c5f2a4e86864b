//! Finding a key in the config text, so every error can say on which line.
//!
//! Owns: the map from dotted keys (`server.workers`, `route[0].url`) to their spans in
//! the TOML text, and from a byte offset back to the key that holds it.
//!
//! Invariants: read-only over the text; never fails (text that does not parse, or a key
//! it cannot find, gives `None`, and the error is reported without a line). Knows nothing
//! of which keys exist: that is `raw.rs`.

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Every `(dotted.key, span of key..end of value)` in the document, depth first.
fn spans(text: &str) -> Vec<(String, std::ops::Range<usize>)> {
    fn walk(
        prefix: &str,
        table: &toml::de::DeTable<'_>,
        out: &mut Vec<(String, std::ops::Range<usize>)>,
    ) {
        for (k, v) in table.iter() {
            let name = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            let span = k.span().start.min(v.span().start)..v.span().end.max(k.span().end);
            out.push((name.clone(), span));
            if let Some(t) = v.get_ref().as_table() {
                walk(&name, t, out);
            }
            // `[[route]]` tables: `route[0].path_prefix`, ...
            if let Some(items) = v.get_ref().as_array() {
                for (i, item) in items.iter().enumerate() {
                    if let Some(t) = item.get_ref().as_table() {
                        let item_name = format!("{name}[{i}]");
                        out.push((item_name.clone(), item.span()));
                        walk(&item_name, t, out);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(doc) = toml::de::DeTable::parse(text) {
        walk("", doc.get_ref(), &mut out);
    }
    out
}

/// The line of `key`, or of the closest table holding it when the key is missing
/// (`route[0].url` not given: the line of `route[0]`).
pub(super) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let spans = spans(text);
    let mut key = key;
    loop {
        if let Some((_, s)) = spans.iter().find(|(k, _)| k == key) {
            return Some(line_of(text, s.start));
        }
        key = &key[..key.rfind('.')?];
    }
}

/// The innermost key whose span holds `offset`, e.g. the key of a value of the wrong type.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    spans(text)
        .into_iter()
        .filter(|(_, s)| s.start <= offset && offset < s.end.max(s.start + 1))
        .min_by_key(|(_, s)| s.end - s.start)
        .map(|(k, _)| k)
}

/// The dotted key written on `line` (1-based): the nearest table header above it and the
/// key before its `=` (`[server]` then `workers = 5` is `server.workers`). For errors
/// found before the document could be walked (a duplicate key).
pub(super) fn key_on_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if let Some(header) = l.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            let name = header.split(']').next().unwrap_or("").trim();
            table = name.trim_matches('"').to_string();
        }
        if i + 1 == line {
            let (key, _) = l.split_once('=')?;
            let key = key.trim().trim_matches('"');
            if key.is_empty() || key.starts_with('[') {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    None
}
