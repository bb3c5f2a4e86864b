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
