//! HTTP/2 as the kernel captured it: one byte stream per direction of a connection, cut into
//! frames, HEADERS (and CONTINUATION) blocks decoded with HPACK (each direction keeps its
//! dynamic table, so every header block of the connection must be seen in order). DATA and
//! other frames are skipped, also when only their start was captured: the event says how many
//! bytes the call carried. Losing bytes inside a frame header or a header block loses the
//! direction for good (its requests give no spans; counted as not parsed).
//!
//! Pure: bytes in, decoded header blocks out.

use std::borrow::Cow;

/// The client's connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// A header block larger than this is not followed (and the direction is given up).
const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// What a direction's bytes said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    /// A complete header block of a stream: its headers (name, value).
    Headers {
        stream: u32,
        headers: Vec<(String, String)>,
        end_stream: bool,
    },
    /// The stream was reset (no response will come).
    Reset { stream: u32 },
}

#[derive(Debug)]
enum State {
    /// Reading a frame header (bytes so far in `pending`).
    Header,
    /// Reading a header block fragment's frame payload (`pending` holds it so far).
    Payload { kind: u8, flags: u8, stream: u32, len: usize },
    /// Skipping this many payload bytes.
    Skip(usize),
}

/// One direction of an HTTP/2 connection.
pub struct Direction {
    preface_left: usize,
    state: State,
    pending: Vec<u8>,
    /// A header block continued by CONTINUATION frames: stream, END_STREAM, fragments so far.
    block: Option<(u32, bool, Vec<u8>)>,
    decoder: loona_hpack::Decoder<'static>,
    broken: bool,
}

