//! The proxy's listeners (issue 19): `server.listen` naming several addresses, and the
//! PROXY protocol from trusted balancers. With `server.proxy_protocol`, a v1 or v2
//! header from an address in `server.trusted_proxies` names the client (the origin sees
//! it in `X-Forwarded-For`); a trusted balancer without a valid header, and an
//! untrusted client that sends one, are closed before any request is read.

use std::time::Duration;

use echo::config::Config;

use crate::support::client::{build_request, RawClient};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{OriginResponse, TestOrigin};

/// Echo with the PROXY protocol on, trusting `trusted`, in front of an origin that
/// answers with the `X-Forwarded-For` it was sent.
fn echo_trusting(trusted: &str) -> (TestOrigin, EchoUnderTest) {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(req.header("x-forwarded-for").unwrap_or("-").to_string())
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[server]\nproxy_protocol = true\ntrusted_proxies = [{trusted}]\n"),
    ));
    (origin, echo)
}

fn request(target: &str) -> Vec<u8> {
    build_request("GET", target, &[("Host", "pp.example")], b"")
}

/// What the origin saw as the client, for a connection that starts with `prefix`.
fn forwarded_for(echo: &EchoUnderTest, prefix: &[u8], target: &str) -> String {
    let mut c = RawClient::connect(echo.addr);
    let mut bytes = prefix.to_vec();
    bytes.extend(request(target));
    let resp = c.read_response_after(&bytes).expect("an answer");
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    resp.body_str()
}

/// Whether Echo closes a connection that starts with `bytes` without answering.
fn closed_unanswered(echo: &EchoUnderTest, bytes: &[u8]) -> bool {
    let mut c = RawClient::connect(echo.addr);
    c.send(bytes);
    c.closed_within(Duration::from_secs(3)) && c.buffered().is_empty()
}

