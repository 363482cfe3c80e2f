//! PROXY protocol settings, validated: a listener's `accept_proxy` (who may introduce its
//! clients with a header, [`crate::proxy_header::receive`]) and a backend's or server's
//! `send_proxy` (the header lb writes to servers).
use super::{
    locate::Step,
    raw::{RawAcceptProxy, RawSendProxy},
    with, Validator,
};
use crate::proxy_header::Version;
use ipnet::IpNet;
use std::net::IpAddr;

/// `accept_proxy:` of a listener: every connection starts with a PROXY header, and comes from
/// a trusted address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptProxy {
    /// `true`: from any address.
    Anyone,
    /// From these networks only.
    From(Vec<IpNet>),
}

impl AcceptProxy {
    /// Whether a connection from `ip` may send a header (an IPv4-mapped IPv6 address from a
    /// dual-stack listener counts as the IPv4 address).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        match self {
            AcceptProxy::Anyone => true,
            AcceptProxy::From(nets) => {
                let ip = ip.to_canonical();
                nets.iter().any(|n| n.contains(&ip))
            }
        }
    }
}

impl Validator<'_> {
    /// `accept_proxy:` at `path`.
    pub(super) fn accept_proxy(
        &mut self,
        path: &[Step],
        raw: Option<&RawAcceptProxy>,
    ) -> Option<AcceptProxy> {
        match raw? {
            RawAcceptProxy::Switch(false) => None,
            RawAcceptProxy::Switch(true) => Some(AcceptProxy::Anyone),
            RawAcceptProxy::From(list) if list.is_empty() => {
                self.error(
                    path,
                    "accept_proxy: an empty list trusts no one; write `false` to turn it off, or `true` to trust anyone",
                );
                None
            }
            RawAcceptProxy::From(list) => {
                let mut nets = Vec::new();
                for (i, text) in list.iter().enumerate() {
                    let parsed = text
                        .parse::<IpNet>()
                        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
                    match parsed {
                        Ok(net) => nets.push(net.trunc()),
                        Err(_) => self.error(
                            &with(path, Step::Index(i)),
                            format!("accept_proxy: `{text}` is not a network; expected an address or a CIDR such as 10.0.0.0/8 or fd00::/8"),
                        ),
                    }
                }
                Some(AcceptProxy::From(nets))
            }
        }
    }

    /// A `send_proxy:` at `path`: `Some(None)` for `off` or `false`; `None` when not set (or
    /// wrong, reported).
    pub(super) fn send_proxy(
        &mut self,
        path: &[Step],
        raw: Option<&RawSendProxy>,
    ) -> Option<Option<Version>> {
        let word = match raw? {
            RawSendProxy::Switch(false) => return Some(None),
            RawSendProxy::Switch(true) => {
                self.error(
                    path,
                    "send_proxy: `true` does not say which version; write v1 or v2",
                );
                return None;
            }
            RawSendProxy::Word(w) => w.as_str(),
        };
        match word {
            "v1" => Some(Some(Version::V1)),
            "v2" => Some(Some(Version::V2)),
            "off" => Some(None),
            other => {
                self.error(
                    path,
                    format!("send_proxy: `{other}` is not a PROXY protocol version; expected v1, v2 or off"),
                );
                None
            }
        }
    }
}
