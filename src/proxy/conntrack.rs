//! Conntrack clean-up through ctnetlink: deletes the entries of UDP flows answered by an
//! endpoint that went away (kube-proxy's `conntrack -D -p udp --reply-src IP
//! --reply-port-src PORT`), as one filtered flush request: the kernel matches the reply tuple's
//! source address, protocol and source port. Kernels without filtered flushes get the
//! conntrack tool instead.

use std::net::Ipv4Addr;

use crate::net::nft::{NftError, attr, nested, send_and_ack};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const AF_INET: u8 = 2;

const CTA_TUPLE_REPLY: u16 = 2;
const CTA_FILTER: u16 = 25;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const FILTER_IP_SRC: u32 = 1 << 0;
const FILTER_PROTO_NUM: u32 = 1 << 3;
const FILTER_PROTO_SRC_PORT: u32 = 1 << 4;

/// The request: delete every entry whose reply comes from `ip:port` over `proto`.
fn request(ip: Ipv4Addr, port: u16, proto: u8) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b[8..12].copy_from_slice(&1u32.to_ne_bytes());
    b.extend_from_slice(&[AF_INET, 0, 0, 0]);
    nested(&mut b, CTA_TUPLE_REPLY, |b| {
        nested(b, CTA_TUPLE_IP, |b| attr(b, CTA_IP_V4_SRC, &ip.octets()));
        nested(b, CTA_TUPLE_PROTO, |b| {
            attr(b, CTA_PROTO_NUM, &[proto]);
            attr(b, CTA_PROTO_SRC_PORT, &port.to_be_bytes());
        });
    });
    nested(&mut b, CTA_FILTER, |b| {
        attr(b, CTA_FILTER_ORIG_FLAGS, &0u32.to_ne_bytes());
        attr(
            b,
            CTA_FILTER_REPLY_FLAGS,
            &(FILTER_IP_SRC | FILTER_PROTO_NUM | FILTER_PROTO_SRC_PORT).to_ne_bytes(),
        );
    });
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// Deletes the conntrack entries of UDP flows answered by `ip:port` (in the calling thread's
/// network namespace).
pub fn delete_udp_replies_from(ip: Ipv4Addr, port: u16) -> Result<(), NftError> {
    send_and_ack(
        &request(ip, port, 17),
        vec![(
            1,
            format!("conntrack flush of UDP replies from {ip}:{port}"),
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_reply_tuple_and_its_filter() {
        let r = request(Ipv4Addr::new(10, 244, 1, 7), 5353, 17);
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0102);
        assert_eq!(r[16], AF_INET);
        // The address, the protocol and the big-endian port are all in there.
        let w = |needle: &[u8]| r.windows(needle.len()).any(|x| x == needle);
        assert!(w(&[8, 0, 1, 0, 10, 244, 1, 7]), "CTA_IP_V4_SRC");
        assert!(w(&[5, 0, 1, 0, 17]), "CTA_PROTO_NUM");
        assert!(w(&[6, 0, 2, 0, 0x14, 0xe9]), "CTA_PROTO_SRC_PORT");
    }
}
