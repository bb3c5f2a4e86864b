//! Range requests answered from the cache (RFC 9110 §14, issue 20): every form of
//! range-spec, `If-Range`, `416`, bodies held in memory and in memfds (sendfile from an
//! offset), the fill that fetches the whole object for a range, and objects too large
//! to store, whose ranges go through to the origin.

use crate::support::client::{self, RawClient, RawResponse};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{OriginResponse, TestOrigin};

/// A body whose every byte says where it is.
fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// An origin for /n/<len> that answers a cacheable body of that length, with an ETag
/// and a strong Last-Modified; a request that carries a Range gets a 206 (so a test can
/// see a Range that reached it).
fn origin() -> TestOrigin {
    TestOrigin::start(|req| {
        let len = len_of(req.path());
        let whole = body(len);
        let resp = OriginResponse::ok(whole.clone())
            .header("Cache-Control", "max-age=600")
            .header("ETag", "\"v1\"")
            .header("Last-Modified", "Tue, 15 Nov 2022 08:00:00 GMT");
        match req.header("range") {
            Some(_) => OriginResponse::ok(whole[..10].to_vec())
                .with_status(206)
                .header("Content-Range", &format!("bytes 0-9/{len}")),
            None => resp,
        }
    })
}

/// The length a test path ends with (`/n/1000`), 10 if none.
fn len_of(path: &str) -> usize {
    path.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10)
}

fn status(resp: &RawResponse) -> &str {
    resp.header("x-cache-status").unwrap_or("?")
}

/// One part of a `multipart/byteranges` body: its Content-Range, Content-Type, bytes.
type Part = (String, Option<String>, Vec<u8>);

/// The parts of a `206` in `multipart/byteranges` (RFC 9110 §14.6), read as a client
/// does: by the boundary its Content-Type names and each part's Content-Range; every
/// byte between the delimiters is accounted for.
fn multipart(resp: &RawResponse) -> Vec<Part> {
    let ct = resp.header("content-type").expect("a content-type");
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart: {ct}"));
    let delimiter = format!("--{boundary}");
    let mut rest: &[u8] = &resp.body;
    let mut parts = Vec::new();
    loop {
        let line_end = |b: &[u8]| b.windows(2).position(|w| w == b"\r\n").expect("a line");
        let (line, after) = rest.split_at(line_end(rest));
        let line = String::from_utf8_lossy(line).to_string();
        rest = &after[2..];
        if line == format!("{delimiter}--") {
            assert!(rest.is_empty(), "bytes after the close delimiter");
            return parts;
        }
        assert_eq!(line, delimiter);
        let (mut range, mut ctype) = (None, None);
        loop {
            let (field, after) = rest.split_at(line_end(rest));
            let field = String::from_utf8_lossy(field).to_string();
            rest = &after[2..];
            if field.is_empty() {
                break;
            }
            let (name, value) = field.split_once(": ").expect("a field");
            match name.to_ascii_lowercase().as_str() {
                "content-range" => range = Some(value.to_string()),
                "content-type" => ctype = Some(value.to_string()),
                other => panic!("unexpected part field {other}"),
            }
        }
        let range = range.expect("every part has a Content-Range");
        let (first, last) = range
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .expect("bytes first-last/len");
        let n = last.parse::<usize>().expect("last") + 1 - first.parse::<usize>().expect("first");
        let (bytes, after) = rest.split_at(n);
        assert_eq!(&after[..2], b"\r\n", "a CRLF before the next delimiter");
        rest = &after[2..];
        parts.push((range, ctype, bytes.to_vec()));
    }
}

