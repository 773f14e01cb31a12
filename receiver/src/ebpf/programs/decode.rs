//! Label decoders: the bytes of one key field turned into the text of an attribute (or, for
//! `cgroup`, into the resource the data point belongs to). Pure functions over bytes, so that
//! every decoder is tested without a kernel; a field of a size a decoder cannot read was refused
//! when the spec was checked against the object, and odd bytes here give a number, never a panic.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use super::btf::{Field, Shape};
use super::spec::Decoder;

/// What one label decodes to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Decoded {
    Text(String),
    /// The data point's resource: this cgroup.
    Cgroup(u64),
}

/// The integer in `bytes` (little-endian, 1 to 8 bytes), sign-extended when `signed`.
pub fn integer(bytes: &[u8], signed: bool) -> i128 {
    let mut raw = [0u8; 8];
    let n = bytes.len().min(8);
    raw[..n].copy_from_slice(&bytes[..n]);
    let unsigned = u64::from_le_bytes(raw);
    if signed && n > 0 && n < 8 {
        let shift = 64 - n * 8;
        i128::from(((unsigned << shift) as i64) >> shift)
    } else if signed {
        i128::from(unsigned as i64)
    } else {
        i128::from(unsigned)
    }
}

/// Whether `decoder` can read `field`; the reason when not.
pub fn check(decoder: Decoder, field: &Field) -> Result<(), String> {
    let integer_sized = matches!(field.size, 1 | 2 | 4 | 8);
    let ok = match decoder {
        Decoder::Uint | Decoder::Int | Decoder::Errno | Decoder::StaticMap | Decoder::Syscall => {
            integer_sized && field.shape != Shape::Composite
        }
        Decoder::Ksym | Decoder::Cgroup => field.size == 8 && field.shape != Shape::Composite,
        Decoder::String => field.shape == Shape::Bytes || field.size == 1,
        Decoder::Inet => matches!(field.size, 4 | 16) && field.shape != Shape::Composite,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "decoder {} cannot read a {}-byte {}",
            decoder_name(decoder),
            field.size,
            match field.shape {
                Shape::Integer { .. } => "integer",
                Shape::Bytes => "byte array",
                Shape::Composite => "struct or array",
            }
        ))
    }
}

pub fn decoder_name(decoder: Decoder) -> &'static str {
    match decoder {
        Decoder::Uint => "uint",
        Decoder::Int => "int",
        Decoder::String => "string",
        Decoder::Errno => "errno",
        Decoder::Inet => "inet",
        Decoder::Ksym => "ksym",
        Decoder::StaticMap => "static_map",
        Decoder::Syscall => "syscall",
        Decoder::Cgroup => "cgroup",
    }
}

/// Decodes `bytes` (exactly the field's) with `decoder`; `values` is a static map's table.
pub fn decode(decoder: Decoder, bytes: &[u8], values: &BTreeMap<String, String>) -> Decoded {
    let signed = matches!(decoder, Decoder::Int | Decoder::Errno);
    let number = || integer(bytes, signed);
    Decoded::Text(match decoder {
        Decoder::Uint | Decoder::Int => number().to_string(),
        Decoder::String => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        }
        Decoder::Errno => errno_name(number()),
        Decoder::Inet => match bytes.len() {
            4 => Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
            16 => {
                let mut raw = [0u8; 16];
                raw.copy_from_slice(bytes);
                Ipv6Addr::from(raw).to_canonical().to_string()
            }
            _ => number().to_string(),
        },
        Decoder::Ksym => kernel_symbol(number() as u64),
        Decoder::StaticMap => {
            let n = number().to_string();
            values.get(&n).cloned().unwrap_or(n)
        }
        Decoder::Syscall => {
            let nr = number();
            usize::try_from(nr)
                .ok()
                .and_then(syscalls::Sysno::new)
                .map(|s| s.name().to_string())
                .unwrap_or_else(|| format!("syscall_{nr}"))
        }
        Decoder::Cgroup => return Decoded::Cgroup(number() as u64),
    })
}

