//! The BPF Type Format of a user's object (its `.BTF` section), read far enough to lay out map
//! keys and values: integers, enums, arrays, structs and unions, with the qualifiers and typedefs
//! in between, and the `const volatile` globals of `.rodata`. The format is the kernel's
//! (`Documentation/bpf/btf.rst`).
//!
//! Written here rather than taken from a crate: aya-obj parses BTF but keeps its types private,
//! and the one standalone BTF crate is LGPL, which this Apache-2.0 binary links statically.
//! It must not trust the bytes: every read is bounds-checked and a bad section is an error.

use std::collections::HashMap;

/// A BTF type id (0 is `void`).
pub type TypeId = u32;

#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    Void,
    Int {
        size: u32,
        signed: bool,
    },
    Float {
        size: u32,
    },
    Ptr,
    Array {
        element: TypeId,
        len: u32,
    },
    Struct {
        size: u32,
        members: Vec<Member>,
    },
    Union {
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        size: u32,
        signed: bool,
    },
    /// Typedef, const, volatile, restrict, type tag: the type they qualify.
    Alias(TypeId),
    Var {
        name: String,
        of: TypeId,
    },
    Datasec {
        name: String,
        vars: Vec<(TypeId, u32, u32)>,
    },
    /// Functions, prototypes, forward declarations, declaration tags: nothing to lay out.
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub of: TypeId,
    pub bit_offset: u32,
    /// Non-zero for a bitfield.
    pub bit_size: u32,
}

/// The types of one object, by id, with their names.
#[derive(Debug, Default)]
pub struct Btf {
    types: Vec<(String, Type)>,
}

/// Where a field lies in a key or value, and how its bytes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
    pub shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An integer or enum (little-endian) of `size` bytes.
    Integer { signed: bool },
    /// An array of bytes (`char comm[16]`, an address).
    Bytes,
    /// Anything else (a struct, an array of wider elements): only its bytes.
    Composite,
}

const MAGIC: u16 = 0xeb9f;

fn u32_at(data: &[u8], at: usize) -> Result<u32, String> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("BTF truncated at byte {at}"))
}

impl Btf {
    /// Parses a raw `.BTF` section (little-endian, as clang writes it for `-target bpf`).
    pub fn parse(data: &[u8]) -> Result<Btf, String> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or("BTF section too short")?;
        if magic != MAGIC {
            return Err(format!(
                "BTF magic {magic:#x}, expected {MAGIC:#x} (little-endian BTF)"
            ));
        }
        let header_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            let start = header_len.checked_add(off).ok_or("BTF offset overflow")?;
            data.get(start..start.checked_add(len).ok_or("BTF length overflow")?)
                .ok_or("BTF section extends past its data")
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let name = |off: u32| -> String {
            let tail = strings.get(off as usize..).unwrap_or_default();
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            String::from_utf8_lossy(&tail[..end]).into_owned()
        };

