//! Endpoint resolution: `tcp://name:port` becomes one endpoint per address the name resolves
//! to, so a client connects to every pod behind a headless Service. The [`Resolve`] trait lets
//! a test (or an application with its own discovery) supply the addresses.

use std::net::ToSocketAddrs;

/// Resolution failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {endpoint}: {source}")]
pub struct Error {
    /// The endpoint as given.
    pub endpoint: String,
    /// What the resolver said.
    pub source: std::io::Error,
}

/// Turns configured endpoints into the concrete ones to connect to.
pub trait Resolve: Send + Sync {
    /// The endpoints to connect to now, sorted and without duplicates.
    fn resolve(&self, endpoints: &[String]) -> Result<Vec<String>, Error>;
}

/// The system resolver (getaddrinfo, so /etc/hosts and cluster DNS).
#[derive(Clone, Copy, Debug, Default)]
pub struct Dns;

impl Resolve for Dns {
    fn resolve(&self, endpoints: &[String]) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for endpoint in endpoints {
            let Some(hostport) = endpoint.strip_prefix("tcp://") else {
                out.push(endpoint.clone());
                continue;
            };
            let addrs = hostport.to_socket_addrs().map_err(|source| Error {
                endpoint: endpoint.clone(),
                source,
            })?;
            out.extend(addrs.map(|a| format!("tcp://{a}")));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Resolves with [`Dns`].
pub fn resolve(endpoints: &[String]) -> Result<Vec<String>, Error> {
    Dns.resolve(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_expand_to_addresses_and_other_endpoints_pass_through() {
        let out = resolve(&[
            "tcp://127.0.0.1:5555".into(),
            "tcp://127.0.0.1:5555".into(),
            "ipc:///tmp/x".into(),
        ])
        .expect("resolves");
        assert_eq!(out, ["ipc:///tmp/x", "tcp://127.0.0.1:5555"]);
        let local = resolve(&["tcp://localhost:1".into()]).expect("localhost resolves");
        assert!(local.iter().any(|e| e == "tcp://127.0.0.1:1"), "{local:?}");
        let err = resolve(&["tcp://no-such-host.invalid:1".into()]).expect_err("fails");
        assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
    }
}
