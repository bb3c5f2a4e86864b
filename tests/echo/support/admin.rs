//! Calls to an Echo's admin API with its bearer token: the metrics text, one of its
//! samples, `/health` in full, and `POST /invalidate`.

use std::net::SocketAddr;

use serde_json::Value;

use super::client::RawClient;

/// `GET /metrics` (asserted 200): the Prometheus text.
pub fn metrics(admin: SocketAddr, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let resp =
        RawClient::connect(admin).request("GET", "/metrics", &[("Authorization", &auth)], b"");
    assert_eq!(resp.status, 200);
    resp.body_str()
}

/// `GET /health` with the token (the details are only given with one): the status and
/// the JSON.
pub fn health(admin: SocketAddr, token: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let resp =
        RawClient::connect(admin).request("GET", "/health", &[("Authorization", &auth)], b"");
    let json = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("/health: not JSON ({e}): {}", resp.body_str()));
    (resp.status, json)
}

/// The value of the sample line that starts with `series` (name and labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

/// `POST /invalidate` with a JSON `body`: the status and the answer (Null when it is
/// not JSON).
pub fn invalidate(admin: SocketAddr, token: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let resp = RawClient::connect(admin).request(
        "POST",
        "/invalidate",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        body.as_bytes(),
    );
    let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, json)
}