/// RFC 9110 §14.6: ranges that do not coalesce are answered as `multipart/byteranges`,
/// ascending, overlapping ones merged (§14.3), from a body in memory and from one in a
/// memfd; parts that would outweigh the whole get the whole (§14.2).
#[test]
fn ranges_apart_are_answered_as_multipart_byteranges() {
    let origin = TestOrigin::start(|req| {
        let len = len_of(req.path());
        OriginResponse::ok(body(len))
            .header("Cache-Control", "max-age=600")
            .header("Content-Type", "application/x-test")
            .header("ETag", "\"v1\"")
    });
    let echo = EchoUnderTest::start(&origin.url());
    for len in [1000usize, 200_000] {
        let path = format!("/m/{len}");
        let whole = body(len);
        client::get(echo.addr, &path, &[]);
        let last = len - 1;
        let resp = client::get(
            echo.addr,
            &path,
            &[("Range", "bytes=-2, 500-599, 0-9, 550-649")],
        );
        assert_eq!((resp.status, status(&resp)), (206, "HIT"), "{len}");
        assert_eq!(resp.header("etag"), Some("\"v1\""));
        assert_eq!(resp.header("content-range"), None, "only in the parts");
        assert_eq!(
            resp.header("content-length"),
            Some(resp.body.len().to_string().as_str())
        );
        let got = multipart(&resp);
        let want = [(0, 9), (500, 649), (last - 1, last)];
        assert_eq!(got.len(), want.len(), "{len}: {got:?}");
        for ((range, ctype, bytes), (a, b)) in got.iter().zip(want) {
            assert_eq!(range, &format!("bytes {a}-{b}/{len}"));
            assert_eq!(ctype.as_deref(), Some("application/x-test"));
            assert!(bytes[..] == whole[a..=b], "{len}: {range}");
        }
    }
    // Two one-byte parts of 150 bytes take 151 bytes as multipart: the whole answers.
    client::get(echo.addr, "/m/150", &[]);
    let resp = client::get(echo.addr, "/m/150", &[("Range", "bytes=0-0,-1")]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, body(150));
    assert_eq!(origin.hits("/m/1000") + origin.hits("/m/200000"), 2);
}

/// RFC 9110 §14.1.1: `first-last`, `first-` and `-suffix`; §14.4: "Content-Range:
/// bytes 42-1233/1234"; §14.1.2: "If a valid ranges-specifier contains no satisfiable
/// range-specs, the server responds 416", §15.5.17: with "Content-Range: bytes */1234".
#[test]
fn every_form_of_range_is_answered_from_the_stored_response() {
    for len in [1000usize, 200_000] {
        let origin = origin();
        let echo = EchoUnderTest::start(&origin.url());
        let path = format!("/n/{len}");
        let whole = body(len);
        let n = len as u64;
        // The miss: the whole object is fetched (no Range to the origin), stored, and
        // the range answered from it.
        let first = client::get(echo.addr, &path, &[("Range", "bytes=0-99")]);
        assert_eq!((first.status, status(&first)), (206, "MISS"), "{len}");
        assert_eq!(
            first.header("content-range"),
            Some(format!("bytes 0-99/{n}").as_str())
        );
        assert_eq!(first.body, whole[..100], "{len}");
        let seen = origin.last_request().expect("the fill");
        assert_eq!(
            seen.header("range"),
            None,
            "the fill asks for the whole object"
        );
        let mid = n / 2;
        for (range, want) in [
            (format!("bytes={mid}-{}", mid + 9), Some(mid..mid + 10)),
            (format!("bytes={}-", n - 5), Some(n - 5..n)),
            ("bytes=-7".to_string(), Some(n - 7..n)),
            (format!("bytes={}-{}", n - 3, n + 1000), Some(n - 3..n)),
            ("bytes=10-19,15-29".to_string(), Some(10..30)),
            // The whole asked for as a range: a 200 with everything.
            ("bytes=0-".to_string(), None),
            // Invalid: ignored.
            ("bytes=9-5".to_string(), None),
        ] {
            let resp = client::get(echo.addr, &path, &[("Range", &range)]);
            assert_eq!(status(&resp), "HIT", "{range}");
            match want {
                Some(part) => {
                    assert_eq!(resp.status, 206, "{range}");
                    let cr = format!("bytes {}-{}/{n}", part.start, part.end - 1);
                    assert_eq!(resp.header("content-range"), Some(cr.as_str()), "{range}");
                    let want = &whole[part.start as usize..part.end as usize];
                    assert_eq!(resp.body, want, "{range}");
                    assert_eq!(
                        resp.header("content-length"),
                        Some(want.len().to_string().as_str())
                    );
                }
                None => {
                    assert_eq!(resp.status, 200, "{range}");
                    assert_eq!(resp.header("content-range"), None, "{range}");
                    assert!(resp.body == whole, "{range}: the whole body");
                }
            }
        }
        for range in [format!("bytes={n}-"), "bytes=-0".to_string()] {
            let resp = client::get(echo.addr, &path, &[("Range", &range)]);
            assert_eq!(resp.status, 416, "{range}");
            let cr = format!("bytes */{n}");
            assert_eq!(resp.header("content-range"), Some(cr.as_str()), "{range}");
            assert!(resp.body.is_empty());
        }
        assert_eq!(origin.hits(&path), 1, "{len}: one fetch for every range");
    }
}

