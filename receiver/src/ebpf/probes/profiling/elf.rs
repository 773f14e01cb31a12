//! One ELF file as the profiler needs it: its build id, where its segments load (to turn a file
//! offset into an address of the file), its unwind tables (`.eh_frame`, `.eh_frame_hdr`) and its
//! function symbols (`.symtab`, else the MiniDebugInfo in `.gnu_debugdata`, and `.dynsym`), read
//! once with only the sections they need, and what all of it costs in memory.
//!
//! It reads files; it does not know processes or caches.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

/// A `PT_LOAD` segment: file bytes `[offset, offset + file_size)` load at `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub file_size: u64,
    pub executable: bool,
}

/// The sections framehop unwinds with, as the file states their addresses.
pub struct UnwindTables {
    pub text_svma: Option<Range<u64>>,
    pub got_svma: Option<Range<u64>>,
    pub eh_frame_svma: Range<u64>,
    pub eh_frame: Arc<[u8]>,
    pub eh_frame_hdr_svma: Option<Range<u64>>,
    pub eh_frame_hdr: Option<Arc<[u8]>>,
}

impl UnwindTables {
    pub fn bytes(&self) -> usize {
        self.eh_frame.len() + self.eh_frame_hdr.as_ref().map_or(0, |h| h.len())
    }
}

/// Function symbols sorted by address; names are kept as the file has them (mangled) in one
/// buffer and demangled when looked up.
#[derive(Debug, Default)]
pub struct SymbolTable {
    entries: Vec<SymbolEntry>,
    names: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct SymbolEntry {
    start: u64,
    end: u64,
    name_at: u32,
    name_len: u32,
}

impl SymbolTable {
    /// Memory it holds.
    pub fn bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<SymbolEntry>() + self.names.capacity()
    }

    /// The function containing `svma` (an address as the file states it), demangled.
    pub fn lookup(&self, svma: u64) -> Option<String> {
        let i = self.entries.partition_point(|e| e.start <= svma);
        let entry = self.entries.get(i.checked_sub(1)?)?;
        if svma >= entry.end {
            return None;
        }
        let raw = &self.names[entry.name_at as usize..][..entry.name_len as usize];
        Some(demangle(&String::from_utf8_lossy(raw)))
    }

    /// Builds the table from (address, size, name); a symbol without a size ends where the next
    /// one starts. Stops adding once `limit` bytes would be exceeded: `Err` then.
    fn build(mut symbols: Vec<(u64, u64, &[u8])>, limit: usize) -> Result<SymbolTable, Overflow> {
        symbols.sort_by_key(|&(start, size, _)| (start, std::cmp::Reverse(size)));
        symbols.dedup_by_key(|s| s.0);
        let names_len: usize = symbols.iter().map(|s| s.2.len()).sum();
        let cost = symbols.len() * std::mem::size_of::<SymbolEntry>() + names_len;
        if cost > limit {
            return Err(Overflow { bytes: cost });
        }
        let mut table = SymbolTable {
            entries: Vec::with_capacity(symbols.len()),
            names: Vec::with_capacity(names_len),
        };
        for (i, &(start, size, name)) in symbols.iter().enumerate() {
            let end = if size > 0 {
                start.saturating_add(size)
            } else {
                symbols.get(i + 1).map_or(start.saturating_add(1), |next| next.0)
            };
            table.entries.push(SymbolEntry {
                start,
                end,
                name_at: table.names.len() as u32,
                name_len: name.len() as u32,
            });
            table.names.extend_from_slice(name);
        }
        Ok(table)
    }
}

/// A symbol table larger than the memory it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    pub bytes: usize,
}