/// `ENOENT` for 2 or -2; the number for an errno Linux does not name.
fn errno_name(errno: i128) -> String {
    let n = errno.unsigned_abs();
    usize::try_from(n)
        .ok()
        .and_then(|n| ERRNO_NAMES.get(n))
        .filter(|name| !name.is_empty())
        .map(|name| name.to_string())
        .unwrap_or_else(|| errno.to_string())
}

/// Linux's errno names (asm-generic/errno-base.h and errno.h), by number.
const ERRNO_NAMES: &[&str] = &[
    "",
    "EPERM",
    "ENOENT",
    "ESRCH",
    "EINTR",
    "EIO",
    "ENXIO",
    "E2BIG",
    "ENOEXEC",
    "EBADF",
    "ECHILD",
    "EAGAIN",
    "ENOMEM",
    "EACCES",
    "EFAULT",
    "ENOTBLK",
    "EBUSY",
    "EEXIST",
    "EXDEV",
    "ENODEV",
    "ENOTDIR",
    "EISDIR",
    "EINVAL",
    "ENFILE",
    "EMFILE",
    "ENOTTY",
    "ETXTBSY",
    "EFBIG",
    "ENOSPC",
    "ESPIPE",
    "EROFS",
    "EMLINK",
    "EPIPE",
    "EDOM",
    "ERANGE",
    "EDEADLK",
    "ENAMETOOLONG",
    "ENOLCK",
    "ENOSYS",
    "ENOTEMPTY",
    "ELOOP",
    "",
    "ENOMSG",
    "EIDRM",
    "ECHRNG",
    "EL2NSYNC",
    "EL3HLT",
    "EL3RST",
    "ELNRNG",
    "EUNATCH",
    "ENOCSI",
    "EL2HLT",
    "EBADE",
    "EBADR",
    "EXFULL",
    "ENOANO",
    "EBADRQC",
    "EBADSLT",
    "",
    "EBFONT",
    "ENOSTR",
    "ENODATA",
    "ETIME",
    "ENOSR",
    "ENONET",
    "ENOPKG",
    "EREMOTE",
    "ENOLINK",
    "EADV",
    "ESRMNT",
    "ECOMM",
    "EPROTO",
    "EMULTIHOP",
    "EDOTDOT",
    "EBADMSG",
    "EOVERFLOW",
    "ENOTUNIQ",
    "EBADFD",
    "EREMCHG",
    "ELIBACC",
    "ELIBBAD",
    "ELIBSCN",
    "ELIBMAX",
    "ELIBEXEC",
    "EILSEQ",
    "ERESTART",
    "ESTRPIPE",
    "EUSERS",
    "ENOTSOCK",
    "EDESTADDRREQ",
    "EMSGSIZE",
    "EPROTOTYPE",
    "ENOPROTOOPT",
    "EPROTONOSUPPORT",
    "ESOCKTNOSUPPORT",
    "EOPNOTSUPP",
    "EPFNOSUPPORT",
    "EAFNOSUPPORT",
    "EADDRINUSE",
    "EADDRNOTAVAIL",
    "ENETDOWN",
    "ENETUNREACH",
    "ENETRESET",
    "ECONNABORTED",
    "ECONNRESET",
    "ENOBUFS",
    "EISCONN",
    "ENOTCONN",
    "ESHUTDOWN",
    "ETOOMANYREFS",
    "ETIMEDOUT",
    "ECONNREFUSED",
    "EHOSTDOWN",
    "EHOSTUNREACH",
    "EALREADY",
    "EINPROGRESS",
    "ESTALE",
    "EUCLEAN",
    "ENOTNAM",
    "ENAVAIL",
    "EISNAM",
    "EREMOTEIO",
    "EDQUOT",
    "ENOMEDIUM",
    "EMEDIUMTYPE",
    "ECANCELED",
    "ENOKEY",
    "EKEYEXPIRED",
    "EKEYREVOKED",
    "EKEYREJECTED",
    "EOWNERDEAD",
    "ENOTRECOVERABLE",
    "ERFKILL",
    "EHWPOISON",
];

