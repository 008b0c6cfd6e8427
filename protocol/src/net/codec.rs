//! The request-response codec: length-prefixed prost messages with a hard size limit per
//! protocol, and the version check every responder applies (see `proto/README.md`).
//!
//! A frame is an unsigned varint (LEB128, multiformats `unsigned-varint`) holding the length
//! of the encoded message, then the message. The reader checks the length against the
//! protocol's limit before it allocates or reads anything else, and reads through `take`, so a
//! peer announcing a gigabyte costs us the three bytes of its prefix. The writer refuses to
//! send more than the limit too, so we never make a peer reset a stream we opened.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use prost::Message;

use crate::v1;

pub use crate::PROTOCOL_VERSION;

/// Largest encoded `JobRequest` / `JobResponse`: 64 KiB.
pub const JOB_MAX_BYTES: usize = 64 * 1024;
/// Largest encoded `LeaseRequest` / `LeaseResponse`: 64 KiB.
pub const LEASE_MAX_BYTES: usize = 64 * 1024;
/// Largest encoded `DeltaRequest` / `DeltaResponse`: 1 MiB.
pub const DELTA_MAX_BYTES: usize = 1024 * 1024;
/// Largest encoded `StatusRequest` / `StatusResponse`: 1 MiB.
pub const STATUS_MAX_BYTES: usize = 1024 * 1024;
/// Largest encoded `BlobRequest` / `BlobResponse`: a 1 MiB chunk plus 64 KiB of framing.
pub const BLOB_MAX_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Why a frame could not be read or written, carried inside the codec's `io::Error` (see
/// [`frame_error`]).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the protocol allows.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The announced (or, when writing, the encoded) length.
        len: usize,
        /// The protocol's limit.
        max: usize,
    },
    /// The stream ended before the announced length was read.
    #[error("frame truncated: {got} of {expected} bytes")]
    Truncated {
        /// The announced length.
        expected: usize,
        /// What arrived before the end of the stream.
        got: usize,
    },
    /// Only [`Frame::Message`] can be written; the other variants exist on the read side.
    #[error("only a message frame can be written")]
    NotAMessage,
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        let kind = match e {
            FrameError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            FrameError::NotAMessage => io::ErrorKind::InvalidInput,
            FrameError::TooLarge { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// The [`FrameError`] inside an I/O error from the codec, if that is what it is.
pub fn frame_error(e: &io::Error) -> Option<&FrameError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FrameError>())
}

/// What a codec read from a peer: a message of our version, or why its bytes were refused.
/// Refusals are values rather than I/O errors so that they reach the event loop with the
/// peer's id (libp2p reports no failure of a request it could not read): it scores the peer
/// and answers with an `ErrorReply` where the contract says so.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<M> {
    /// A message whose `protocol_version` is [`PROTOCOL_VERSION`].
    Message(M),
    /// A message of another version (0 included); the rest of its bytes were not decoded.
    UnsupportedVersion(u32),
    /// Bytes within the limit that are not a valid encoding of the message, or a length
    /// prefix that is not a valid varint.
    Malformed(String),
    /// A length prefix over the limit; nothing after it was read or allocated, and the stream
    /// is reset without an answer.
    TooLarge {
        /// The length the peer announced.
        len: usize,
        /// The protocol's limit.
        max: usize,
    },
}

/// A top-level wire message: field 1 is `uint32 protocol_version`.
pub trait WireMessage: Message + Default + Send + 'static {
    /// The message's `protocol_version` field.
    fn protocol_version(&self) -> u32;
}

/// A response message: every one can carry an `ErrorReply` (field 15).
pub trait ResponseMessage: WireMessage {
    /// A response of our version carrying only `error`.
    fn from_error(error: v1::ErrorReply) -> Self;
    /// The `ErrorReply`, when the response is one.
    fn error(&self) -> Option<&v1::ErrorReply>;
}

