//! Giving freed heap back to the kernel.
//!
//! glibc's allocator keeps memory the agent has freed: a free chunk in the middle of an arena
//! stays resident until the program asks for it with `malloc_trim`. The soak (BENCHMARKS.md,
//! issue 17) found most of the agent's anonymous RSS growth to be such memory, and RSS is what
//! the memory_limiter and a container's memory limit count. This module only asks the allocator;
//! when to ask is the limiter's policy (`MemoryLimiter::check`).

/// The allocator's freed heap: how much it holds, and a way to give it back.
pub trait FreeHeap: Send + Sync {
    /// Bytes the allocator holds in free chunks (resident or not); `None` when it cannot say.
    fn free_bytes(&self) -> Option<u64>;
    /// Returns whole free pages to the kernel.
    fn trim(&self);
}

/// glibc's allocator, the one the agent runs with (its image is Debian's distroless `cc`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub struct GlibcHeap;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl FreeHeap for GlibcHeap {
    fn free_bytes(&self) -> Option<u64> {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct; it locks each arena
        // while it walks its free lists.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks as u64)
    }

    fn trim(&self) {
        // SAFETY: malloc_trim takes the amount of top padding to keep; 0 releases every whole
        // free page of every arena (madvise on the pages inside free chunks, not only the top).
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// The process's allocator, when it can trim.
pub fn process_heap() -> Option<std::sync::Arc<dyn FreeHeap>> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        Some(std::sync::Arc::new(GlibcHeap))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}
