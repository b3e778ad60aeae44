//! `--allow-from`: the peer networks allowed to connect, checked by the ZAP handler.

use std::net::IpAddr;

use ipnet::IpNet;

/// Allowed peer networks.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    nets: Vec<IpNet>,
}

impl Allowlist {
    /// An allowlist of `nets`; empty allows nothing.
    pub fn new(nets: Vec<IpNet>) -> Allowlist {
        Allowlist { nets }
    }

    /// Is `address` (as ZAP reports it: an IP, v4-mapped v6 included) allowed?
    pub fn allows(&self, address: &str) -> bool {
        let Ok(ip) = address
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        else {
            return false;
        };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_matches_networks_and_mapped_addresses() {
        let allow = Allowlist::new(vec![
            "127.0.0.1/32".parse().expect("net"),
            "10.0.0.0/8".parse().expect("net"),
            "fd00::/8".parse().expect("net"),
        ]);
        assert!(allow.allows("127.0.0.1"));
        assert!(!allow.allows("127.0.0.2"));
        assert!(allow.allows("10.1.2.3"));
        assert!(allow.allows("::ffff:10.9.9.9"));
        assert!(allow.allows("fd12::1"));
        assert!(!allow.allows("192.168.1.1"));
        assert!(!allow.allows("not an address"));
        assert!(!Allowlist::default().allows("127.0.0.1"));
    }
}