/// Several ranges of a memfd body on one keep-alive connection, pipelined: each part is
/// sent from its own offset, in order.
#[test]
fn pipelined_ranges_of_a_large_body_go_out_from_their_offsets_in_order() {
    let origin = origin();
    let echo = EchoUnderTest::start(&origin.url());
    let whole = body(300_000);
    client::get(echo.addr, "/n/300000", &[]);
    let parts = [
        (0u64, 65_535u64),
        (100_000, 299_999),
        (299_990, 299_999),
        (7, 7),
    ];
    let mut requests = Vec::new();
    for (a, b) in parts {
        requests.extend_from_slice(
            format!("GET /n/300000 HTTP/1.1\r\nHost: test.local\r\nRange: bytes={a}-{b}\r\n\r\n")
                .as_bytes(),
        );
    }
    let mut c = RawClient::connect(echo.addr);
    c.send(&requests);
    for (a, b) in parts {
        let resp = c.read_response(false).expect("a response");
        assert_eq!((resp.status, status(&resp)), (206, "HIT"), "{a}-{b}");
        assert_eq!(resp.body, whole[a as usize..=b as usize], "{a}-{b}");
    }
}

/// RFC 9110 §13.1.5: "A server MUST NOT generate a 206 ... in response to a request
/// with an If-Range header field if the condition evaluates to false" (it sends the
/// whole 200); "the server ... MUST use a strong comparison"; a date matches only an
/// exactly equal, strong Last-Modified.
#[test]
fn if_range_decides_between_the_part_and_the_whole() {
    let origin = origin();
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/n/500", &[]);
    for (if_range, want) in [
        ("\"v1\"", 206),
        ("\"v0\"", 200),
        ("W/\"v1\"", 200),
        ("Tue, 15 Nov 2022 08:00:00 GMT", 206),
        ("Tue, 15 Nov 2022 08:00:01 GMT", 200),
    ] {
        let resp = client::get(
            echo.addr,
            "/n/500",
            &[("Range", "bytes=0-9"), ("If-Range", if_range)],
        );
        assert_eq!(resp.status, want, "{if_range}");
        assert_eq!(
            resp.body.len(),
            if want == 206 { 10 } else { 500 },
            "{if_range}"
        );
    }
    assert_eq!(origin.hits("/n/500"), 1);
}

/// Objects over `cache.max_object_bytes` are not stored; once Echo knows it (the key is
/// remembered as not storable), their ranges go to the origin as asked, rather than the
/// whole object coming through for a part of it. A Range in a unit Echo does not know
/// goes through untouched.
#[test]
fn ranges_of_objects_too_large_to_store_and_of_other_units_go_to_the_origin() {
    let origin = origin();
    let echo =
        EchoUnderTest::with_config(config(&origin.url(), "[cache]\nmax_object_bytes = 65536\n"));
    let first = client::get(echo.addr, "/n/100000", &[("Range", "bytes=0-9")]);
    // The first request learns the size from the whole response (RFC 9110 §14.2: a
    // server "MAY ignore the Range header field").
    assert_eq!(first.status, 200);
    assert_eq!(first.body.len(), 100_000);
    let second = client::get(echo.addr, "/n/100000", &[("Range", "bytes=0-9")]);
    assert_eq!(second.status, 206);
    assert_eq!(second.body, body(100_000)[..10]);
    let seen = origin.last_request().expect("a pass");
    assert_eq!(
        seen.header("range"),
        Some("bytes=0-9"),
        "the range went through"
    );
    assert_eq!(origin.hits("/n/100000"), 2);

    let other_unit = client::get(echo.addr, "/n/50", &[("Range", "items=0-9")]);
    assert_eq!((other_unit.status, status(&other_unit)), (206, "BYPASS"));
    let seen = origin.last_request().expect("a bypass");
    assert_eq!(seen.header("range"), Some("items=0-9"));
}