macro_rules! wire_messages {
    ($($request:ident, $response:ident, $body:ident;)*) => {$(
        impl WireMessage for v1::$request {
            fn protocol_version(&self) -> u32 {
                self.protocol_version
            }
        }
        impl WireMessage for v1::$response {
            fn protocol_version(&self) -> u32 {
                self.protocol_version
            }
        }
        impl ResponseMessage for v1::$response {
            fn from_error(error: v1::ErrorReply) -> Self {
                Self {
                    protocol_version: PROTOCOL_VERSION,
                    body: Some(v1::$body::Body::Error(error)),
                }
            }
            fn error(&self) -> Option<&v1::ErrorReply> {
                match &self.body {
                    Some(v1::$body::Body::Error(e)) => Some(e),
                    _ => None,
                }
            }
        }
    )*};
}

wire_messages! {
    JobRequest, JobResponse, job_response;
    LeaseRequest, LeaseResponse, lease_response;
    DeltaRequest, DeltaResponse, delta_response;
    StatusRequest, StatusResponse, status_response;
    BlobRequest, BlobResponse, blob_response;
}

impl WireMessage for v1::Signed {
    fn protocol_version(&self) -> u32 {
        self.protocol_version
    }
}

/// `Ok` when `version` is the one we speak, else the `ErrorReply` a responder sends back.
pub fn check_version(version: u32) -> Result<(), v1::ErrorReply> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(unsupported_version_error(version))
    }
}

/// The `ErrorReply` (ERROR_CODE_UNSUPPORTED_VERSION) refusing a message of `version`.
pub fn unsupported_version_error(version: u32) -> v1::ErrorReply {
    v1::ErrorReply {
        code: v1::ErrorCode::UnsupportedVersion as i32,
        message: format!(
            "protocol_version {version} is not supported; this peer speaks protocol_version \
             {PROTOCOL_VERSION} (swarmtune.v1)"
        ),
        ..Default::default()
    }
}

/// The response refusing a request of `version` with ERROR_CODE_UNSUPPORTED_VERSION.
pub fn unsupported_version_reply<R: ResponseMessage>(version: u32) -> R {
    R::from_error(unsupported_version_error(version))
}

/// An `ErrorReply` with `code` and a message for people.
pub fn error_reply(code: v1::ErrorCode, message: impl Into<String>) -> v1::ErrorReply {
    v1::ErrorReply {
        code: code as i32,
        message: message.into(),
        ..Default::default()
    }
}

/// Reads one frame of at most `max` bytes. I/O errors (a truncated frame included) are
/// errors; whatever the peer got wrong is a [`Frame`] refusal.
pub async fn read_frame<M, T>(io: &mut T, max: usize) -> io::Result<Frame<M>>
where
    M: WireMessage,
    T: AsyncRead + Unpin + Send,
{
    let len = match unsigned_varint::aio::read_usize(&mut *io).await {
        Ok(len) => len,
        Err(unsigned_varint::io::ReadError::Io(e)) => return Err(e),
        Err(other) => return Ok(Frame::Malformed(format!("bad length prefix: {other}"))),
    };
    // The check comes before any allocation: `len` is the peer's claim, not a fact.
    if len > max {
        return Ok(Frame::TooLarge { len, max });
    }
    let mut buf = Vec::with_capacity(len);
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(FrameError::Truncated {
            expected: len,
            got: buf.len(),
        }
        .into());
    }
    Ok(decode_frame(&buf))
}

/// Decodes a frame's bytes: the version first (a later version may change every other
/// field), then the whole message.
pub fn decode_frame<M: WireMessage>(bytes: &[u8]) -> Frame<M> {
    let probe = match v1::VersionProbe::decode(bytes) {
        Ok(p) => p,
        Err(e) => return Frame::Malformed(e.to_string()),
    };
    if probe.protocol_version != PROTOCOL_VERSION {
        return Frame::UnsupportedVersion(probe.protocol_version);
    }
    match M::decode(bytes) {
        Ok(m) => Frame::Message(m),
        Err(e) => Frame::Malformed(e.to_string()),
    }
}

