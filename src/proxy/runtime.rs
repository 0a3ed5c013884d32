//! The tokio runtime the proxy runs on, and how many threads the default
//! (`threads = 0`, auto) gives it.
//!
//! The rule comes from the load benchmark's threads section
//! (`docs/benchmarks.md#threads`): a proxy's work per operation is small,
//! so with the LDAP server on the same host the server, not the proxy, is
//! what needs the cores; a second worker then costs more (cross-thread
//! wake-ups, work stealing, the server's threads preempted) than it brings.
//! With the server elsewhere the proxy may use every CPU it is given.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use crate::endpoint::Endpoint;

/// How long start-up waits for the upstream's host name to resolve, to
/// tell whether it is this host (no answer: counted as another host).
const RESOLVE_LIMIT: Duration = Duration::from_secs(2);

/// Where the LDAP server runs, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// On this host: a unix socket, a loopback address, or an address of
    /// one of this host's interfaces.
    Local,
    /// Elsewhere (or its name did not resolve in time).
    Remote,
}

/// The threads the proxy runs with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threads {
    /// 1: a current-thread runtime (the main thread runs everything);
    /// more: that many workers.
    pub workers: usize,
    /// For the start-up log and `--check-config`.
    pub why: String,
}

/// The threads for the configuration's `threads` (`configured`, 0 = auto)
/// with the upstream `upstream` on a machine with `cores` CPUs available.
pub fn decide(configured: usize, cores: usize, upstream: Upstream) -> Threads {
    let runtime = |n: usize| {
        if n == 1 {
            "1 thread (a current-thread runtime)".to_string()
        } else {
            format!("{n} worker threads")
        }
    };
    if configured > 0 {
        return Threads {
            workers: configured,
            why: format!("threads = {configured}: {}", runtime(configured)),
        };
    }
    let cores = cores.max(1);
    let (workers, because) = match upstream {
        Upstream::Local => (
            (cores / 2).max(1),
            "the LDAP server runs on this host: half of them are left to it",
        ),
        Upstream::Remote => (cores, "the LDAP server runs on another host: one per CPU"),
    };
    Threads {
        workers,
        why: format!(
            "threads = 0 (auto): {}; {cores} CPU(s) available, {because}",
            runtime(workers)
        ),
    }
}

/// The CPUs this process may use (its affinity and cgroup quota).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The threads for `configured` on this machine, in front of `upstream`.
pub fn plan(configured: usize, upstream: &Endpoint) -> Threads {
    let cores = cores();
    let local = if configured == 0 {
        locality(upstream)
    } else {
        Upstream::Remote
    };
    decide(configured, cores, local)
}

/// Whether `upstream` is on this host. A host name is resolved (bounded
/// by [`RESOLVE_LIMIT`]); an address is this host's when it is loopback or
/// a socket can be bound to it.
pub fn locality(upstream: &Endpoint) -> Upstream {
    let hostport = match upstream {
        Endpoint::Unix(_) => return Upstream::Local,
        Endpoint::Tcp(h) | Endpoint::Tls(h) => h.clone(),
    };
    let addrs: Vec<SocketAddr> = match hostport.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => {
            let (tx, rx) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("abproxy-resolve".into())
                .spawn(move || {
                    let _ = tx.send(hostport.to_socket_addrs().map(Iterator::collect));
                });
            match spawned
                .ok()
                .and_then(|_| rx.recv_timeout(RESOLVE_LIMIT).ok())
            {
                Some(Ok(a)) => a,
                _ => Vec::new(),
            }
        }
    };
    if !addrs.is_empty() && addrs.iter().all(|a| is_this_host(a.ip())) {
        Upstream::Local
    } else {
        Upstream::Remote
    }
}

fn is_this_host(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The tokio runtime the proxy runs on, named `abproxy`, with `workers`
/// threads (see [`plan`]): 1 is a current-thread runtime (the caller's
/// thread drives it in `block_on`), which does per wake-up less than a
/// one-worker multi-thread scheduler (no work-stealing queues, no
/// scheduler statistics); more is that many workers; 0 is one per CPU.
pub fn runtime(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    builder.enable_all().thread_name("abproxy").build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_count_is_kept() {
        for n in [1, 2, 7] {
            let t = decide(n, 2, Upstream::Local);
            assert_eq!(t.workers, n);
            assert!(t.why.starts_with(&format!("threads = {n}: ")), "{}", t.why);
        }
    }

    #[test]
    fn auto_leaves_half_the_cpus_to_a_server_on_this_host() {
        let cases = [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8)];
        for (cores, workers) in cases {
            assert_eq!(
                decide(0, cores, Upstream::Local).workers,
                workers,
                "{cores}"
            );
        }
        assert!(decide(0, 2, Upstream::Local)
            .why
            .contains("1 thread (a current-thread runtime)"));
    }

    #[test]
    fn auto_takes_every_cpu_in_front_of_another_host() {
        for cores in [1, 2, 16] {
            assert_eq!(decide(0, cores, Upstream::Remote).workers, cores);
        }
        assert_eq!(decide(0, 0, Upstream::Remote).workers, 1);
    }

    #[test]
    fn loopback_unix_sockets_and_this_hosts_addresses_are_local() {
        let local = |url: &str| locality(&Endpoint::parse(url).unwrap());
        assert_eq!(local("ldapi:///run/slapd/ldapi"), Upstream::Local);
        assert_eq!(local("ldap://127.0.0.1:389"), Upstream::Local);
        assert_eq!(local("ldap://127.0.0.2:389"), Upstream::Local);
        assert_eq!(local("ldaps://[::1]:636"), Upstream::Local);
        assert_eq!(local("ldap://localhost:389"), Upstream::Local);
        // TEST-NET-1 (RFC 5737): never an address of this host.
        assert_eq!(local("ldap://192.0.2.1:389"), Upstream::Remote);
        // A name that cannot resolve (RFC 6761 `.invalid`).
        assert_eq!(local("ldap://nowhere.invalid:389"), Upstream::Remote);
    }
}
