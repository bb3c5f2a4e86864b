//! RFC 9213 targeted cache control: which field's directives govern Echo's own storing
//! and freshness decisions. The first configured targeted field (`Echo-Cache-Control`,
//! `CDN-Cache-Control`, ...) that is present and valid replaces `Cache-Control`; then,
//! when turned on, `Surrogate-Control` (`max-age`, `no-store`, as Varnish and Fastly
//! origins send it); else `Cache-Control` itself.
//!
//! Invariants: a targeted field is a Structured Fields Dictionary (RFC 9651, parsed by
//! the `sfv` crate); one that is empty or does not parse is ignored as a whole, never in
//! part; the result has the same meaning as `CacheControl::parse` gives `Cache-Control`,
//! so every decision downstream reads one type.
//!
//! What it must not do: change what clients get (`Cache-Control` goes out unchanged;
//! removing Echo's own field is the response writer's business); read request fields.

use sfv::{BareItem, Dictionary, ListEntry, Parser};

use super::{CacheControl, HeaderList, PolicyOptions};
use crate::http::headers::{header_joined_bytes, split_list};

/// Echo's own targeted field: honoured when configured, and never sent to clients
/// (RFC 9213 §2: a targeted field is for the caches it names).
pub const ECHO_CACHE_CONTROL: &str = "echo-cache-control";

/// The most a delta-seconds value can say (RFC 9111 §1.2.2).
const MAX_DELTA: u64 = 1 << 31;

impl CacheControl {
    /// The directives Echo acts on for a response (RFC 9213 §2.2): "a cache that
    /// implements this specification ... MUST use the first targeted field that is
    /// present and valid" in its list, ignoring `Cache-Control` and the fields after it.
    pub fn for_cache(headers: &HeaderList, opts: &PolicyOptions) -> CacheControl {
        for name in opts.targeted.iter() {
            if let Some(cc) = parse_targeted(headers, name) {
                return cc;
            }
        }
        if opts.surrogate_control {
            if let Some(cc) = parse_surrogate(headers) {
                return cc;
            }
        }
        CacheControl::parse(headers)
    }
}

/// One targeted field as directives; None when it is absent, empty or invalid.
// RFC 9213 §2.1: "If a targeted field in a given response is empty, or a parsing error is
// encountered, that field SHOULD be ignored by the cache (i.e., it should behave as if the
// field were not present, likely falling back to other cache-control mechanisms present)."
fn parse_targeted(headers: &HeaderList, name: &str) -> Option<CacheControl> {
    let value = header_joined_bytes(headers, name)?;
    if value.trim_ascii().is_empty() {
        return None;
    }
    let dict: Dictionary = Parser::new(&value).parse().ok()?;
    let mut cc = CacheControl::default();
    for (key, entry) in &dict {
        // RFC 9213 §2.1: "Parameters received on directives are to be ignored, unless other
        // handling is explicitly specified."
        let bare = match entry {
            ListEntry::Item(item) => Some(&item.bare_item),
            ListEntry::InnerList(_) => None,
        };
        // A directive sent as `?0` is not there.
        if matches!(bare, Some(BareItem::Boolean(false))) {
            continue;
        }
        match key.as_str() {
            "max-age" => cc.max_age = Some(seconds(bare).unwrap_or(0)),
            "s-maxage" => cc.s_maxage = Some(seconds(bare).unwrap_or(0)),
            "stale-while-revalidate" => cc.stale_while_revalidate = seconds(bare),
            "stale-if-error" => cc.stale_if_error = seconds(bare),
            "no-store" => cc.no_store = true,
            // Qualified (naming fields) or not, as in `Cache-Control`; a qualified form
            // that names nothing reads as the unqualified one.
            "no-cache" => {
                cc.no_cache_fields = field_names(entry);
                cc.no_cache = cc.no_cache_fields.is_empty();
            }
            "private" => {
                cc.private_fields = field_names(entry);
                cc.private = cc.private_fields.is_empty();
            }
            "public" => cc.public = true,
            "must-revalidate" => cc.must_revalidate = true,
            "proxy-revalidate" => cc.proxy_revalidate = true,
            "no-transform" => cc.no_transform = true,
            "immutable" => cc.immutable = true,
            "must-understand" => cc.must_understand = true,
            // RFC 9111 §5.2.3: "A cache MUST ignore unrecognized cache directives."
            _ => {}
        }
    }
    Some(cc)
}

