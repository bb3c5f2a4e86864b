//! Which stored entries an invalidation names: [`Matcher`] (a pattern searched in the
//! request target, an exact Host, a `Surrogate-Key` tag), the literal prefix that lets a
//! store read only the keys that can match, and the check that a pattern names every
//! entry (which the admin API makes the request say with `"all": true`).
//!
//! Invariants: a pattern is a linear-time `regex` with a size limit, searched in the
//! stored request target (path and query), never in the whole key; a matcher is plain
//! data: it does no I/O and takes no lock, so a store decides where it runs (never under
//! a lock that lookups need).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use regex::Regex;

use crate::key::split_key;

/// Most URLs one exact-URL purge names.
pub const MAX_URLS: usize = 1000;

/// Longest pattern accepted, in bytes.
pub(crate) const MAX_PATTERN_BYTES: usize = 4096;
/// Compiled-regex size limit (the regex's NFA): a pattern over it is refused. At 256 KiB
/// a pattern compiles in about 2 ms at most (1 MiB allowed 11 ms, and patterns like
/// `(?:.{0,30}a){0,30}Q`), and ordinary ones stay far below it (`^/orgs/\d+/` fits in
/// 16 KiB); the Unicode classes are what grow it, each copy tens of KiB (`\w{5}` fits,
/// `\w{10}` does not; `(?-u:\w){10}` or `[a-zA-Z0-9_]{10}` does).
///
/// A size limit does not bound the time a match takes (a small NFA can make the lazy DFA
/// thrash: `(?:a{0,30}a){0,30}[^a]` costs ~50 ms per 4 KB key). That is what a job's
/// time budget and cancel are for, and why no store matches under a lock.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// The lazy DFA's cache of a job's regex. A smaller cache is not safer, only slower:
/// it thrashes sooner (measured: 4x to 40x slower per key at 256 KiB on such patterns).
/// It lives as long as the job: bans and reports keep no compiled regex.
const REGEX_DFA_LIMIT: usize = 1 << 20;

/// Which entries an invalidation names: a regex searched in the request target, an
/// optional exact Host, an optional tag (`Surrogate-Key`). Every given part must match.
#[derive(Debug, Clone)]
pub struct Matcher {
    regex: Option<Regex>,
    /// The literal every match starts with, when the regex is anchored (`^/orgs/42/`).
    prefix: Option<String>,
    host: Option<String>,
    tag: Option<String>,
    /// Exact cache keys (`http://host/target`), for a purge by URL: these and nothing
    /// else, with no pattern.
    urls: Option<Arc<BTreeSet<String>>>,
}

