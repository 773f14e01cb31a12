#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| podscope_fuzz::elf_symbols(data));
