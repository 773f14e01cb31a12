//! W3C trace context: the `traceparent` header, span and trace ids, and the sampling decision
//! (on the trace id, as OpenTelemetry's ratio sampler makes it, so every span of a trace is
//! kept or dropped together).

use rand::{Rng as _, SeedableRng as _};

/// A span's identity and its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
}

/// A parsed `traceparent`: `00-<trace id>-<parent id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TraceParent {
    /// Version 00 exactly, or a later version's first four fields; all-zero ids and version ff
    /// are invalid (W3C Trace Context, level 1).
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut fields = header.trim().split('-');
        let version = fields.next()?;
        let (trace, parent, flags) = (fields.next()?, fields.next()?, fields.next()?);
        if version.len() != 2 || version.eq_ignore_ascii_case("ff") || hex::<1>(version).is_none() {
            return None;
        }
        if version == "00" && fields.next().is_some() {
            return None;
        }
        hex::<1>(flags)?;
        let trace_id = hex::<16>(trace)?;
        let parent_id = hex::<8>(parent)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
        })
    }
}

/// Random span and trace ids.
pub struct IdGenerator(rand::rngs::SmallRng);

impl IdGenerator {
    pub fn new() -> IdGenerator {
        IdGenerator(rand::rngs::SmallRng::from_os_rng())
    }

    pub fn span_id(&mut self) -> [u8; 8] {
        loop {
            let id: [u8; 8] = self.0.random();
            if id != [0; 8] {
                return id;
            }
        }
    }

    pub fn trace_id(&mut self) -> [u8; 16] {
        loop {
            let id: [u8; 16] = self.0.random();
            if id != [0; 16] {
                return id;
            }
        }
    }
}

/// Keeps a trace when the last 8 bytes of its id, as a number, fall below `ratio` of their
/// range.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    bound: u64,
    all: bool,
}

impl Sampler {
    pub fn new(ratio: f64) -> Sampler {
        Sampler {
            bound: (ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
            all: ratio >= 1.0,
        }
    }

    pub fn keeps(&self, trace_id: &[u8; 16]) -> bool {
        if self.all {
            return true;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        u64::from_be_bytes(low) < self.bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_as_the_w3c_spec_says() {
        let p = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(p.trace_id[0], 0x0a);
        assert_eq!(p.parent_id, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may append fields.
        assert!(TraceParent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x").is_some());
    }

    #[test]
    fn the_sampler_decides_on_the_trace_id() {
        let mut low = [0u8; 16];
        low[15] = 1;
        let mut high = [0xffu8; 16];
        high[0] = 1;
        assert!(Sampler::new(0.5).keeps(&low));
        assert!(!Sampler::new(0.5).keeps(&high));
        assert!(!Sampler::new(0.0).keeps(&low));
        assert!(Sampler::new(1.0).keeps(&high));
    }
}