/// Rust (legacy and v0) and C++ names as people read them; anything else as it is.
pub fn demangle(name: &str) -> String {
    let rust_legacy = name.starts_with("_ZN") && is_rust_legacy_hash(name);
    if name.starts_with("_R") || rust_legacy {
        if let Ok(demangled) = rustc_demangle::try_demangle(name) {
            return format!("{demangled:#}");
        }
    }
    if name.starts_with("_Z") {
        // The C++ demangler recurses once per nesting level of the name, up to its limits (96
        // to parse, 128 to print by default): deep enough, in a debug build's larger frames, to
        // overflow a 2 MiB thread stack on a crafted name (found by fuzzing). Real names nest
        // far less; past these limits a name stays as it is.
        let parse = cpp_demangle::ParseOptions::default().recursion_limit(CPP_DEMANGLE_DEPTH);
        let print = cpp_demangle::DemangleOptions::default().recursion_limit(CPP_DEMANGLE_DEPTH);
        if let Ok(symbol) = cpp_demangle::Symbol::new_with_options(name, &parse) {
            if let Ok(demangled) = symbol.demangle_with_options(&print) {
                return demangled;
            }
        }
    }
    name.to_string()
}

/// How deep a C++ name may nest for [`demangle`].
const CPP_DEMANGLE_DEPTH: u32 = 48;

/// Legacy Rust symbols end in a hash path segment: `17h<16 hex digits>E`.
fn is_rust_legacy_hash(name: &str) -> bool {
    // Bytes, not str slices: a name is any bytes a binary holds, and a cut inside a multi-byte
    // character would panic (found by fuzzing).
    let Some(body) = name.as_bytes().strip_suffix(b"E") else {
        return false;
    };
    body.len() > 19
        && body[body.len() - 19..].starts_with(b"17h")
        && body[body.len() - 16..].iter().all(u8::is_ascii_hexdigit)
}

/// What the profiler keeps of one ELF file.
pub struct ElfModule {
    pub build_id: Option<Vec<u8>>,
    pub segments: Vec<LoadSegment>,
    pub unwind: Option<Arc<UnwindTables>>,
    pub symbols: SymbolTable,
    /// The symbol table would have needed this many bytes, more than allowed: left empty.
    pub symbols_over: Option<Overflow>,
}

impl ElfModule {
    /// Reads `path`: only the headers and the sections named above are read. The symbol table may
    /// use at most `symbol_limit` bytes.
    pub fn read(path: &Path, symbol_limit: usize) -> Result<ElfModule, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cache = object::ReadCache::new(file);
        let elf = ElfFile64::<object::Endianness, _>::parse(&cache)
            .map_err(|e| format!("{}: not a 64-bit ELF file: {e}", path.display()))?;
        let endian = elf.endian();
        let segments = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
            .map(|ph| LoadSegment {
                offset: ph.p_offset(endian),
                vaddr: ph.p_vaddr(endian),
                file_size: ph.p_filesz(endian),
                executable: ph.p_flags(endian) & object::elf::PF_X != 0,
            })
            .collect();
        let build_id = elf.build_id().ok().flatten().map(<[u8]>::to_vec);
        let range = |name: &str| {
            elf.section_by_name(name)
                // Saturating: a section's address and size are the file's word (found by fuzzing).
                .map(|s| s.address()..s.address().saturating_add(s.size()))
        };
        let data = |name: &str| -> Option<Arc<[u8]>> {
            elf.section_by_name(name)
                .and_then(|s| s.data().ok())
                .filter(|d| !d.is_empty())
                .map(Arc::from)
        };
        let unwind = match (range(".eh_frame"), data(".eh_frame")) {
            (Some(eh_frame_svma), Some(eh_frame)) => Some(Arc::new(UnwindTables {
                text_svma: range(".text"),
                got_svma: range(".got"),
                eh_frame_svma,
                eh_frame,
                eh_frame_hdr_svma: range(".eh_frame_hdr"),
                eh_frame_hdr: data(".eh_frame_hdr"),
            })),
            _ => None,
        };

