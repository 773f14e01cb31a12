//! podscope processors. Each folder is one component: its config, its runtime and its tests.
//!
//! - `batch`: groups data into batches sized in data points / spans, with a timeout.

pub mod batch;
