//! The server side of SPDY/3.1 as `kubectl port-forward` speaks it to the kubelet (through the
//! API server): the client opens two streams per forwarded connection, `streamType: error` and
//! `streamType: data`, with the pod's `port` and a shared `requestID`; the server replies to
//! each, copies the data stream to and from that port of the pod, writes a failure to the error
//! stream, and ends both when the pod's side closes.
//!
//! Only what that exchange uses is implemented: SYN_STREAM, SYN_REPLY, DATA (with FIN),
//! RST_STREAM, PING (echoed), GOAWAY; SETTINGS and WINDOW_UPDATE are read and ignored (the Go
//! client does not wait on flow-control windows). Header blocks are zlib streams primed with the
//! SPDY/3 dictionary, one compression context per direction.

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use super::portforward::PodAddress;

/// The SPDY/3 header compression dictionary (a constant of the protocol, section 2.6.10.1 of
/// the SPDY/3 draft; 1423 bytes, Adler-32 0xe3c6a7c2).
const DICTIONARY: &[u8] = include_bytes!("spdy3_dictionary.bin");

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;

/// A SPDY byte stream as two channels of chunks, whatever carries it.
pub(super) struct Wire {
    incoming: mpsc::Receiver<Bytes>,
    outgoing: mpsc::Sender<Bytes>,
}

/// SPDY carried in websocket binary messages (kubectl's default since 1.31).
pub(super) fn websocket_bytes<S>(socket: WebSocketStream<S>) -> Wire
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = socket.split();
    let (in_sender, incoming) = mpsc::channel(64);
    let (outgoing, mut out_receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let bytes = match message {
                WsMessage::Binary(bytes) => bytes,
                WsMessage::Close(_) => return,
                _ => continue,
            };
            if in_sender.send(bytes).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(bytes) = out_receiver.recv().await {
            if sink.send(WsMessage::Binary(bytes)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(WsMessage::Close(None)).await;
    });
    Wire { incoming, outgoing }
}