/// Why an invalidation request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Matcher {
    pub fn new(
        pattern: Option<&str>,
        host: Option<&str>,
        tag: Option<&str>,
    ) -> Result<Matcher, BadRequest> {
        if pattern.is_none() && tag.is_none() {
            return Err(BadRequest(
                "give a pattern, a tag, or both; or a url or urls".into(),
            ));
        }
        let (regex, prefix) = match pattern {
            None => (None, None),
            Some("") => {
                return Err(BadRequest(
                    "the pattern is empty (it would match everything)".into(),
                ))
            }
            Some(p) if p.len() > MAX_PATTERN_BYTES => {
                return Err(BadRequest(format!(
                    "the pattern is longer than {MAX_PATTERN_BYTES} bytes"
                )))
            }
            Some(p) => {
                let regex = regex::RegexBuilder::new(p)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_DFA_LIMIT)
                    .build()
                    .map_err(|e| match e {
                        regex::Error::CompiledTooBig(_) => BadRequest(format!(
                            "invalid pattern: it compiles to more than {} KiB; use fewer or \
                             shorter repetitions, and ASCII classes ((?-u:\\w), [0-9]) \
                             rather than Unicode ones (\\w, \\d, .) inside them",
                            REGEX_SIZE_LIMIT / 1024
                        )),
                        e => BadRequest(format!("invalid pattern: {e}")),
                    })?;
                (Some(regex), literal_prefix(p))
            }
        };
        let host = match host {
            None => None,
            Some(h) if h.is_empty() || h.contains(['/', ' ', '*']) => {
                return Err(BadRequest(format!("invalid host {h:?}")))
            }
            Some(h) => {
                let h = h.to_ascii_lowercase();
                Some(h.strip_suffix(":80").unwrap_or(&h).to_string())
            }
        };
        let tag = match tag {
            None => None,
            Some(t) if t.is_empty() || t.contains([' ', ',']) => {
                return Err(BadRequest(format!("invalid tag {t:?}")))
            }
            Some(t) => Some(t.to_string()),
        };
        Ok(Matcher {
            regex,
            prefix,
            host,
            tag,
            urls: None,
        })
    }

    /// Exactly these URLs (`http://host/path?query` or `https://`), every Vary variant
    /// under each, at most [`MAX_URLS`]: no regex, no escaping. A URL's key is the one a
    /// request for it is cached under: the host lower-cased without a default port
    /// (`:80`, and `:443` for https), the target as given (`/` when it has none); the
    /// scheme is not part of it (Echo's listener is plain HTTP: TLS ends in front of it).
    pub fn for_urls(urls: &[String]) -> Result<Matcher, BadRequest> {
        if urls.is_empty() {
            return Err(BadRequest("give at least one URL".into()));
        }
        if urls.len() > MAX_URLS {
            return Err(BadRequest(format!(
                "{} URLs: at most {MAX_URLS} per call",
                urls.len()
            )));
        }
        let keys = urls
            .iter()
            .map(|u| {
                url_key(u).ok_or_else(|| {
                    BadRequest(format!("invalid URL {u:?}: give http://host/path?query"))
                })
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        Ok(Matcher {
            regex: None,
            prefix: None,
            host: None,
            tag: None,
            urls: Some(Arc::new(keys)),
        })
    }

    /// The exact keys of a purge by URL.
    pub(crate) fn urls(&self) -> Option<&BTreeSet<String>> {
        self.urls.as_deref()
    }

    /// Exactly one cache key (every Vary variant under it): what an unsafe method's
    /// answer invalidates. A target too long to compile as a pattern names the whole
    /// host instead: broader, never narrower.
    pub(crate) fn for_key(key: &crate::key::CacheKey) -> Matcher {
        let exact = format!("^{}$", regex::escape(key.target()));
        let regex = regex::RegexBuilder::new(&exact)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_DFA_LIMIT)
            .build()
            .ok();
        Matcher {
            prefix: regex.as_ref().map(|_| key.target().to_string()),
            regex,
            host: Some(key.host().to_string()),
            tag: None,
            urls: None,
        }
    }

    pub fn pattern(&self) -> Option<&str> {
        self.regex.as_ref().map(|r| r.as_str())
    }

    pub(crate) fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    pub(crate) fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The literal start of every target the pattern can match, if any.
    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// Does a cache key (`http://host/target`) match the pattern and host parts?
    /// The tag part is the store's to check (it knows where tags live).
    pub fn matches_key(&self, key: &str) -> bool {
        if let Some(urls) = &self.urls {
            return urls.contains(key);
        }
        let Some((host, target)) = split_key(key) else {
            return false;
        };
        if self.host.as_deref().is_some_and(|h| h != host) {
            return false;
        }
        self.regex.as_ref().is_none_or(|r| r.is_match(target))
    }

    /// Does an entry with these tags match the tag part?
    pub(crate) fn matches_tags(&self, tags: &[String]) -> bool {
        self.tag
            .as_ref()
            .is_none_or(|t| tags.iter().any(|x| x == t))
    }

    /// Does the pattern name every stored entry (of its host, if one is given)? Then the
    /// request must say `"all": true`. A tag narrows it: such a matcher never does.
    ///
    /// Sound for the patterns people type by mistake: one that can match the empty
    /// string with no assertion around it (`(?:)`, `.*`, `x?`) matches at the start of
    /// every target; otherwise it is tried on probes that share nothing but the leading
    /// `/` every target has: the shortest target, and a long one made of characters no
    /// ordinary pattern asks for. `^`, `.`, `/`, `^/`, `a|.` match both; `^/orgs/` and
    /// `^/$` do not. A pattern that matches both probes without matching everything
    /// (`^/(?:$|~)`) also needs `all`: refusing is the safe side.
    pub(crate) fn matches_every_target(&self) -> bool {
        if self.tag.is_some() || self.urls.is_some() {
            return false;
        }
        let Some(regex) = &self.regex else {
            return false;
        };
        let empty_anywhere = regex_syntax::Parser::new()
            .parse(regex.as_str())
            .is_ok_and(|hir| {
                let props = hir.properties();
                props.minimum_len() == Some(0) && props.look_set().is_empty()
            });
        empty_anywhere || MATCH_ALL_PROBES.iter().all(|p| regex.is_match(p))
    }

    /// A description for logs and job reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.regex {
            parts.push(format!("pattern={:?}", r.as_str()));
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={h}"));
        }
        if let Some(t) = &self.tag {
            parts.push(format!("tag={t}"));
        }
        if let Some(urls) = &self.urls {
            match urls.len() {
                1 => parts.push(format!("url={}", urls.iter().next().map_or("", |u| u))),
                n => parts.push(format!("urls={n}")),
            }
        }
        parts.join(" ")
    }
}

