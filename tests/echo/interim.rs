//! Interim (1xx) responses from the origin (RFC 9110 §15.2, issue 20 item 8): forwarded
//! to the client while the final response is still being worked on, never stored, never
//! merged into the final response, never sent to an HTTP/1.0 client.

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use crate::support::client::RawClient;
use crate::support::echo::EchoUnderTest;
use crate::support::raw_origin::RawOrigin;

const HINTS: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
const FINAL: &[u8] = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok";

/// RFC 9110 §15.2: "A proxy MUST forward 1xx responses unless the proxy itself requested
/// the generation of the 1xx response." The origin holds its final response until the
/// client has read the 103 (so the hint arrived early, not with the final response);
/// the 103's fields are not in the final response, and a hit gets no 103.
#[test]
fn early_hints_reach_the_client_before_the_final_response_and_are_never_stored() {
    let (client_saw_hints, wait_for_client) = mpsc::channel::<()>();
    let wait_for_client = Mutex::new(wait_for_client);
    let origin = RawOrigin::start(move |mut conn| {
        while let Some(req) = conn.read_request() {
            conn.write(HINTS);
            conn.write(b"HTTP/1.1 102 Processing\r\n\r\n");
            if req.target == "/hints" {
                let released = wait_for_client
                    .lock()
                    .map(|rx| rx.recv_timeout(Duration::from_secs(5)).is_ok())
                    .unwrap_or(false);
                assert!(
                    released,
                    "the client never saw the 103 before the final response"
                );
            }
            conn.write(FINAL);
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    c.send(b"GET /hints HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let hints = c.read_response(false).expect("the 103");
    assert_eq!(hints.status, 103);
    assert_eq!(hints.header("link"), Some("</style.css>; rel=preload"));
    client_saw_hints.send(()).expect("the origin waits");
    let processing = c.read_response(false).expect("the 102");
    assert_eq!(processing.status, 102);
    let last = c.read_response(false).expect("the final response");
    assert_eq!((last.status, last.body_str().as_str()), (200, "ok"));
    assert_eq!(
        last.header("link"),
        None,
        "a 1xx field merged into the final response"
    );
    assert_eq!(last.header("x-cache-status"), Some("MISS"));

    // Stored without them: a hit is the final response alone.
    let hit = c.get("/hints", &[]);
    assert_eq!(
        (hit.status, hit.header("x-cache-status")),
        (200, Some("HIT"))
    );
    assert_eq!(origin.hits("/hints"), 1);
}

/// RFC 9110 §15.2: "A server MUST NOT send a 1xx response to an HTTP/1.0 client"; and
/// requests that bypass the cache get their 1xx too.
#[test]
fn interim_responses_skip_http10_clients_and_reach_bypassed_requests() {
    let origin = RawOrigin::start(|mut conn| {
        while conn.read_request().is_some() {
            conn.write(HINTS);
            conn.write(FINAL);
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let mut old = RawClient::connect(echo.addr);
    old.send(b"GET /old HTTP/1.0\r\nHost: test.local\r\n\r\n");
    let resp = old.read_response(false).expect("a response");
    assert_eq!((resp.status, resp.body_str().as_str()), (200, "ok"));

    let mut c = RawClient::connect(echo.addr);
    c.send(b"POST /form HTTP/1.1\r\nHost: test.local\r\nContent-Length: 2\r\n\r\nhi");
    let hints = c.read_response(false).expect("the 103");
    assert_eq!(hints.status, 103);
    let last = c.read_response(false).expect("the final response");
    assert_eq!(
        (last.status, last.header("x-cache-status")),
        (200, Some("BYPASS"))
    );
}