/// Writes `frame` (which must be a [`Frame::Message`]) if it fits in `max` bytes.
pub async fn write_frame<M, T>(io: &mut T, frame: &Frame<M>, max: usize) -> io::Result<()>
where
    M: WireMessage,
    T: AsyncWrite + Unpin + Send,
{
    let Frame::Message(message) = frame else {
        return Err(FrameError::NotAMessage.into());
    };
    let len = message.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max }.into());
    }
    let mut prefix = unsigned_varint::encode::usize_buffer();
    let prefix = unsigned_varint::encode::usize(len, &mut prefix);
    let mut buf = Vec::with_capacity(prefix.len() + len);
    buf.extend_from_slice(prefix);
    message
        .encode(&mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&buf).await?;
    io.flush().await
}

/// The request-response codec of one protocol: `Req` out, `Resp` back, each at most
/// `max_bytes` encoded.
pub struct ProstCodec<Req, Resp> {
    max_bytes: usize,
    // fn() keeps the codec Send + Sync whatever the message types are.
    _messages: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ProstCodec<Req, Resp> {
    /// A codec whose frames are at most `max_bytes` in both directions.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            _messages: PhantomData,
        }
    }

    /// The limit in bytes of one encoded message.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

impl<Req, Resp> Clone for ProstCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_bytes)
    }
}

