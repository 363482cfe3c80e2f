//! Field offsets in the running kernel's `struct tcp_sock`, read from its BTF
//! (/sys/kernel/btf/vmlinux): the verdict program reads the peer's `write_seq` and `snd_una`,
//! whose offsets change with the kernel's version and configuration.
use btf_rs::{Btf, Type};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of the fields the program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSockOffsets {
    pub write_seq: u32,
    pub snd_una: u32,
}

/// Why the offsets could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({VMLINUX}; needs CONFIG_DEBUG_INFO_BTF): {0}")]
    Read(String),
    #[error("the kernel's BTF has no struct tcp_sock with a `{0}` field")]
    Field(&'static str),
}

/// Reads the offsets from the running kernel's BTF.
pub fn tcp_sock_offsets() -> Result<TcpSockOffsets, BtfError> {
    let btf = Btf::from_file(VMLINUX).map_err(|e| BtfError::Read(e.to_string()))?;
    Ok(TcpSockOffsets {
        write_seq: field_offset(&btf, "tcp_sock", "write_seq")?,
        snd_una: field_offset(&btf, "tcp_sock", "snd_una")?,
    })
}

/// Byte offset of a direct member of a struct (the two fields are plain u32 members of
/// `struct tcp_sock`, not in a nested struct or a bitfield).
fn field_offset(btf: &Btf, name: &str, field: &'static str) -> Result<u32, BtfError> {
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
    Err(BtfError::Field(field))
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
        assert!(o.write_seq > 0 && o.write_seq < 4096, "{o:?}");
        assert!(o.snd_una > 0 && o.snd_una < 4096, "{o:?}");
    }
}
