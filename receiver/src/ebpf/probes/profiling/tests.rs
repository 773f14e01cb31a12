//! Symbolization against real binaries built here (no root, no kernel): the symbol cache's
//! least-recently-used eviction under a budget two binaries do not fit in, and the count of
//! frames left without a name.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use podscope_integration::test_programs::{compile_c, BURN_C};

use super::elf::ElfModule;
use super::modules::{FileIdentity, ModuleCache, ModuleId, SymbolsState};
use super::stacks::Frame;
use super::symbolize::Symbolizer;

/// BURN_C built with `-O2 -fomit-frame-pointer`, plus `extra` source (so two builds are two
/// binaries with two build ids).
fn burn(dir: &Path, name: &str, extra: &str) -> PathBuf {
    compile_c(
        dir,
        name,
        &format!("{BURN_C}\n{extra}\n"),
        &["-O2", "-fomit-frame-pointer"],
    )
}

/// The file offset of `function`'s second byte in `binary` (from its symbol table).
fn offset_of(binary: &Path, function: &str) -> u64 {
    let out = Command::new("nm").arg(binary).output().expect("nm runs");
    let svma = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?;
            let _kind = fields.next()?;
            (fields.next()? == function).then(|| u64::from_str_radix(address, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{function} in {}", binary.display()));
    let elf = ElfModule::read(binary, usize::MAX).unwrap();
    let segment = elf
        .segments
        .iter()
        .find(|s| s.executable && (s.vaddr..s.vaddr + s.file_size).contains(&svma))
        .expect("an executable segment holds it");
    svma - segment.vaddr + segment.offset + 1
}

/// Bytes `binary`'s symbol and unwind tables take in the cache.
fn table_bytes(binary: &Path) -> usize {
    let elf = ElfModule::read(binary, usize::MAX).unwrap();
    elf.symbols.bytes() + elf.unwind.as_ref().map_or(0, |u| u.bytes())
}

/// `binary` as this process would find a mapping of it (its own root under `/proc`).
fn module(cache: &mut ModuleCache, binary: &Path) -> ModuleId {
    let meta = std::fs::metadata(binary).unwrap();
    cache.module_for(
        Path::new("/proc"),
        std::process::id(),
        FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
        },
        (0, 0),
        binary.to_str().unwrap(),
    )
}

fn name_of(
    names: &std::collections::HashMap<Frame, super::symbolize::NamedFrame>,
    frame: &Frame,
) -> Option<String> {
    names[frame].function.clone()
}

#[test]
fn a_budget_two_binaries_do_not_fit_evicts_the_least_recently_used_and_names_stay_right() {
    let dir = tempfile::tempdir().unwrap();
    let first = burn(dir.path(), "first", "const char *variant = \"first\";");
    let second = burn(dir.path(), "second", "const char *variant = \"second\";");
    let (a, b) = (table_bytes(&first), table_bytes(&second));
    // Each fits alone, not both.
    let budget = a.max(b) + a.min(b) / 2;
    let mut cache = ModuleCache::new(budget);
    let first_id = module(&mut cache, &first);
    assert_eq!((cache.evictions(), cache.held_bytes()), (0, a));
    let second_id = module(&mut cache, &second);
    assert_eq!(cache.evictions(), 1, "the first binary made room");
    assert_eq!(
        cache.get(first_id).unwrap().symbols_state,
        SymbolsState::Evicted
    );
    assert_eq!(cache.held_bytes(), b);

    // Naming frames of both reads each back in turn: two more evictions, every name right.
    let frames = [
        Frame::User {
            module: first_id,
            offset: offset_of(&first, "burn_leaf"),
        },
        Frame::User {
            module: second_id,
            offset: offset_of(&second, "middle_step"),
        },
    ];
    let mut symbolizer = Symbolizer::new(PathBuf::from("/proc"));
    let names = symbolizer.name_all(&mut cache, frames.iter());
    assert_eq!(name_of(&names, &frames[0]).as_deref(), Some("burn_leaf"));
    assert_eq!(name_of(&names, &frames[1]).as_deref(), Some("middle_step"));
    assert_eq!(cache.evictions(), 3);
    assert_eq!(symbolizer.unsymbolized, 0);
    assert!(cache.held_bytes() <= budget);
}

#[test]
fn frames_without_a_name_are_counted_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let plain = burn(dir.path(), "plain", "");
    let stripped = dir.path().join("stripped");
    let status = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&stripped)
        .arg(&plain)
        .status()
        .expect("strip runs");
    assert!(status.success());
    // Another binary (another build id: the plain one would lend the stripped copy its names).
    let named = burn(dir.path(), "named", "const char *variant = \"named\";");
    let mut cache = ModuleCache::new(64 << 20);
    let stripped_id = module(&mut cache, &stripped);
    let named_id = module(&mut cache, &named);
    let in_stripped = |function: &str| Frame::User {
        module: stripped_id,
        // The stripped copy has the same layout: the plain one says where.
        offset: offset_of(&plain, function),
    };
    let frames = [
        in_stripped("burn_leaf"),
        in_stripped("inner_work"),
        in_stripped("main"),
        in_stripped("burn_leaf"),
        Frame::User {
            module: named_id,
            offset: offset_of(&named, "burn_leaf"),
        },
        Frame::Unknown { address: 0x1234 },
    ];
    let mut symbolizer = Symbolizer::new(PathBuf::from("/proc"));
    let names = symbolizer.name_all(&mut cache, frames.iter());
    // Three distinct frames of the stripped binary and the unknown one; the repeated frame
    // once; the named binary's frame has its name.
    assert_eq!(symbolizer.unsymbolized, 4);
    assert_eq!(name_of(&names, &frames[4]).as_deref(), Some("burn_leaf"));
    assert_eq!(names[&frames[0]].address, offset_of(&plain, "burn_leaf"));
    // The next interval with the same frames counts them again.
    symbolizer.name_all(&mut cache, frames.iter());
    assert_eq!(symbolizer.unsymbolized, 8);
}