/// The cache key a request for `url` is stored under (see [`Matcher::for_urls`]).
pub(crate) fn url_cache_key(url: &str) -> Option<crate::key::CacheKey> {
    crate::key::CacheKey::parse(&url_key(url)?)
}

/// The cache key of a URL (see [`Matcher::for_urls`]); None when it is not an absolute
/// http(s) URL with a host.
fn url_key(url: &str) -> Option<String> {
    let (https, rest) = match url.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => (false, rest),
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => (true, rest),
        _ => return None,
    };
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    // No fragment: it is never sent; no user info, spaces or controls.
    let target = target.split('#').next().unwrap_or("/").to_string();
    if authority.is_empty()
        || authority.contains(['@', ' ', '\\'])
        || target.bytes().any(|b| b <= b' ' || b == 0x7F)
    {
        return None;
    }
    let host = authority.to_ascii_lowercase();
    let default_port = if https { ":443" } else { ":80" };
    let host = host.strip_suffix(default_port).unwrap_or(&host);
    Some(format!("http://{host}{target}"))
}

/// Request targets with nothing in common but their leading `/`: a pattern that matches
/// all of them is taken to match every target (see [`Matcher::matches_every_target`]).
const MATCH_ALL_PROBES: [&str; 2] = ["/", "/~%7E~.-_!$&'()*+,;=:@%25/~~~?~=~&~~=~~~~~~~~~~~~~~~~"];