fn v2_header(command: u8, source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(0x11); // TCP over IPv4
    h.extend(12u16.to_be_bytes());
    h.extend(source);
    h.extend([10, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(80u16.to_be_bytes());
    h
}

#[test]
fn a_trusted_balancers_v1_and_v2_headers_name_the_client() {
    let (_origin, echo) = echo_trusting("\"127.0.0.0/8\"");
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n";
    assert_eq!(forwarded_for(&echo, v1, "/v1"), "203.0.113.7");
    let v1_six = b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 80\r\n";
    assert_eq!(forwarded_for(&echo, v1_six, "/v1-6"), "2001:db8::7");
    assert_eq!(
        forwarded_for(&echo, &v2_header(1, [198, 51, 100, 9], 4444), "/v2"),
        "198.51.100.9"
    );
    // UNKNOWN and LOCAL (a balancer's own health check): the balancer is the client.
    assert_eq!(
        forwarded_for(&echo, b"PROXY UNKNOWN\r\n", "/unknown"),
        "127.0.0.1"
    );
    assert_eq!(
        forwarded_for(&echo, &v2_header(0, [198, 51, 100, 9], 4444), "/local"),
        "127.0.0.1"
    );
    // Requests after the first on the connection keep the named client.
    let mut c = RawClient::connect(echo.addr);
    let mut bytes = v1.to_vec();
    bytes.extend(request("/a"));
    assert_eq!(
        c.read_response_after(&bytes).unwrap().body_str(),
        "203.0.113.7"
    );
    assert_eq!(
        c.read_response_after(&request("/b")).unwrap().body_str(),
        "203.0.113.7"
    );
}

#[test]
fn a_trusted_balancer_without_a_valid_header_is_closed() {
    let (origin, echo) = echo_trusting("\"127.0.0.1\"");
    assert!(closed_unanswered(&echo, &request("/none")), "no header");
    assert!(
        closed_unanswered(&echo, b"PROXY TCP4 not-an-address 10.0.0.1 1 80\r\n"),
        "malformed v1"
    );
    let mut bad_v2 = v2_header(1, [1, 2, 3, 4], 1);
    bad_v2[12] = 0x31; // version 3
    assert!(closed_unanswered(&echo, &bad_v2), "malformed v2");
    assert_eq!(origin.total_hits(), 0);
}

#[test]
fn an_untrusted_client_is_served_as_itself_and_closed_if_it_sends_a_header() {
    let (origin, echo) = echo_trusting("\"10.0.0.0/8\"");
    assert_eq!(forwarded_for(&echo, b"", "/plain"), "127.0.0.1");
    assert!(closed_unanswered(
        &echo,
        b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n\r\n"
    ));
    assert!(closed_unanswered(&echo, &v2_header(1, [203, 0, 113, 7], 1)));
    assert_eq!(origin.total_hits(), 1);
}

#[test]
fn the_proxy_protocol_config_is_checked() {
    let cases = [
        (
            "[server]\nproxy_protocol = true\n",
            "server.trusted_proxies",
        ),
        (
            "[server]\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
            "server.trusted_proxies[1]",
        ),
    ];
    for (extra, key) in cases {
        let text = format!("[origin]\nurl = \"http://127.0.0.1:9\"\n{extra}");
        let e = Config::parse(&text).expect_err(extra).to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
}

/// `server.listen` as a list of TCP addresses and a Unix socket: every one serves; the
/// socket gets `server.unix_socket_mode`, replaces a stale socket left at its path,
/// refuses to replace anything else, and goes when Echo stops; the list is checked.
#[test]
fn a_listen_list_serves_on_every_address_and_unix_socket() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    let origin = TestOrigin::start(|req| {
        let xff = req.header("x-forwarded-for").unwrap_or("-");
        OriginResponse::ok(format!("{} {xff}", req.target))
    });
    let dir = std::env::temp_dir().join(format!("echo-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("echo.sock");
    // A socket left by an Echo that did not stop cleanly: replaced.
    drop(UnixListener::bind(&socket).expect("stale socket"));
    let ports = [crate::support::free_port(), crate::support::free_port()];
    let text = |ports: [u16; 2]| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:{}\", \"127.0.0.1:{}\", \"unix:{}\"]\n\
             unix_socket_mode = 0o600\n",
            ports[0],
            ports[1],
            socket.display()
        )
    };
    let mut echo = None;
    // A free port can be taken between finding it and binding it: try a few.
    for _ in 0..5 {
        if let Ok(started) = echo::start(&config(&origin.url(), &text(ports))) {
            echo = Some(started);
            break;
        }
    }
    let echo = echo.expect("Echo on two ports and a socket");
    assert_eq!(echo.proxy.local_addrs().len(), 3);
    for port in ports {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let resp = crate::support::client::get(addr, "/tcp", &[]);
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "/tcp 127.0.0.1"),
            "{addr}"
        );
    }
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = UnixStream::connect(&socket).expect("connect to the socket");
    c.write_all(&build_request(
        "GET",
        "/unix",
        &[("Host", "pp.example"), ("Connection", "close")],
        b"",
    ))
    .expect("send");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A Unix socket's client is a local process.
    assert!(answer.ends_with("/unix 127.0.0.1"), "{answer}");
    drop(echo);
    assert!(!socket.exists(), "the socket goes with Echo");

    // Anything but a socket at the path is left alone, and Echo says why.
    std::fs::write(&socket, "not a socket").expect("a file in the way");
    let ports = [crate::support::free_port(), crate::support::free_port()];
    let e = echo::start(&config(&origin.url(), &text(ports)))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains(&socket.display().to_string()), "{e}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
    let _ = std::fs::remove_dir_all(&dir);

    let cases = [
        ("listen = []", "server.listen"),
        (
            "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
            "server.listen[1]",
        ),
        (
            "listen = [\"127.0.0.1:1\", \"nowhere\"]",
            "server.listen[1]",
        ),
        ("listen = \"unix:echo.sock\"", "server.listen"),
        ("unix_socket_mode = 0o1777", "server.unix_socket_mode"),
    ];
    for (line, key) in cases {
        let text = format!("[origin]\nurl = \"http://127.0.0.1:9\"\n[server]\n{line}\n");
        let e = Config::parse(&text).expect_err(line).to_string();
        assert!(e.contains(key), "{line}: {e}");
    }
}
