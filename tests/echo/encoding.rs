//! `Accept-Encoding` normalised for `Vary` (issue 20, item 7): one variant per coding
//! Echo would choose, not one per spelling of the client's list.

use crate::support::client;
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{OriginResponse, TestOrigin};

fn origin() -> TestOrigin {
    TestOrigin::start(|req| {
        let seen = req.header("accept-encoding").unwrap_or("none").to_string();
        OriginResponse::ok(format!("for {seen}"))
            .header("Cache-Control", "max-age=600")
            .header("Vary", "Accept-Encoding")
    })
}

/// RFC 9111 §4.1 lets a cache normalise the fields Vary names; RFC 9110 §12.5.3 gives
/// the q-value rules Echo chooses by ("a qvalue of 0 means not acceptable"). Spellings
/// of one choice share a variant, and the origin is asked for exactly that choice.
#[test]
fn spellings_of_one_coding_share_one_variant_and_the_origin_sees_the_choice() {
    let origin = origin();
    let echo = EchoUnderTest::start(&origin.url());
    for (sent, chosen) in [
        ("gzip", "gzip"),
        ("gzip, deflate", "gzip"),
        ("deflate, gzip", "gzip"),
        ("deflate;q=0.5, gzip", "gzip"),
        ("gzip, deflate, br, zstd", "gzip"),
        ("br", "br"),
        ("gzip;q=0.4, br", "br"),
        ("deflate", "identity"),
        ("gzip;q=0", "identity"),
    ] {
        let resp = client::get(echo.addr, "/v", &[("Accept-Encoding", sent)]);
        assert_eq!(resp.body_str(), format!("for {chosen}"), "{sent}");
    }
    let asked: Vec<String> = origin
        .requests()
        .iter()
        .map(|r| r.header("accept-encoding").unwrap_or("none").to_string())
        .collect();
    assert_eq!(asked, ["gzip", "br", "identity"], "one fetch per choice");
    // Without Accept-Encoding a client takes whatever is sent: its own variant.
    assert_eq!(client::get(echo.addr, "/v", &[]).body_str(), "for none");
}

/// `cache.normalize_accept_encoding = []` keeps the client's value as it is: one variant
/// per distinct list (the behaviour before), and the origin sees what the client sent.
#[test]
fn normalisation_can_be_turned_off() {
    let origin = origin();
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\nnormalize_accept_encoding = []\n",
    ));
    for sent in ["gzip", "gzip, deflate", "deflate, gzip"] {
        let resp = client::get(echo.addr, "/v", &[("Accept-Encoding", sent)]);
        assert_eq!(resp.body_str(), format!("for {sent}"));
    }
    assert_eq!(origin.hits("/v"), 3);
}