/// An Integer argument as delta-seconds (saturating); None for any other type or a
/// negative number. RFC 9213 §2.1: directives that take delta-seconds carry Integers.
fn seconds(bare: Option<&BareItem>) -> Option<u64> {
    match bare {
        Some(BareItem::Integer(n)) => u64::try_from(i64::from(*n)).ok().map(|n| n.min(MAX_DELTA)),
        _ => None,
    }
}

/// The field names a qualified `no-cache` or `private` names: a String holding a comma
/// list (the `Cache-Control` form), or an Inner List of Strings or Tokens.
fn field_names(entry: &ListEntry) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |name: &str| {
        let name = name.trim().to_ascii_lowercase();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    };
    match entry {
        ListEntry::Item(item) => {
            if let BareItem::String(s) = &item.bare_item {
                for name in split_list(s.as_str().as_bytes()) {
                    add(&String::from_utf8_lossy(name));
                }
            }
        }
        ListEntry::InnerList(list) => {
            for item in &list.items {
                match &item.bare_item {
                    BareItem::String(s) => add(s.as_str()),
                    BareItem::Token(t) => add(t.as_str()),
                    _ => {}
                }
            }
        }
    }
    names
}

/// `Surrogate-Control` (W3C Edge Architecture Specification 1.0): its `max-age` and
/// `no-store`, unqualified; None when it has neither. Directives targeted at a named
/// device (`max-age=60;edge1`) are for that device, not for Echo. `max-age=60+30` is a
/// lifetime of 60 (the `+` part is another surrogate's grace, not a standard one).
fn parse_surrogate(headers: &HeaderList) -> Option<CacheControl> {
    let value = header_joined_bytes(headers, "surrogate-control")?;
    let mut cc = CacheControl::default();
    let mut any = false;
    for member in split_list(&value) {
        if member.contains(&b';') {
            continue;
        }
        let text = String::from_utf8_lossy(member).to_ascii_lowercase();
        let (name, arg) = text.split_once('=').unwrap_or((&text, ""));
        match name.trim() {
            "no-store" => {
                cc.no_store = true;
                any = true;
            }
            "max-age" => {
                let lifetime = arg.trim().split('+').next().unwrap_or_default();
                let secs = lifetime.parse::<u64>().map_or(0, |n| n.min(MAX_DELTA));
                cc.max_age = Some(secs);
                any = true;
            }
            _ => {}
        }
    }
    any.then_some(cc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::hdrs;

    fn opts(targeted: &[&str], surrogate_control: bool) -> PolicyOptions {
        PolicyOptions {
            targeted: targeted
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into(),
            surrogate_control,
            ..PolicyOptions::default()
        }
    }

    fn cc(fields: &[(&'static str, &str)], o: &PolicyOptions) -> CacheControl {
        let owned: Vec<(&'static str, String)> =
            fields.iter().map(|(n, v)| (*n, v.to_string())).collect();
        CacheControl::for_cache(&hdrs(&owned), o)
    }

    /// RFC 9213 §2.2: "...the first targeted field that is present and valid..." wins;
    /// Cache-Control applies only when none is.
    #[test]
    fn the_first_present_and_valid_targeted_field_wins() {
        let o = opts(&["echo-cache-control", "cdn-cache-control"], false);
        let got = cc(
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=30"),
                ("echo-cache-control", "max-age=600, stale-if-error=60"),
            ],
            &o,
        );
        assert_eq!(got.max_age, Some(600));
        assert_eq!(got.stale_if_error, Some(60));
        assert!(!got.no_store, "Cache-Control is replaced, not merged");

        let got = cc(
            &[
                ("cache-control", "max-age=5"),
                ("cdn-cache-control", "no-store"),
            ],
            &o,
        );
        assert!(got.no_store);
        assert_eq!(got.max_age, None);

        let got = cc(&[("cache-control", "max-age=5, private")], &o);
        assert_eq!(got.max_age, Some(5));
        assert!(got.private);
    }

    /// RFC 9213 §2.1: "If a targeted field in a given response is empty, or a parsing
    /// error is encountered, that field SHOULD be ignored by the cache".
    #[test]
    fn an_empty_or_invalid_targeted_field_is_ignored_as_a_whole() {
        let o = opts(&["echo-cache-control", "cdn-cache-control"], false);
        for bad in [
            "",
            "  ",
            "max-age=60, no-store=",
            "max-age=\"60",
            "Max-Age=60",
            "a,,b",
        ] {
            let got = cc(
                &[
                    ("cache-control", "max-age=5"),
                    ("echo-cache-control", bad),
                    ("cdn-cache-control", "max-age=30"),
                ],
                &o,
            );
            assert_eq!(got.max_age, Some(30), "{bad:?} should be skipped");
        }
        // Not a field Echo is configured for: ignored.
        let got = cc(
            &[
                ("cache-control", "max-age=5"),
                ("fastly-cache-control", "max-age=9"),
            ],
            &o,
        );
        assert_eq!(got.max_age, Some(5));
        // None configured: Cache-Control only.
        let got = cc(
            &[
                ("cache-control", "max-age=5"),
                ("cdn-cache-control", "max-age=9"),
            ],
            &opts(&[], false),
        );
        assert_eq!(got.max_age, Some(5));
    }

    #[test]
    fn directives_take_structured_values() {
        let o = opts(&["cdn-cache-control"], false);
        let got = cc(
            &[(
                "cdn-cache-control",
                "max-age=60;x=1, s-maxage=10, must-revalidate, no-cache=\"Set-Cookie, x-a\", \
                 private=(\"x-b\" x-c), stale-while-revalidate=5, public=?0",
            )],
            &o,
        );
        assert_eq!(got.max_age, Some(60), "parameters are ignored");
        assert_eq!(got.s_maxage, Some(10));
        assert!(got.must_revalidate);
        assert!(!got.no_cache, "qualified only");
        assert_eq!(got.no_cache_fields, ["set-cookie", "x-a"]);
        assert!(!got.private, "qualified only");
        assert_eq!(got.private_fields, ["x-b", "x-c"]);
        assert_eq!(got.stale_while_revalidate, Some(5));
        assert!(!got.public, "?0 is absent");
        // A non-Integer or negative max-age is stale (as an invalid max-age is in
        // Cache-Control); an oversized one saturates.
        for (v, want) in [
            ("max-age=\"60\"", 0),
            ("max-age=-1", 0),
            ("max-age=1.5", 0),
            ("max-age=999999999999999", MAX_DELTA),
        ] {
            assert_eq!(
                cc(&[("cdn-cache-control", v)], &o).max_age,
                Some(want),
                "{v}"
            );
        }
        // Two field lines are one dictionary.
        let got = cc(
            &[
                ("cdn-cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
            &o,
        );
        assert_eq!((got.max_age, got.no_store), (Some(60), true));
    }

    #[test]
    fn surrogate_control_is_read_only_when_turned_on_and_after_targeted_fields() {
        let fields = [
            ("cache-control", "private, max-age=5"),
            ("surrogate-control", "max-age=300+60, content=\"ESI/1.0\""),
        ];
        let off = cc(&fields, &opts(&["cdn-cache-control"], false));
        assert!(off.private);
        let on = cc(&fields, &opts(&["cdn-cache-control"], true));
        assert_eq!(on.max_age, Some(300));
        assert!(!on.private, "Surrogate-Control replaces Cache-Control");
        let targeted = cc(
            &[
                ("surrogate-control", "max-age=300"),
                ("cdn-cache-control", "max-age=7"),
            ],
            &opts(&["cdn-cache-control"], true),
        );
        assert_eq!(targeted.max_age, Some(7));
        let named_device = cc(
            &[
                ("cache-control", "max-age=5"),
                ("surrogate-control", "no-store;edge1"),
            ],
            &opts(&[], true),
        );
        assert_eq!(
            (named_device.no_store, named_device.max_age),
            (false, Some(5))
        );
        let no_store = cc(&[("surrogate-control", "No-Store")], &opts(&[], true));
        assert!(no_store.no_store);
    }
}