impl Direction {
    /// A direction that starts with the client preface (client to server), or not.
    pub fn new(with_preface: bool) -> Direction {
        Direction {
            preface_left: if with_preface { PREFACE.len() } else { 0 },
            state: State::Header,
            pending: Vec::new(),
            block: None,
            decoder: loona_hpack::Decoder::new(),
            broken: false,
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Takes one call's bytes: `data` captured of `total` (the rest was not captured). Returns
    /// what complete frames said; `Err` once the direction is lost (this call or before).
    pub fn feed(&mut self, data: &[u8], total: usize) -> Result<Vec<FrameEvent>, ()> {
        if self.broken {
            return Err(());
        }
        let mut out = Vec::new();
        let mut input = data;
        if self.preface_left > 0 {
            let n = self.preface_left.min(input.len());
            if input[..n] != PREFACE[PREFACE.len() - self.preface_left..][..n] {
                return self.fail();
            }
            self.preface_left -= n;
            input = &input[n..];
        }
        while !input.is_empty() {
            match self.state {
                State::Skip(left) => {
                    let n = left.min(input.len());
                    input = &input[n..];
                    self.state = if left == n { State::Header } else { State::Skip(left - n) };
                }
                State::Header => {
                    let n = (FRAME_HEADER - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.pending.len() == FRAME_HEADER {
                        let h = std::mem::take(&mut self.pending);
                        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                        let (kind, flags) = (h[3], h[4]);
                        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                        if self.block.is_some() && kind != CONTINUATION {
                            return self.fail();
                        }
                        match kind {
                            HEADERS | CONTINUATION if len > MAX_HEADER_BLOCK => return self.fail(),
                            HEADERS | CONTINUATION | RST_STREAM => {
                                self.state = State::Payload { kind, flags, stream, len };
                                if len == 0 {
                                    self.payload_done(&mut out)?;
                                }
                            }
                            _ => {
                                if kind == DATA && flags & END_STREAM != 0 {
                                    // A request or response ended by its data: nothing to read.
                                }
                                self.state = if len == 0 { State::Header } else { State::Skip(len) };
                            }
                        }
                    }
                }
                State::Payload { len, .. } => {
                    let n = (len - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.pending.len() == len {
                        self.payload_done(&mut out)?;
                    }
                }
            }
        }
        let missing = total.saturating_sub(data.len());
        if missing > 0 {
            match self.state {
                State::Skip(left) if left >= missing => {
                    self.state = if left == missing { State::Header } else { State::Skip(left - missing) };
                }
                _ => return self.fail(),
            }
        }
        Ok(out)
    }

    fn fail<T>(&mut self) -> Result<T, ()> {
        self.broken = true;
        self.pending = Vec::new();
        self.block = None;
        Err(())
    }

    /// A HEADERS, CONTINUATION or RST_STREAM payload is complete in `pending`.
    fn payload_done(&mut self, out: &mut Vec<FrameEvent>) -> Result<(), ()> {
        let State::Payload { kind, flags, stream, .. } = self.state else {
            return Ok(());
        };
        self.state = State::Header;
        let payload = std::mem::take(&mut self.pending);
        match kind {
            RST_STREAM => out.push(FrameEvent::Reset { stream }),
            HEADERS => {
                let mut start = 0;
                let mut end = payload.len();
                if flags & PADDED != 0 {
                    let Some(&pad) = payload.first() else {
                        return self.fail();
                    };
                    start += 1;
                    end = end.checked_sub(usize::from(pad)).ok_or(())?;
                }
                if flags & PRIORITY != 0 {
                    start += 5;
                }
                if start > end {
                    return self.fail();
                }
                let fragment = payload[start..end].to_vec();
                let end_stream = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    self.decode(stream, end_stream, &fragment, out)?;
                } else {
                    self.block = Some((stream, end_stream, fragment));
                }
            }
            CONTINUATION => {
                let Some((block_stream, end_stream, mut fragment)) = self.block.take() else {
                    return self.fail();
                };
                if block_stream != stream || fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                    return self.fail();
                }
                fragment.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    self.decode(stream, end_stream, &fragment, out)?;
                } else {
                    self.block = Some((stream, end_stream, fragment));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn decode(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: &[u8],
        out: &mut Vec<FrameEvent>,
    ) -> Result<(), ()> {
        let mut headers = Vec::new();
        let decoded = self.decoder.decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
            headers.push((
                String::from_utf8_lossy(&name).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        });
        if decoded.is_err() {
            return self.fail();
        }
        out.push(FrameEvent::Headers {
            stream,
            headers,
            end_stream,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn a_grpc_request_split_anywhere_gives_its_headers_once() {
        let request = block(&[(":method", "POST"), (":path", "/shop.Cart/Add"), ("content-type", "application/grpc")]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &request));
        bytes.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 2, 8, 1]));
        for cut in 0..bytes.len() {
            let mut d = Direction::new(true);
            let mut events = d.feed(&bytes[..cut], cut).unwrap();
            events.extend(d.feed(&bytes[cut..], bytes.len() - cut).unwrap());
            assert_eq!(
                events,
                [FrameEvent::Headers {
                    stream: 1,
                    headers: vec![
                        (":method".into(), "POST".into()),
                        (":path".into(), "/shop.Cart/Add".into()),
                        ("content-type".into(), "application/grpc".into()),
                    ],
                    end_stream: false
                }],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn uncaptured_data_is_skipped_but_a_lost_header_block_breaks_the_direction() {
        let trailers = block(&[("grpc-status", "5")]);
        let mut bytes = frame(DATA, 0, 3, &vec![7u8; 5000]);
        let captured = 100;
        let mut d = Direction::new(false);
        assert_eq!(d.feed(&bytes[..captured], bytes.len()).unwrap(), []);
        let t = frame(HEADERS, END_HEADERS | END_STREAM, 3, &trailers);
        assert_eq!(
            d.feed(&t, t.len()).unwrap(),
            [FrameEvent::Headers {
                stream: 3,
                headers: vec![("grpc-status".into(), "5".into())],
                end_stream: true
            }]
        );
        // Trailers beyond the capture in the same call: lost, and with them the HPACK state.
        bytes.extend(t);
        let mut d = Direction::new(false);
        assert!(d.feed(&bytes[..captured], bytes.len()).is_err());
        assert!(d.is_broken());
        assert!(d.feed(&[], 0).is_err());
    }

    #[test]
    fn continuation_frames_and_garbage() {
        let request = block(&[(":method", "GET"), (":path", "/x")]);
        let (a, b) = request.split_at(3);
        let mut bytes = frame(HEADERS, 0, 5, a);
        bytes.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let mut d = Direction::new(false);
        let events = d.feed(&bytes, bytes.len()).unwrap();
        assert!(matches!(&events[..], [FrameEvent::Headers { stream: 5, .. }]));
        let mut d = Direction::new(true);
        assert!(d.feed(b"GET / HTTP/1.1\r\n\r\n", 18).is_err());
        let mut d = Direction::new(false);
        assert!(d.feed(&frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]), 13).is_err());
    }
}