        let mut parsed = vec![(String::new(), Type::Void)];
        let mut at = 0;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let size_or_type = u32_at(types, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                1 => {
                    let encoding = u32_at(types, at)?;
                    at += 4;
                    Type::Int {
                        size: size_or_type,
                        signed: (encoding >> 24) & 1 == 1,
                    }
                }
                2 => Type::Ptr,
                3 => {
                    let element = u32_at(types, at)?;
                    let len = u32_at(types, at + 8)?;
                    at += 12;
                    Type::Array { element, len }
                }
                4 | 5 => {
                    let mut members = Vec::with_capacity(vlen.min(1024));
                    for _ in 0..vlen {
                        let offset = u32_at(types, at + 8)?;
                        let (bit_offset, bit_size) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name: name(u32_at(types, at)?),
                            of: u32_at(types, at + 4)?,
                            bit_offset,
                            bit_size,
                        });
                        at += 12;
                    }
                    if kind == 4 {
                        Type::Struct {
                            size: size_or_type,
                            members,
                        }
                    } else {
                        Type::Union {
                            size: size_or_type,
                            members,
                        }
                    }
                }
                6 | 19 => {
                    at += vlen * if kind == 6 { 8 } else { 12 };
                    Type::Enum {
                        size: size_or_type,
                        signed: kind_flag,
                    }
                }
                7 | 12 => Type::Other,
                8..=11 | 18 => Type::Alias(size_or_type),
                13 => {
                    at += vlen * 8;
                    Type::Other
                }
                14 => {
                    at += 4;
                    Type::Var {
                        name: name(name_off),
                        of: size_or_type,
                    }
                }
                15 => {
                    let mut vars = Vec::with_capacity(vlen.min(1024));
                    for _ in 0..vlen {
                        vars.push((
                            u32_at(types, at)?,
                            u32_at(types, at + 4)?,
                            u32_at(types, at + 8)?,
                        ));
                        at += 12;
                    }
                    Type::Datasec {
                        name: name(name_off),
                        vars,
                    }
                }
                16 => Type::Float { size: size_or_type },
                17 => {
                    at += 4;
                    Type::Other
                }
                other => return Err(format!("BTF type kind {other} is not known")),
            };
            if at > types.len() {
                return Err("BTF type section truncated".to_string());
            }
            parsed.push((name(name_off), ty));
        }
        Ok(Btf { types: parsed })
    }

    /// The type with this id, qualifiers and typedefs resolved (bounded against cycles).
    pub fn resolve(&self, mut id: TypeId) -> Result<&Type, String> {
        for _ in 0..32 {
            match &self.get(id)?.1 {
                Type::Alias(of) => id = *of,
                other => return Ok(other),
            }
        }
        Err(format!("BTF type {id}: too many typedefs and qualifiers"))
    }

    fn get(&self, id: TypeId) -> Result<&(String, Type), String> {
        self.types
            .get(id as usize)
            .ok_or_else(|| format!("BTF type {id} does not exist"))
    }

    /// The size in bytes of a type.
    pub fn size_of(&self, id: TypeId) -> Result<usize, String> {
        Ok(match self.resolve(id)? {
            Type::Int { size, .. }
            | Type::Float { size }
            | Type::Struct { size, .. }
            | Type::Union { size, .. }
            | Type::Enum { size, .. } => *size as usize,
            Type::Ptr => 8,
            Type::Array { element, len } => self
                .size_of(*element)?
                .checked_mul(*len as usize)
                .ok_or("BTF array size overflow")?,
            Type::Var { of, .. } => self.size_of(*of)?,
            other => return Err(format!("BTF type {id} ({other:?}) has no size")),
        })
    }

    /// The whole of type `id` as a field (a scalar key or value).
    pub fn whole(&self, id: TypeId) -> Result<Field, String> {
        Ok(Field {
            offset: 0,
            size: self.size_of(id)?,
            shape: self.shape(id)?,
        })
    }

    fn shape(&self, id: TypeId) -> Result<Shape, String> {
        Ok(match self.resolve(id)? {
            Type::Int { signed, .. } | Type::Enum { signed, .. } => {
                Shape::Integer { signed: *signed }
            }
            Type::Array { element, .. } if self.size_of(*element)? == 1 => Shape::Bytes,
            _ => Shape::Composite,
        })
    }

    /// The field at `path` (`a.b`: member `b` of member `a`) of struct or union type `id`.
    pub fn field(&self, id: TypeId, path: &str) -> Result<Field, String> {
        let mut ty = id;
        let mut offset = 0usize;
        for part in path.split('.') {
            let members = match self.resolve(ty)? {
                Type::Struct { members, .. } | Type::Union { members, .. } => members,
                other => {
                    return Err(format!(
                        "{path}: {} is not a struct (it is {})",
                        if offset == 0 {
                            "the type"
                        } else {
                            "a parent field"
                        },
                        self.describe_resolved(other)
                    ))
                }
            };
            let member = members.iter().find(|m| m.name == part).ok_or_else(|| {
                let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                format!("no field {part:?}; the fields are {}", names.join(", "))
            })?;
            if member.bit_size != 0 || member.bit_offset % 8 != 0 {
                return Err(format!(
                    "{path}: bitfields cannot be read as labels or values"
                ));
            }
            offset += member.bit_offset as usize / 8;
            ty = member.of;
        }
        Ok(Field {
            offset,
            size: self.size_of(ty)?,
            shape: self.shape(ty)?,
        })
    }

    /// The member names of a struct type, in order (for `bucket` defaults and messages).
    pub fn members(&self, id: TypeId) -> Vec<String> {
        match self.resolve(id) {
            Ok(Type::Struct { members, .. }) => members.iter().map(|m| m.name.clone()).collect(),
            _ => Vec::new(),
        }
    }

    /// A C-like description of type `id` (`struct key { u64 cgroup_id; char comm[16]; }`), for
    /// `podscope program check`.
    pub fn describe(&self, id: TypeId) -> String {
        let name = self.get(id).map(|(n, _)| n.as_str()).unwrap_or("");
        match self.resolve(id) {
            Ok(Type::Struct { members, size } | Type::Union { members, size }) => {
                let fields: Vec<String> = members
                    .iter()
                    .map(|m| format!("{} {} @{}", self.type_name(m.of), m.name, m.bit_offset / 8))
                    .collect();
                format!("struct {name} ({size} bytes) {{ {} }}", fields.join("; "))
            }
            Ok(_) => self.type_name(id),
            Err(e) => e,
        }
    }

    fn describe_resolved(&self, ty: &Type) -> String {
        match ty {
            Type::Int { size, signed } => format!(
                "a {}-byte {} integer",
                size,
                if *signed { "signed" } else { "unsigned" }
            ),
            Type::Array { .. } => "an array".to_string(),
            Type::Ptr => "a pointer".to_string(),
            Type::Enum { .. } => "an enum".to_string(),
            _ => "not a struct".to_string(),
        }
    }

    /// A short C name of type `id` (`u64`, `char[16]`, `struct key`).
    pub fn type_name(&self, id: TypeId) -> String {
        let Ok((name, ty)) = self.get(id) else {
            return format!("<type {id}>");
        };
        match ty {
            Type::Alias(of) if name.is_empty() => self.type_name(*of),
            Type::Array { element, len } => format!("{}[{len}]", self.type_name(*element)),
            Type::Struct { .. } => format!("struct {name}"),
            Type::Union { .. } => format!("union {name}"),
            Type::Enum { .. } => format!("enum {name}"),
            Type::Ptr => "pointer".to_string(),
            Type::Void => "void".to_string(),
            _ => name.clone(),
        }
    }

    /// The `const volatile` globals (variables of `.rodata`): name → size in bytes.
    pub fn rodata_globals(&self) -> HashMap<String, usize> {
        let mut globals = HashMap::new();
        for (_, ty) in &self.types {
            let Type::Datasec { name, vars } = ty else {
                continue;
            };
            if !name.starts_with(".rodata") {
                continue;
            }
            for (var, _, size) in vars {
                if let Ok((_, Type::Var { name, .. })) = self.get(*var) {
                    globals.insert(name.clone(), *size as usize);
                }
            }
        }
        globals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with the given types (each: info word, size/type, extra words) and strings.
    fn blob(types: &[(u32, u32, u32, Vec<u32>)], strings: &[u8]) -> Vec<u8> {
        let mut type_bytes = Vec::new();
        for (name, info, size, extra) in types {
            for word in [*name, *info, *size].iter().chain(extra) {
                type_bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&type_bytes);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn a_struct_key_is_laid_out_by_field_name() {
        // strings: 0 "", 1 "u64", 5 "char", 10 "key", 14 "cgroup_id", 24 "comm"
        let strings = b"\0u64\0char\0key\0cgroup_id\0comm\0";
        let btf = blob(
            &[
                (1, 1 << 24, 8, vec![64]),                          // 1: u64
                (5, 1 << 24, 1, vec![(1 << 24) | 8]),               // 2: char (signed)
                (0, 3 << 24, 0, vec![2, 1, 16]),                    // 3: char[16]
                (10, (4 << 24) | 2, 24, vec![14, 1, 0, 24, 3, 64]), // 4: struct key
            ],
            strings,
        );
        let btf = Btf::parse(&btf).unwrap();
        assert_eq!(
            btf.field(4, "cgroup_id").unwrap(),
            Field {
                offset: 0,
                size: 8,
                shape: Shape::Integer { signed: false }
            }
        );
        assert_eq!(
            btf.field(4, "comm").unwrap(),
            Field {
                offset: 8,
                size: 16,
                shape: Shape::Bytes
            }
        );
        assert_eq!(btf.size_of(4).unwrap(), 24);
        assert_eq!(
            btf.field(4, "pid").unwrap_err(),
            "no field \"pid\"; the fields are cgroup_id, comm"
        );
        assert_eq!(
            btf.describe(4),
            "struct key (24 bytes) { u64 cgroup_id @0; char[16] comm @8 }"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0]).is_err());
        let mut truncated = blob(&[(1, 1 << 24, 8, vec![64])], b"\0u64\0");
        truncated.truncate(30);
        assert!(Btf::parse(&truncated).is_err());
    }
}
