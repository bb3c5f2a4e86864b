//! A TCP relay the test can hold: what passes through it stops (and waits) while it is
//! held, without closing anything. Put between a replica and its master, it makes a
//! replica that lags with its link up and keeps serving reads: the lag of a busy
//! network, on demand.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// How often a pump looks up from a quiet socket to see whether the relay was dropped.
const TICK: Duration = Duration::from_millis(50);

#[derive(Default)]
struct State {
    held: Mutex<bool>,
    released: Condvar,
    stopped: AtomicBool,
}

impl State {
    /// Blocks while the relay is held; false once it is dropped.
    fn pass(&self) -> bool {
        let mut held = self.held.lock().expect("relay lock");
        while *held && !self.stopped.load(Ordering::SeqCst) {
            held = self
                .released
                .wait_timeout(held, TICK)
                .expect("relay lock")
                .0;
        }
        !self.stopped.load(Ordering::SeqCst)
    }
}

pub struct Relay {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Relay {
    /// Relays every connection made to it to `target`.
    pub fn to(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        listener.set_nonblocking(true).expect("nonblocking relay");
        let state = Arc::new(State::default());
        let s = Arc::clone(&state);
        thread::spawn(move || {
            while !s.stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        client
                            .set_nonblocking(false)
                            .expect("blocking relay socket");
                        pump(&s, &client, &server);
                        pump(&s, &server, &client);
                    }
                    Err(_) => thread::sleep(TICK / 5),
                }
            }
        });
        Relay { addr, state }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops passing bytes on (both ways) until `release`.
    pub fn hold(&self) {
        *self.state.held.lock().expect("relay lock") = true;
    }

    pub fn release(&self) {
        *self.state.held.lock().expect("relay lock") = false;
        self.state.released.notify_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.released.notify_all();
    }
}

/// Copies `from` to `to` on its own thread, waiting while the relay is held.
fn pump(state: &Arc<State>, from: &TcpStream, to: &TcpStream) {
    let state = Arc::clone(state);
    let mut from = from.try_clone().expect("clone relay socket");
    let mut to = to.try_clone().expect("clone relay socket");
    from.set_read_timeout(Some(TICK)).expect("relay timeout");
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !state.pass() {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            // Bytes read just before a hold wait with the rest.
            if !state.pass() || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}
