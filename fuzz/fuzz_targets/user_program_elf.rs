#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| podscope_fuzz::user_program_elf(data));
