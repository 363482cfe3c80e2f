//! Field offsets in the running kernel's `struct tcp_sock` and `struct sk_buff`, read from its
//! BTF (/sys/kernel/btf/vmlinux): the verdict program reads the peer's `write_seq` and
//! `snd_una`, its own socket's `copied_seq` and each skb's TCP sequence number, whose offsets
//! change with the kernel's version and configuration.
use btf_rs::{Btf, Type};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of the fields the program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSockOffsets {
    pub write_seq: u32,
    pub snd_una: u32,
    pub copied_seq: u32,
    /// `TCP_SKB_CB(skb)->seq`: the offset of `cb` in `struct sk_buff` plus that of `seq` in
    /// `struct tcp_skb_cb`.
    pub skb_seq: u32,
}

/// Why the offsets could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({VMLINUX}; needs CONFIG_DEBUG_INFO_BTF): {0}")]
    Read(String),
    #[error("the kernel's BTF has no struct {0} with a `{1}` field")]
    Field(&'static str, &'static str),
}

/// Reads the offsets from the running kernel's BTF.
pub fn tcp_sock_offsets() -> Result<TcpSockOffsets, BtfError> {
    let btf = Btf::from_file(VMLINUX).map_err(|e| BtfError::Read(e.to_string()))?;
    Ok(TcpSockOffsets {
        write_seq: field_offset(&btf, "tcp_sock", "write_seq")?,
        snd_una: field_offset(&btf, "tcp_sock", "snd_una")?,
        copied_seq: field_offset(&btf, "tcp_sock", "copied_seq")?,
        skb_seq: field_offset(&btf, "sk_buff", "cb")? + field_offset(&btf, "tcp_skb_cb", "seq")?,
    })
}

/// Byte offset of a direct member of a struct (every field read is a plain member, not in a
/// nested struct or a bitfield).
fn field_offset(btf: &Btf, name: &'static str, field: &'static str) -> Result<u32, BtfError> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|e| BtfError::Read(e.to_string()))?;
    for ty in types {
        let Type::Struct(s) = ty else { continue };
        for m in &s.members {
            if btf.resolve_name(m).is_ok_and(|n| n == field) && matches!(m.bitfield_size(), None | Some(0)) {
                return Ok(m.bit_offset() / 8);
            }
        }
    }
    Err(BtfError::Field(name, field))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this kernel the fields exist, are distinct, and lie inside the struct.
    #[test]
    fn offsets_of_the_running_kernel() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("SKIPPED: no {VMLINUX}");
            return;
        }
        let o = tcp_sock_offsets().unwrap();
        assert_ne!(o.write_seq, o.snd_una);
        assert_ne!(o.copied_seq, o.snd_una);
        for field in [o.write_seq, o.snd_una, o.copied_seq] {
            assert!(field > 0 && field < 4096, "{o:?}");
        }
        // cb follows next/prev/dev (or their union), sk and tstamp: 40 bytes on 64-bit.
        assert!(o.skb_seq >= 40 && o.skb_seq < 256, "{o:?}");
    }
}
