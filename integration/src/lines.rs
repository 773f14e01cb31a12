//! A child's output read line by line on a thread of its own, so that a test can wait for a
//! line with a deadline (`recv_timeout`) instead of blocking on the pipe.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;

/// The lines of `output` (a child's stdout or stderr) as they come; the channel closes when
/// the output ends, and the thread stops when the receiver is dropped.
pub fn lines_of(output: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    lines
}