impl<Req: WireMessage, Resp: WireMessage> libp2p::request_response::Codec
    for ProstCodec<Req, Resp>
{
    type Protocol = StreamProtocol;
    type Request = Frame<Req>;
    type Response = Frame<Resp>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_bytes).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame<Resp>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Frame<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &request, self.max_bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Frame<Resp>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &response, self.max_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::io::Cursor;

    use super::*;

    fn status_request(version: u32) -> v1::StatusRequest {
        v1::StatusRequest {
            protocol_version: version,
            body: Some(v1::status_request::Body::ListJobs(Default::default())),
        }
    }

    fn encode(frame: &Frame<v1::StatusRequest>, max: usize) -> io::Result<Vec<u8>> {
        let mut out = Cursor::new(Vec::new());
        futures::executor::block_on(write_frame(&mut out, frame, max))?;
        Ok(out.into_inner())
    }

    /// A reader that serves `data` and counts every byte handed out, so a test can see how far
    /// the codec read.
    struct CountingReader {
        data: Vec<u8>,
        pos: usize,
    }

    impl AsyncRead for CountingReader {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.data.len() - self.pos);
            let start = self.pos;
            buf[..n].copy_from_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_message_round_trips() {
        let request = status_request(1);
        let bytes = encode(&Frame::Message(request.clone()), STATUS_MAX_BYTES).unwrap();
        // The prefix is the varint of the body's length.
        assert_eq!(bytes[0] as usize, bytes.len() - 1);
        let back: Frame<v1::StatusRequest> =
            futures::executor::block_on(read_frame(&mut Cursor::new(bytes), STATUS_MAX_BYTES))
                .unwrap();
        assert_eq!(back, Frame::Message(request));
    }

    #[test]
    fn an_oversize_prefix_is_refused_after_reading_only_the_prefix() {
        // Announce 1 GiB, then send a little; the reader must stop after the prefix.
        let mut prefix = unsigned_varint::encode::usize_buffer();
        let prefix = unsigned_varint::encode::usize(1 << 30, &mut prefix).to_vec();
        let mut data = prefix.clone();
        data.extend_from_slice(&[0u8; 4096]);
        let mut reader = CountingReader { data, pos: 0 };
        let frame = futures::executor::block_on(read_frame::<v1::JobRequest, _>(
            &mut reader,
            JOB_MAX_BYTES,
        ))
        .unwrap();
        assert_eq!(
            frame,
            Frame::TooLarge {
                len: 1 << 30,
                max: JOB_MAX_BYTES
            }
        );
        assert_eq!(reader.pos, prefix.len(), "read past the length prefix");
    }

    #[test]
    fn one_byte_over_the_limit_is_refused_and_the_limit_itself_is_not() {
        let max = 64;
        // protocol_version = 1, then an unknown bytes field (field 9) padding to `max`, which
        // receivers skip.
        let pad = max - 4;
        let mut at_limit = vec![0x08, 0x01, 0x4a, pad as u8];
        at_limit.resize(max, 0xaa);
        let mut framed = vec![max as u8];
        framed.extend_from_slice(&at_limit);
        let ok: Frame<v1::StatusRequest> =
            futures::executor::block_on(read_frame(&mut Cursor::new(framed.clone()), max)).unwrap();
        assert!(matches!(ok, Frame::Message(_)), "{ok:?}");
        let over: Frame<v1::StatusRequest> =
            futures::executor::block_on(read_frame(&mut Cursor::new(framed), max - 1)).unwrap();
        assert_eq!(over, Frame::TooLarge { len: 64, max: 63 });
    }

    #[test]
    fn the_writer_refuses_to_send_over_the_limit() {
        let request = v1::JobRequest {
            protocol_version: 1,
            body: Some(v1::job_request::Body::SubmitJob(v1::SubmitJob {
                ..Default::default()
            })),
        };
        let len = request.encoded_len();
        let err = encode_job(&request, len - 1).unwrap_err();
        assert!(matches!(
            frame_error(&err),
            Some(FrameError::TooLarge { .. })
        ));
        assert!(encode_job(&request, len).is_ok());
    }

    fn encode_job(request: &v1::JobRequest, max: usize) -> io::Result<Vec<u8>> {
        let mut out = Cursor::new(Vec::new());
        futures::executor::block_on(write_frame(&mut out, &Frame::Message(request.clone()), max))?;
        Ok(out.into_inner())
    }

    #[test]
    fn a_truncated_frame_is_an_error() {
        let mut bytes = encode(&Frame::Message(status_request(1)), STATUS_MAX_BYTES).unwrap();
        bytes.pop();
        let err = futures::executor::block_on(read_frame::<v1::StatusRequest, _>(
            &mut Cursor::new(bytes),
            STATUS_MAX_BYTES,
        ))
        .unwrap_err();
        assert!(matches!(
            frame_error(&err),
            Some(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn a_bad_length_prefix_is_malformed() {
        // Eleven continuation bytes: no usize varint is that long.
        let bytes = vec![0xff; 11];
        let frame: Frame<v1::StatusRequest> =
            futures::executor::block_on(read_frame(&mut Cursor::new(bytes), STATUS_MAX_BYTES))
                .unwrap();
        assert!(matches!(frame, Frame::Malformed(_)), "{frame:?}");
    }

    #[test]
    fn another_version_is_reported_not_decoded() {
        for version in [0, 2, 77] {
            let bytes = encode(&Frame::Message(status_request(version)), STATUS_MAX_BYTES).unwrap();
            let frame: Frame<v1::StatusRequest> =
                futures::executor::block_on(read_frame(&mut Cursor::new(bytes), STATUS_MAX_BYTES))
                    .unwrap();
            assert_eq!(frame, Frame::UnsupportedVersion(version));
        }
    }

    #[test]
    fn garbage_within_the_limit_is_malformed() {
        let mut bytes = vec![5];
        bytes.extend_from_slice(&[0xff; 5]);
        let frame: Frame<v1::BlobRequest> =
            futures::executor::block_on(read_frame(&mut Cursor::new(bytes), BLOB_MAX_BYTES))
                .unwrap();
        assert!(matches!(frame, Frame::Malformed(_)), "{frame:?}");
    }

    #[test]
    fn the_version_refusal_names_both_versions() {
        assert!(check_version(1).is_ok());
        let reply = check_version(2).unwrap_err();
        assert_eq!(reply.code, v1::ErrorCode::UnsupportedVersion as i32);
        assert!(
            reply.message.contains("protocol_version 2"),
            "{}",
            reply.message
        );
        assert!(reply.message.contains("speaks protocol_version 1"));
        let response: v1::BlobResponse = unsupported_version_reply(0);
        assert_eq!(response.protocol_version, PROTOCOL_VERSION);
        assert_eq!(response.error().map(|e| e.code), Some(reply.code));
    }

    #[test]
    fn only_message_frames_are_written() {
        let err = encode(&Frame::UnsupportedVersion(3), STATUS_MAX_BYTES).unwrap_err();
        assert_eq!(frame_error(&err), Some(&FrameError::NotAMessage));
    }
}
