//! The load comparison's scenarios: what each sends, with how many connections, and the
//! id `ECHO_BENCH_SCENARIOS` names it by (see `main.rs` for what each measures).

#[derive(Clone, Copy)]
pub(crate) enum Load {
    /// Every request the same, warmed object.
    Hit(&'static str),
    /// Every request a new URL.
    Miss,
    /// `BATCH` requests in a row share a new URL.
    Coalesced,
    /// This many clients ask for one new URL of a slow origin at once (`herd`).
    Herd(usize),
    /// This many keep-alive connections, each after one request, held idle (`idle`).
    Idle(usize),
}

pub(crate) struct Scenario {
    /// What `ECHO_BENCH_SCENARIOS` names it by (the name has commas).
    pub(crate) id: &'static str,
    pub(crate) name: &'static str,
    pub(crate) connections: u32,
    pub(crate) load: Load,
    /// The origin is driven directly too (misses: the baseline of the overhead).
    pub(crate) with_origin: bool,
}

pub(crate) const SCENARIOS: [Scenario; 12] = [
    Scenario {
        id: "hit-1k-16",
        name: "hit 1 KiB, 16 conns",
        connections: 16,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-1k-64",
        name: "hit 1 KiB, 64 conns",
        connections: 64,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-1k-256",
        name: "hit 1 KiB, 256 conns",
        connections: 256,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-1k-1024",
        name: "hit 1 KiB, 1024 conns",
        connections: 1024,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-64k-64",
        name: "hit 64 KiB, 64 conns",
        connections: 64,
        load: Load::Hit("/bytes/65536"),
        with_origin: false,
    },
    Scenario {
        id: "miss-1",
        name: "miss 1 KiB, 1 conn",
        connections: 1,
        load: Load::Miss,
        with_origin: true,
    },
    Scenario {
        id: "miss-16",
        name: "miss 1 KiB, 16 conns",
        connections: 16,
        load: Load::Miss,
        with_origin: true,
    },
    Scenario {
        id: "coalesced-64",
        name: "coalesced miss, 64 conns",
        connections: 64,
        load: Load::Coalesced,
        with_origin: false,
    },
    Scenario {
        id: "herd-64",
        name: "herd of 64 on one new URL",
        connections: 64,
        load: Load::Herd(64),
        with_origin: false,
    },
    Scenario {
        id: "herd-1024",
        name: "herd of 1024 on one new URL",
        connections: 1024,
        load: Load::Herd(1024),
        with_origin: false,
    },
    Scenario {
        id: "idle-2000",
        name: "2,000 idle keep-alive connections",
        connections: 2000,
        load: Load::Idle(2000),
        with_origin: false,
    },
    Scenario {
        id: "idle-10000",
        name: "10,000 idle keep-alive connections",
        connections: 10_000,
        load: Load::Idle(10_000),
        with_origin: false,
    },
];
