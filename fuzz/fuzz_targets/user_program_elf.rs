#![no_main]

use std::cell::RefCell;

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

// `programs::inspect` turns a panic of aya-obj's object parser into the object's error, as the
// agent runs it; libfuzzer-sys's panic hook would abort the process at that panic before the
// agent's `catch_unwind` sees it, so the fuzzer could not go past the parser's known panics. Here
// a panic only records its message; one that reaches this target uncaught is printed and goes on
// to libfuzzer-sys, which aborts: that is a crash, as before.
libfuzzer_sys::fuzz_target!(
    init: std::panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|last| *last.borrow_mut() = Some(info.to_string()));
    })),
    |data: &[u8]| {
        if let Err(panic) = std::panic::catch_unwind(|| podscope_fuzz::user_program_elf(data)) {
            LAST_PANIC.with(|last| eprintln!("{}", last.borrow().as_deref().unwrap_or("a panic")));
            std::panic::resume_unwind(panic);
        }
    }
);