/// A 4 KiB text body, compressible.
fn text() -> String {
    "Echo caches what HTTP lets it cache. ".repeat(110)
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

fn compressing_origin(max_age: &'static str) -> TestOrigin {
    TestOrigin::start(move |req| {
        let resp = OriginResponse::ok(text())
            .header("Cache-Control", max_age)
            .header("ETag", "\"t1\"")
            .header("Content-Type", "text/plain; charset=utf-8");
        match req.path() {
            "/png" => OriginResponse::ok(text())
                .header("Cache-Control", max_age)
                .header("Content-Type", "image/png"),
            "/no-transform" => resp.header("Cache-Control", "no-transform"),
            // Over 256 KiB: kept as it is (a hit may have to decode it).
            "/big" => OriginResponse::ok(text().repeat(80))
                .header("Cache-Control", max_age)
                .header("Content-Type", "text/plain"),
            "/encoded" => OriginResponse::ok(text())
                .header("Cache-Control", max_age)
                .header("Content-Type", "text/plain")
                .header("Content-Encoding", "x-custom"),
            _ => resp,
        }
    })
}

/// `cache.compress`: stored once, encoded; RFC 9110 §8.4: a client that accepts the
/// coding gets `Content-Encoding: gzip`, one that does not gets the content decoded;
/// §8.8.3: "a different entity tag for each representation" (`"t1-gzip"`), and each
/// client's If-None-Match is answered against the tag of what it would get.
#[test]
fn compressed_at_store_time_served_encoded_or_decoded_with_an_entity_tag_each() {
    let origin = compressing_origin("max-age=600");
    let echo =
        EchoUnderTest::with_config(config(&origin.url(), "[cache]\ncompress = [\"gzip\"]\n"));
    let gzip = [("Accept-Encoding", "gzip, deflate")];
    let first = client::get(echo.addr, "/t", &gzip);
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        first.header("content-encoding"),
        None,
        "the fill's client gets the origin's"
    );
    assert_eq!(first.body_str(), text());

    let encoded = client::get(echo.addr, "/t", &gzip);
    assert_eq!(encoded.header("x-cache-status"), Some("HIT"));
    assert_eq!(encoded.header("content-encoding"), Some("gzip"));
    assert_eq!(encoded.header("etag"), Some("\"t1-gzip\""));
    assert!(encoded
        .header_all("vary")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("accept-encoding")));
    assert!(
        encoded.body.len() < text().len() / 4,
        "{} bytes",
        encoded.body.len()
    );
    assert_eq!(gunzip(&encoded.body), text().as_bytes());
    assert_eq!(encoded.header("echo-stored-coding"), None);

    let plain = client::get(echo.addr, "/t", &[]);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("etag"), Some("\"t1\""));
    assert_eq!(
        plain.body_str(),
        text(),
        "decoded for a client that takes no gzip"
    );

    let not_modified = client::get(
        echo.addr,
        "/t",
        &[gzip[0], ("If-None-Match", "\"t1-gzip\"")],
    );
    assert_eq!(not_modified.status, 304);
    let other_tag = client::get(echo.addr, "/t", &[gzip[0], ("If-None-Match", "\"t1\"")]);
    assert_eq!(
        other_tag.status, 200,
        "\"t1\" names the identity representation"
    );
    let identity_304 = client::get(echo.addr, "/t", &[("If-None-Match", "\"t1\"")]);
    assert_eq!(identity_304.status, 304);
    // A range of the decoded representation.
    let part = client::get(echo.addr, "/t", &[("Range", "bytes=0-3")]);
    assert_eq!((part.status, part.body_str().as_str()), (206, "Echo"));
    assert_eq!(origin.hits("/t"), 1);
}

/// RFC 9110 §7.7: "A proxy MUST NOT transform the content ... of a response containing
/// the no-transform cache directive"; bodies already encoded are never encoded again;
/// media types that do not compress are left alone; Brotli works as gzip does.
#[test]
fn compression_leaves_alone_what_it_must_and_speaks_brotli() {
    let origin = compressing_origin("max-age=600");
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\ncompress = [\"br\", \"gzip\"]\n",
    ));
    let all = [("Accept-Encoding", "br, gzip")];
    for path in ["/png", "/no-transform", "/encoded", "/big"] {
        client::get(echo.addr, path, &all);
        let hit = client::get(echo.addr, path, &all);
        assert_eq!(hit.header("x-cache-status"), Some("HIT"), "{path}");
        assert_ne!(hit.header("content-encoding"), Some("br"), "{path}");
        let want = if path == "/big" {
            text().repeat(80)
        } else {
            text()
        };
        assert!(hit.body_str() == want, "{path}");
    }
    client::get(echo.addr, "/t", &all);
    let br = client::get(echo.addr, "/t", &all);
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.header("etag"), Some("\"t1-br\""));
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut brotli::Decompressor::new(&br.body[..], 4096),
        &mut decoded,
    )
    .expect("a brotli body");
    assert_eq!(decoded, text().as_bytes());
}

/// Revalidation asks the origin about its own representation: the stored entity-tag
/// goes out as the origin gave it, not the encoded one's.
#[test]
fn revalidation_of_a_compressed_entry_uses_the_origin_entity_tag() {
    let origin = compressing_origin("max-age=1");
    let echo =
        EchoUnderTest::with_config(config(&origin.url(), "[cache]\ncompress = [\"gzip\"]\n"));
    client::get(echo.addr, "/t", &[]);
    let hit = client::get(echo.addr, "/t", &[("Accept-Encoding", "gzip")]);
    assert_eq!(
        hit.header("x-cache-status"),
        Some("HIT"),
        "{:?}",
        hit.header("cache-status")
    );
    crate::support::wait_until("/t goes stale", std::time::Duration::from_secs(10), || {
        client::get(echo.addr, "/t", &[("Accept-Encoding", "gzip")]).header("x-cache-status")
            != Some("HIT")
    });
    let sent = origin.last_request().expect("a revalidation");
    assert_eq!(sent.header("if-none-match"), Some("\"t1\""));
}