/// SPDY directly on the upgraded connection (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`).
pub(super) fn stream_bytes<S>(io: S) -> Wire
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let (in_sender, incoming) = mpsc::channel(64);
    let (outgoing, mut out_receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => {
                    if in_sender
                        .send(Bytes::copy_from_slice(&buffer[..read]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(bytes) = out_receiver.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    Wire { incoming, outgoing }
}

/// One forwarded connection's two streams, as they are opened.
#[derive(Default)]
struct Request {
    port: u16,
    error_stream: Option<u32>,
    data_stream: Option<u32>,
    started: bool,
}

/// Serves one SPDY connection until the client goes away.
pub(super) async fn serve(mut wire: Wire, pod: PodAddress) {
    let mut buffer = BytesMut::new();
    let mut inflate = Decompress::new(true);
    let mut deflate = Compress::new(Compression::default(), true);
    if deflate.set_dictionary(DICTIONARY).is_err() {
        return;
    }
    let mut requests: HashMap<String, Request> = HashMap::new();
    // Data stream id → the pod connection's writer.
    let mut writers: HashMap<u32, mpsc::Sender<Option<Bytes>>> = HashMap::new();
    while let Some(chunk) = wire.incoming.recv().await {
        buffer.extend_from_slice(&chunk);
        while buffer.len() >= 8 {
            let length = (usize::from(buffer[5]) << 16)
                | (usize::from(buffer[6]) << 8)
                | usize::from(buffer[7]);
            if buffer.len() < 8 + length {
                break;
            }
            let header = buffer.split_to(8);
            let payload = buffer.split_to(length).freeze();
            let flags = header[4];
            if header[0] & 0x80 == 0 {
                // DATA: to the pod's port, or the end of what the client sends.
                let stream =
                    u32::from_be_bytes([header[0], header[1], header[2], header[3]]) & 0x7fff_ffff;
                if let Some(writer) = writers.get(&stream) {
                    if !payload.is_empty() {
                        let _ = writer.send(Some(payload)).await;
                    }
                    if flags & FLAG_FIN != 0 {
                        let _ = writer.send(None).await;
                        writers.remove(&stream);
                    }
                }
                continue;
            }
            let kind = u16::from_be_bytes([header[2], header[3]]);
            match kind {
                SYN_STREAM if payload.len() >= 10 => {
                    let stream =
                        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            & 0x7fff_ffff;
                    let Some(headers) = inflate_headers(&mut inflate, &payload[10..]) else {
                        return;
                    };
                    let reply = {
                        let mut body = stream.to_be_bytes().to_vec();
                        match deflate_headers(&mut deflate, &[]) {
                            Some(block) => body.extend_from_slice(&block),
                            None => return,
                        }
                        control(SYN_REPLY, 0, &body)
                    };
                    if wire.outgoing.send(reply).await.is_err() {
                        return;
                    }
                    let value = |name: &str| headers.get(name).cloned().unwrap_or_default();
                    let request = requests.entry(value("requestid")).or_default();
                    request.port = value("port").parse().unwrap_or(0);
                    match value("streamtype").as_str() {
                        "error" => request.error_stream = Some(stream),
                        "data" => request.data_stream = Some(stream),
                        _ => {}
                    }
                    if let (Some(error_stream), Some(data_stream), false) =
                        (request.error_stream, request.data_stream, request.started)
                    {
                        request.started = true;
                        let (sender, receiver) = mpsc::channel(64);
                        writers.insert(data_stream, sender);
                        tokio::spawn(forward(
                            pod.clone(),
                            request.port,
                            data_stream,
                            error_stream,
                            receiver,
                            wire.outgoing.clone(),
                        ));
                    }
                }
                RST_STREAM if payload.len() >= 4 => {
                    let stream =
                        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            & 0x7fff_ffff;
                    if let Some(writer) = writers.remove(&stream) {
                        let _ = writer.send(None).await;
                    }
                }
                PING if wire
                    .outgoing
                    .send(control(PING, 0, &payload))
                    .await
                    .is_err() =>
                {
                    return
                }
                GOAWAY => return,
                // SETTINGS, WINDOW_UPDATE, HEADERS, NOOP: nothing to do here.
                _ => {}
            }
        }
    }
}

/// Copies between the client's data stream and `port` of the pod; a failure to connect goes
/// to the error stream. Both streams end when the pod closes the connection.
async fn forward(
    pod: PodAddress,
    port: u16,
    data_stream: u32,
    error_stream: u32,
    mut from_client: mpsc::Receiver<Option<Bytes>>,
    to_client: mpsc::Sender<Bytes>,
) {
    let connection = match pod.connect(port).await {
        Ok(connection) => connection,
        Err(message) => {
            let _ = to_client
                .send(data(error_stream, 0, message.as_bytes()))
                .await;
            let _ = to_client.send(data(error_stream, FLAG_FIN, &[])).await;
            let _ = to_client.send(data(data_stream, FLAG_FIN, &[])).await;
            return;
        }
    };
    let (mut reader, mut writer) = connection.into_split();
    tokio::spawn(async move {
        while let Some(Some(bytes)) = from_client.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                if to_client
                    .send(data(data_stream, 0, &buffer[..read]))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = to_client.send(data(data_stream, FLAG_FIN, &[])).await;
    let _ = to_client.send(data(error_stream, FLAG_FIN, &[])).await;
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&[0x80, 0x03]);
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

fn data(stream: u32, flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// A header block: the client's context continues across frames; its first block asks for the
/// dictionary.
fn inflate_headers(inflate: &mut Decompress, mut block: &[u8]) -> Option<HashMap<String, String>> {
    let mut plain = Vec::with_capacity(4096);
    while !block.is_empty() {
        let before = inflate.total_in();
        plain.reserve(4096);
        let result = inflate.decompress_vec(block, &mut plain, FlushDecompress::Sync);
        let used = (inflate.total_in() - before) as usize;
        block = &block[used..];
        match result {
            Ok(_) if used == 0 && plain.capacity() > plain.len() => break,
            Ok(_) => {}
            Err(error) if error.needs_dictionary().is_some() => {
                inflate.set_dictionary(DICTIONARY).ok()?;
            }
            Err(_) => return None,
        }
    }
    let mut plain = Bytes::from(plain);
    let mut headers = HashMap::new();
    if plain.remaining() < 4 {
        return None;
    }
    let count = plain.get_u32();
    for _ in 0..count {
        let mut text = || -> Option<String> {
            if plain.remaining() < 4 {
                return None;
            }
            let length = plain.get_u32() as usize;
            if plain.remaining() < length {
                return None;
            }
            Some(String::from_utf8_lossy(&plain.split_to(length)).into_owned())
        };
        let name = text()?;
        let value = text()?;
        headers.insert(name.to_ascii_lowercase(), value);
    }
    Some(headers)
}

fn deflate_headers(deflate: &mut Compress, pairs: &[(&str, &str)]) -> Option<Vec<u8>> {
    let mut plain = (pairs.len() as u32).to_be_bytes().to_vec();
    for (name, value) in pairs {
        for text in [name, value] {
            plain.extend_from_slice(&(text.len() as u32).to_be_bytes());
            plain.extend_from_slice(text.as_bytes());
        }
    }
    let mut block = Vec::with_capacity(plain.len() + 64);
    let mut input = &plain[..];
    loop {
        block.reserve(256);
        let before = deflate.total_in();
        deflate
            .compress_vec(input, &mut block, FlushCompress::Sync)
            .ok()?;
        input = &input[(deflate.total_in() - before) as usize..];
        // A sync flush is complete once the output buffer was not filled up.
        if input.is_empty() && block.len() < block.capacity() {
            return Some(block);
        }
    }
}