        let text = |s: &object::read::elf::ElfSymbol64<'_, '_, object::Endianness, _>| {
            s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0
        };
        let symtab: Vec<(u64, u64, &[u8])> = elf
            .symbols()
            .filter(text)
            .filter_map(|s| Some((s.address(), s.size(), s.name_bytes().ok()?)))
            .collect();
        // MiniDebugInfo: a stripped binary (Fedora, some distributions) keeps its local function
        // symbols in an xz-compressed ELF of its own.
        let mut mini_symbols: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        if symtab.is_empty() {
            if let Some(bytes) = data(".gnu_debugdata").and_then(|xz| unpack_xz(&xz).ok()) {
                if let Ok(mini) = ElfFile64::<object::Endianness, &[u8]>::parse(&bytes[..]) {
                    mini_symbols.extend(
                        mini.symbols()
                            .filter(|s| {
                                s.kind() == SymbolKind::Text
                                    && s.is_definition()
                                    && s.address() != 0
                            })
                            .filter_map(|s| {
                                Some((s.address(), s.size(), s.name_bytes().ok()?.to_vec()))
                            }),
                    );
                }
            }
        }
        let dynsym: Vec<(u64, u64, &[u8])> = elf
            .dynamic_symbols()
            .filter(text)
            .filter_map(|s| Some((s.address(), s.size(), s.name_bytes().ok()?)))
            .collect();
        let functions = symtab
            .iter()
            .copied()
            .chain(mini_symbols.iter().map(|(a, s, n)| (*a, *s, n.as_slice())))
            .chain(dynsym.iter().copied())
            .collect();
        let (symbols, symbols_over) = match SymbolTable::build(functions, symbol_limit) {
            Ok(table) => (table, None),
            Err(over) => (SymbolTable::default(), Some(over)),
        };
        Ok(ElfModule {
            build_id,
            segments,
            unwind,
            symbols,
            symbols_over,
        })
    }

}

/// The file address at which an executable mapping of file offset `map_offset` (page aligned,
/// as `/proc/<pid>/maps` shows it) starts: the kernel maps a segment from its offset rounded
/// down to a page, so the segment is the executable one starting in that page, and the page's
/// start lies before the segment's own address by as much as its offset does.
pub fn mapping_svma(segments: &[LoadSegment], map_offset: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    segments
        .iter()
        .filter(|s| s.offset & !(PAGE - 1) == map_offset)
        .max_by_key(|s| s.executable)
        .map(|s| s.vaddr.wrapping_sub(s.offset - map_offset))
        .or_else(|| svma_of(segments, map_offset))
}

/// The address `segments` state for file offset `offset`.
pub fn svma_of(segments: &[LoadSegment], offset: u64) -> Option<u64> {
    segments
        .iter()
        .find(|s| offset >= s.offset && offset < s.offset + s.file_size.max(1))
        .map(|s| offset - s.offset + s.vaddr)
}

fn unpack_xz(xz: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut std::io::Cursor::new(xz), &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Build ids as text: lower-case hex, as `file` and `readelf -n` print them.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Kernel symbols from `/proc/kallsyms` (text symbols only), read once.
#[derive(Default)]
pub struct KernelSymbols {
    starts: Vec<u64>,
    names: Vec<Box<str>>,
}

impl KernelSymbols {
    pub fn read(path: &Path) -> KernelSymbols {
        let Ok(text) = std::fs::read_to_string(path) else {
            return KernelSymbols::default();
        };
        KernelSymbols::parse(&text)
    }

    pub fn parse(text: &str) -> KernelSymbols {
        let mut symbols: Vec<(u64, &str)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let address = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                (address != 0 && matches!(kind, "t" | "T" | "w" | "W")).then_some((address, name))
            })
            .collect();
        symbols.sort_unstable_by_key(|s| s.0);
        symbols.dedup_by_key(|s| s.0);
        KernelSymbols {
            starts: symbols.iter().map(|s| s.0).collect(),
            names: symbols.iter().map(|s| Box::from(s.1)).collect(),
        }
    }

    pub fn lookup(&self, address: u64) -> Option<&str> {
        let i = self.starts.partition_point(|&s| s <= address);
        self.names.get(i.checked_sub(1)?).map(|n| &**n)
    }
}

/// A JIT's perf map (`/tmp/perf-<pid>.map`: `START SIZE name` per line, in hex).
#[derive(Default)]
pub struct PerfMap {
    entries: Vec<(u64, u64, Box<str>)>,
}