/// The literal prefix of an anchored pattern (`^/orgs/42/` → `/orgs/42/`), found with
/// regex-syntax so alternations, optional characters and case-insensitivity are
/// handled exactly; None when the pattern is not anchored at the start.
fn literal_prefix(pattern: &str) -> Option<String> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    use regex_syntax::hir::Look;
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    if !hir.properties().look_set_prefix().contains(Look::Start) {
        return None;
    }
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let prefix = seq.longest_common_prefix()?;
    let prefix = std::str::from_utf8(prefix).ok()?;
    (!prefix.is_empty()).then(|| prefix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_matcher_names_that_key_only() {
        let key = crate::key::CacheKey::new("http", "a.example", "/x?q=(1)+[2]");
        let m = Matcher::for_key(&key);
        assert!(m.matches_key("http://a.example/x?q=(1)+[2]"));
        assert!(!m.matches_key("http://a.example/x?q=(1)+[2]&more"));
        assert!(!m.matches_key("http://b.example/x?q=(1)+[2]"));
        assert!(!m.matches_key("http://a.example/x"));
    }

    #[test]
    fn literal_prefixes_are_exact() {
        let cases: &[(&str, Option<&str>)] = &[
            ("^/orgs/42/", Some("/orgs/42/")),
            ("^/orgs/42/users\\?page=\\d+", Some("/orgs/42/users?page=")),
            ("^/orgs/4?2", Some("/orgs/")),
            ("^/a|^/b", Some("/")),
            ("^/a|/b", None),
            ("^/(a|b)", Some("/")),
            ("/orgs/42/", None),
            ("^(?i)/Orgs", Some("/")),
            ("^.*", None),
        ];
        for (pattern, want) in cases {
            assert_eq!(literal_prefix(pattern).as_deref(), *want, "{pattern}");
        }
    }

    #[test]
    fn matchers_check_pattern_host_and_tag() {
        let m = Matcher::new(Some("^/orgs/42/"), Some("API.example.com:80"), None).unwrap();
        assert!(m.matches_key("http://api.example.com/orgs/42/users"));
        assert!(!m.matches_key("http://other.example.com/orgs/42/users"));
        assert!(!m.matches_key("http://api.example.com/orgs/420/users"));
        assert!(!m.matches_key("http://api.example.com/x/orgs/42/"));
        let anywhere = Matcher::new(Some("user=7(&|$)"), None, None).unwrap();
        assert!(anywhere.matches_key("http://a/list?org=1&user=7"));
        assert!(!anywhere.matches_key("http://a/list?user=70"));
        let tagged = Matcher::new(None, None, Some("org-42")).unwrap();
        assert!(tagged.matches_key("http://a/anything"));
        assert!(tagged.matches_tags(&["x".into(), "org-42".into()]));
        assert!(!tagged.matches_tags(&["org-4".into()]));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let e = |p: Option<&str>, t: Option<&str>| Matcher::new(p, None, t).unwrap_err().0;
        assert!(e(None, None).contains("pattern, a tag"));
        assert!(e(Some(""), None).contains("empty"));
        assert!(e(Some("(unclosed"), None).contains("invalid pattern"));
        assert!(e(Some(&"a".repeat(5000)), None).contains("longer than"));
        // A pattern that compiles to more than the size limit: the regex error says so.
        assert!(e(Some("\\w{1000}\\w{1000}\\w{1000}"), None).contains("invalid pattern"));
        assert!(e(Some("\\w{10}"), None).contains("more than 256 KiB"));
        assert!(e(None, Some("two tags")).contains("invalid tag"));
    }

    fn matcher(pattern: &str) -> Matcher {
        Matcher::new(Some(pattern), None, None).unwrap()
    }

    #[test]
    fn patterns_are_bounded_in_size_and_ordinary_ones_fit() {
        // Issue 13 finding 7: with a 1 MiB limit, `(?:.{0,30}a){0,30}Q` compiled (11 ms)
        // and cost ~90 ms per 4 KB key, under the memory store's lock.
        for pattern in [r"(?:.{0,30}a){0,30}Q", r".{300}", r"\d{64}", r"\w{10}"] {
            let err = Matcher::new(Some(pattern), None, None).unwrap_err().0;
            assert!(
                err.contains("compiles to more than 256 KiB"),
                "{pattern}: {err}"
            );
        }
        for pattern in [
            r"^/orgs/42/",
            r"^/orgs/1\d\d/",
            r"user=7(&|$)",
            r"(?i)^/api/v[0-9]+/(users|orgs|teams)/[0-9]+(/.*)?$",
            r"(?i)^/(?:api|v1|v2)/users/\w+/(?:posts|comments)/\d+",
            r"^/(?:[a-z0-9-]+/){3}\d+$",
            r"[^/]+/[^/]+/[^/]+\?.*page=\d+",
            r"^/assets/(?-u:\w){32}\.js$",
            r"^/assets/[a-f0-9]{64}\.",
            r"\w{5}",
            r".{100}",
        ] {
            assert!(Matcher::new(Some(pattern), None, None).is_ok(), "{pattern}");
        }
    }

    #[test]
    fn patterns_that_match_everything_are_recognised() {
        // Issue 13 finding 10: `(?:)`, `.` or `^` invalidated the whole cache without
        // anything in the request saying that was meant.
        for pattern in [
            "(?:)", "^", ".", "/", "^/", ".*", "a|.", "$", "x?", "^.", "(?i)/", "[^a-z]", r"\A/",
            r"(?m)^", ".+", "^/.*$", "(?s).",
        ] {
            assert!(matcher(pattern).matches_every_target(), "{pattern}");
            let on_one_host = Matcher::new(Some(pattern), Some("a.example"), None).unwrap();
            assert!(on_one_host.matches_every_target(), "{pattern} on a host");
        }
        for pattern in [
            "^/orgs/",
            "^/$",
            "^$",
            "/orgs/42/",
            r"user=7(&|$)",
            "a",
            r"\?",
            r"^/\d",
            "^/orgs/42/|^/users/7$",
            r"\bfoo\b",
        ] {
            assert!(!matcher(pattern).matches_every_target(), "{pattern}");
        }
        // A tag narrows it; a tag alone is never "everything".
        let tagged = Matcher::new(Some("."), None, Some("org-42")).unwrap();
        assert!(!tagged.matches_every_target());
        let tag_only = Matcher::new(None, None, Some("org-42")).unwrap();
        assert!(!tag_only.matches_every_target());
    }
}
