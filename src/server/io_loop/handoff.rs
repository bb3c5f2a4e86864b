//! How other threads reach an I/O thread: new connections from the acceptors, lent
//! connections back from the pools (done, or their request to wait), and the word that
//! what a waiting request waits for is done.
//!
//! Invariants: a lent connection always comes back or is reported gone (`Back`'s drop),
//! so its I/O thread never keeps a slot for a connection no one holds; an arrival for a
//! thread that has ended is dropped, closing its connection.

use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Sender;
use mio::Waker;

use super::super::Slot;
use crate::http::conn::Conn;
use crate::http::handler::Waiting;
use crate::http::socket::Socket;
use crate::http::Request;

/// What reaches an I/O thread from other threads.
pub(in crate::server) enum Arrival<J> {
    /// A new connection, with its open-connections slot.
    New(Socket, SocketAddr, Slot),
    /// A lent connection back from a pool thread, with whether it may carry another
    /// request (None: the pool thread dropped it).
    Back(u64, Option<(Conn, bool)>),
    /// A lent connection back from a pool thread, its request to wait (`Step::Wait`).
    Wait(u64, Conn, Request, Waiting<J>),
    /// What a waiting request waits for is done.
    Ready(u64),
}

/// How other threads reach an I/O thread.
pub(in crate::server) struct LoopHandle<J> {
    pub(super) tx: Sender<Arrival<J>>,
    pub(super) waker: Arc<Waker>,
}

impl<J> Clone for LoopHandle<J> {
    fn clone(&self) -> Self {
        LoopHandle {
            tx: self.tx.clone(),
            waker: Arc::clone(&self.waker),
        }
    }
}

impl<J> LoopHandle<J> {
    /// Delivers `arrival`; dropped (the connection closes) if the thread has ended.
    pub(in crate::server) fn send(&self, arrival: Arrival<J>) {
        if self.tx.send(arrival).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Makes the thread look around (a drain has begun).
    pub(in crate::server) fn wake(&self) {
        let _ = self.waker.wake();
    }
}

/// Where a lent connection goes back. Dropped without being used (the pool thread gave
/// up on the connection), it tells the I/O thread the connection is gone.
pub(in crate::server) struct Back<J> {
    pub(super) id: u64,
    pub(super) to: LoopHandle<J>,
    pub(super) used: bool,
}

impl<J> Back<J> {
    pub(in crate::server) fn send(mut self, conn: Conn, keep: bool) {
        self.used = true;
        self.to.send(Arrival::Back(self.id, Some((conn, keep))));
    }

    /// The request waits (`Step::Wait`) on its I/O thread, holding no pool thread.
    pub(in crate::server) fn wait(mut self, conn: Conn, req: Request, waiting: Waiting<J>) {
        self.used = true;
        self.to.send(Arrival::Wait(self.id, conn, req, waiting));
    }

    /// Not lent after all: the I/O thread keeps the connection.
    pub(super) fn cancel(mut self) {
        self.used = true;
    }
}

impl<J> Drop for Back<J> {
    fn drop(&mut self) {
        if !self.used {
            self.to.send(Arrival::Back(self.id, None));
        }
    }
}