/// The kernel's symbols (`/proc/kallsyms`), sorted by address, read once on first use.
fn kallsyms() -> &'static [(u64, String)] {
    static SYMBOLS: OnceLock<Vec<(u64, String)>> = OnceLock::new();
    SYMBOLS.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let address = u64::from_str_radix(parts.next()?, 16).ok()?;
                let _kind = parts.next()?;
                Some((address, parts.next()?.to_string()))
            })
            .filter(|(address, _)| *address != 0)
            .collect();
        symbols.sort();
        symbols
    })
}

/// The symbol containing `address`, or the address in hex when none is known (no kallsyms
/// access, or addresses hidden by `kptr_restrict`).
fn kernel_symbol(address: u64) -> String {
    let symbols = kallsyms();
    match symbols.partition_point(|(a, _)| *a <= address) {
        0 => format!("{address:#x}"),
        i => symbols[i - 1].1.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(decoder: Decoder, bytes: &[u8]) -> String {
        match decode(decoder, bytes, &BTreeMap::new()) {
            Decoded::Text(t) => t,
            Decoded::Cgroup(id) => format!("cgroup {id}"),
        }
    }

    #[test]
    fn each_decoder_reads_its_bytes() {
        assert_eq!(text(Decoder::Uint, &7u32.to_le_bytes()), "7");
        assert_eq!(text(Decoder::Int, &(-3i16).to_le_bytes()), "-3");
        assert_eq!(text(Decoder::String, b"bash\0\0garbage"), "bash");
        assert_eq!(text(Decoder::String, b"full"), "full");
        assert_eq!(text(Decoder::Errno, &(-2i32).to_le_bytes()), "ENOENT");
        assert_eq!(text(Decoder::Errno, &111u32.to_le_bytes()), "ECONNREFUSED");
        assert_eq!(text(Decoder::Errno, &5000i32.to_le_bytes()), "5000");
        assert_eq!(text(Decoder::Inet, &[10, 0, 0, 7]), "10.0.0.7");
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        v6[15] = 1;
        assert_eq!(text(Decoder::Inet, &v6), "fd00::1");
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        assert_eq!(text(Decoder::Inet, &mapped), "127.0.0.1");
        assert_eq!(text(Decoder::Syscall, &39u64.to_le_bytes()), "getpid");
        assert_eq!(text(Decoder::Cgroup, &42u64.to_le_bytes()), "cgroup 42");
        let values = BTreeMap::from([("1".to_string(), "read".to_string())]);
        assert_eq!(
            decode(Decoder::StaticMap, &1u8.to_le_bytes(), &values),
            Decoded::Text("read".into())
        );
        assert_eq!(
            decode(Decoder::StaticMap, &9u8.to_le_bytes(), &values),
            Decoded::Text("9".into())
        );
    }

    #[test]
    fn a_decoder_refuses_a_field_it_cannot_read() {
        let bytes16 = Field {
            offset: 0,
            size: 16,
            shape: Shape::Bytes,
        };
        let u64f = Field {
            offset: 0,
            size: 8,
            shape: Shape::Integer { signed: false },
        };
        assert!(check(Decoder::String, &bytes16).is_ok());
        assert!(check(Decoder::Inet, &bytes16).is_ok());
        assert_eq!(
            check(Decoder::Uint, &bytes16).unwrap_err(),
            "decoder uint cannot read a 16-byte byte array"
        );
        assert!(check(Decoder::Cgroup, &u64f).is_ok());
        assert!(check(Decoder::String, &u64f).is_err());
    }
}