impl PerfMap {
    pub fn parse(text: &str) -> PerfMap {
        let mut entries: Vec<(u64, u64, Box<str>)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ' ');
                let start = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
                let size = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
                let name = parts.next()?.trim();
                Some((start, size, Box::from(name)))
            })
            .collect();
        // A JIT may write a new entry for the same start later: the last one holds.
        let mut latest: HashMap<u64, usize> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            latest.insert(entry.0, i);
        }
        let mut keep: Vec<usize> = latest.into_values().collect();
        keep.sort_unstable();
        entries = keep.into_iter().map(|i| entries[i].clone()).collect();
        entries.sort_by_key(|e| e.0);
        PerfMap { entries }
    }

    pub fn lookup(&self, address: u64) -> Option<&str> {
        let i = self.entries.partition_point(|e| e.0 <= address);
        let (start, size, name) = self.entries.get(i.checked_sub(1)?)?;
        (address < start.saturating_add(*size)).then_some(&**name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_rust_and_cpp_and_leaves_c_alone() {
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE"),
            "core::fmt::write"
        );
        assert_eq!(demangle("_RNvCs1234_7example4main"), "example::main");
        assert_eq!(demangle("_ZN3foo3barEi"), "foo::bar(int)");
        assert_eq!(demangle("burn_leaf"), "burn_leaf");
        // A name ending in multi-byte characters where the legacy Rust hash would be (found by
        // fuzzing: a str slice inside a character panicked) is left as it is.
        let odd = "_ZN3foo\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}E";
        assert_eq!(demangle(odd), odd);
    }

    #[test]
    fn symbols_without_size_end_at_the_next_one() {
        let table = SymbolTable::build(
            vec![(0x1000, 0x10, b"sized"), (0x2000, 0, b"a"), (0x2100, 0, b"b")],
            1 << 20,
        )
        .unwrap();
        assert_eq!(table.lookup(0x100f).as_deref(), Some("sized"));
        assert_eq!(table.lookup(0x1010), None);
        assert_eq!(table.lookup(0x20ff).as_deref(), Some("a"));
        assert_eq!(table.lookup(0x2100).as_deref(), Some("b"));
        assert_eq!(table.lookup(0xfff), None);
        let over = SymbolTable::build(vec![(1, 1, b"x")], 4).unwrap_err();
        assert_eq!(over.bytes, std::mem::size_of::<SymbolEntry>() + 1);
    }

    #[test]
    fn kallsyms_and_perf_maps() {
        let kernel = KernelSymbols::parse(
            "ffffffff81000000 T _stext\nffffffff81000100 t do_thing\nffffffff82000000 D data\n",
        );
        assert_eq!(kernel.lookup(0xffffffff81000150), Some("do_thing"));
        assert_eq!(kernel.lookup(0xffffffff80000000), None);
        let map = PerfMap::parse("7f0000001000 40 LazyCompile:~hot app.js:3\n7f0000002000 10 old\n7f0000002000 20 new\n");
        assert_eq!(map.lookup(0x7f000000103f), Some("LazyCompile:~hot app.js:3"));
        assert_eq!(map.lookup(0x7f0000001040), None);
        assert_eq!(map.lookup(0x7f000000201f), Some("new"));
    }

    #[test]
    fn file_offsets_become_file_addresses_through_the_load_segments() {
        let segments = [
            LoadSegment {
                offset: 0,
                vaddr: 0x400000,
                file_size: 0x1000,
                executable: false,
            },
            LoadSegment {
                offset: 0x1000,
                vaddr: 0x401000,
                file_size: 0x5000,
                executable: true,
            },
        ];
        assert_eq!(svma_of(&segments, 0x1234), Some(0x401234));
        assert_eq!(svma_of(&segments, 0x7000), None);
        assert_eq!(mapping_svma(&segments, 0x1000), Some(0x401000));
        // As rustc links: the code segment starts mid-page, its address a page above its offset;
        // its mapping starts at the page (offset 0x16000), which is address 0x17000.
        let rust = [
            LoadSegment {
                offset: 0,
                vaddr: 0,
                file_size: 0x16950,
                executable: false,
            },
            LoadSegment {
                offset: 0x16950,
                vaddr: 0x17950,
                file_size: 0x3eff3,
                executable: true,
            },
        ];
        assert_eq!(mapping_svma(&rust, 0x16000), Some(0x17000));
        assert_eq!(svma_of(&rust, 0x16b1c), Some(0x17b1c));
    }
}