/// The same on the Redis store (its local tier and its replicas), with a body stored
/// compressed (`cache.compress`): a range is of the representation the client gets.
#[test]
fn ranges_from_the_redis_store_and_of_a_compressed_body() {
    use crate::support::echo::{redis_sections, QUICK_REDIS};
    use crate::support::redis::RedisServer;

    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let text = "0123456789".repeat(100);
    let body = text.clone();
    let origin = TestOrigin::start(move |_| {
        OriginResponse::ok(body.clone())
            .header("Cache-Control", "max-age=600")
            .header("Content-Type", "text/plain")
            .header("ETag", "\"t\"")
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &redis_sections(&master, &[&replica], "compress = [\"gzip\"]\n", QUICK_REDIS),
    ));
    client::get(echo.addr, "/r", &[]);
    replica.wait_for_key("echo:v1:http://test.local/r");
    for _ in 0..2 {
        // Decoded for a client without gzip: bytes 10-19 of the text.
        let part = client::get(echo.addr, "/r", &[("Range", "bytes=10-19")]);
        assert_eq!((part.status, part.body_str().as_str()), (206, "0123456789"));
        assert_eq!(part.header("content-range"), Some("bytes 10-19/1000"));
        assert_eq!(part.header("x-cache-status"), Some("HIT"));
    }
    // With gzip: a range of the encoded bytes, whose length is the encoded one.
    let whole = client::get(echo.addr, "/r", &[("Accept-Encoding", "gzip")]);
    assert_eq!(whole.header("content-encoding"), Some("gzip"));
    let n = whole.body.len();
    let part = client::get(
        echo.addr,
        "/r",
        &[("Accept-Encoding", "gzip"), ("Range", "bytes=0-9")],
    );
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 0-9/{n}").as_str())
    );
    assert_eq!(part.body, whole.body[..10]);
    // Several parts of the decoded text, from the Redis store.
    let parts = client::get(echo.addr, "/r", &[("Range", "bytes=0-1,500-503")]);
    assert_eq!(parts.status, 206);
    let got = multipart(&parts);
    let texts: Vec<(&str, &[u8])> = got.iter().map(|(r, _, b)| (r.as_str(), &b[..])).collect();
    assert_eq!(
        texts,
        [
            ("bytes 0-1/1000", &b"01"[..]),
            ("bytes 500-503/1000", &b"0123"[..])
        ]
    );
    assert_eq!(got[0].1.as_deref(), Some("text/plain"));
    assert_eq!(origin.hits("/r"), 1);
}

/// A Content-Range the origin put on its 200 (meaningless there) never goes out beside
/// Echo's own on a part (found by fuzzing: two Content-Range fields in one 206).
#[test]
fn a_part_carries_only_echos_content_range() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok(body(1000))
            .header("Cache-Control", "max-age=600")
            .header("Content-Range", "bytes 0-0/1")
    });
    let echo = EchoUnderTest::start(&origin.url());
    for expect in ["MISS", "HIT"] {
        let resp = client::get(echo.addr, "/cr", &[("Range", "bytes=0-1")]);
        assert_eq!((resp.status, status(&resp)), (206, expect));
        assert_eq!(
            resp.header_all("content-range"),
            ["bytes 0-1/1000"],
            "{expect}"
        );
        assert_eq!(resp.body, body(2));
    }
    let parts = client::get(echo.addr, "/cr", &[("Range", "bytes=0-0,-1")]);
    assert_eq!(parts.status, 206);
    assert_eq!(parts.header_all("content-range"), Vec::<&str>::new());
    assert_eq!(multipart(&parts).len(), 2);
}

/// RFC 9110 §13.1.2: `If-None-Match: *` is false when a current representation exists:
/// a 304 from a stored one, ETag or not, before any Range is looked at.
#[test]
fn if_none_match_star_is_a_304_from_any_stored_response() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok("no validators").header("Cache-Control", "max-age=600")
    });
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/star", &[]);
    for extra in [None, Some(("Range", "bytes=0-3"))] {
        let mut headers = vec![("If-None-Match", "*")];
        headers.extend(extra);
        let resp = client::get(echo.addr, "/star", &headers);
        assert_eq!(resp.status, 304, "{extra:?}");
        assert!(resp.body.is_empty());
    }
    assert_eq!(origin.hits("/star"), 1);
}
