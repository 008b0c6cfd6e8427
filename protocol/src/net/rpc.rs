//! The five request-response protocols of `proto/swarmtune/v1/rpc.proto`: their ids and
//! limits, and one `Request` / `Response` enum over them so that a single event stream and a
//! single `Client::respond` serve all five.

use std::fmt;

use libp2p::StreamProtocol;

use super::codec::{
    BLOB_MAX_BYTES, DELTA_MAX_BYTES, JOB_MAX_BYTES, LEASE_MAX_BYTES, ResponseMessage,
    STATUS_MAX_BYTES, WireMessage,
};
use crate::v1;

/// One of swarmtune's request-response protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// `/swarmtune/job/1`: submit a job.
    Job,
    /// `/swarmtune/lease/1`: request, renew, release a lease.
    Lease,
    /// `/swarmtune/delta/1`: deltas, challenges, verdicts.
    Delta,
    /// `/swarmtune/status/1`: versions, history, jobs.
    Status,
    /// `/swarmtune/blob/2`: blob manifests and chunks.
    Blob,
}

impl Protocol {
    /// Every protocol, in a fixed order.
    pub const ALL: [Protocol; 5] = [
        Protocol::Job,
        Protocol::Lease,
        Protocol::Delta,
        Protocol::Status,
        Protocol::Blob,
    ];

    /// The protocol id negotiated by multistream-select.
    pub const fn id(self) -> &'static str {
        match self {
            Protocol::Job => "/swarmtune/job/1",
            Protocol::Lease => "/swarmtune/lease/1",
            Protocol::Delta => "/swarmtune/delta/1",
            Protocol::Status => "/swarmtune/status/1",
            Protocol::Blob => "/swarmtune/blob/2",
        }
    }

    /// The protocol id as libp2p wants it.
    pub const fn stream_protocol(self) -> StreamProtocol {
        StreamProtocol::new(self.id())
    }

    /// The largest encoded request or response on this protocol.
    pub const fn max_bytes(self) -> usize {
        match self {
            Protocol::Job => JOB_MAX_BYTES,
            Protocol::Lease => LEASE_MAX_BYTES,
            Protocol::Delta => DELTA_MAX_BYTES,
            Protocol::Status => STATUS_MAX_BYTES,
            Protocol::Blob => BLOB_MAX_BYTES,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// A request on one of the protocols.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// On `/swarmtune/job/1`.
    Job(v1::JobRequest),
    /// On `/swarmtune/lease/1`.
    Lease(v1::LeaseRequest),
    /// On `/swarmtune/delta/1`.
    Delta(v1::DeltaRequest),
    /// On `/swarmtune/status/1`.
    Status(v1::StatusRequest),
    /// On `/swarmtune/blob/2`.
    Blob(v1::BlobRequest),
}

/// A response on one of the protocols.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// On `/swarmtune/job/1`.
    Job(v1::JobResponse),
    /// On `/swarmtune/lease/1`.
    Lease(v1::LeaseResponse),
    /// On `/swarmtune/delta/1`.
    Delta(v1::DeltaResponse),
    /// On `/swarmtune/status/1`.
    Status(v1::StatusResponse),
    /// On `/swarmtune/blob/2`.
    Blob(v1::BlobResponse),
}

impl Request {
    /// The protocol this request travels on.
    pub fn protocol(&self) -> Protocol {
        match self {
            Request::Job(_) => Protocol::Job,
            Request::Lease(_) => Protocol::Lease,
            Request::Delta(_) => Protocol::Delta,
            Request::Status(_) => Protocol::Status,
            Request::Blob(_) => Protocol::Blob,
        }
    }
}

impl Response {
    /// The protocol this response travels on.
    pub fn protocol(&self) -> Protocol {
        match self {
            Response::Job(_) => Protocol::Job,
            Response::Lease(_) => Protocol::Lease,
            Response::Delta(_) => Protocol::Delta,
            Response::Status(_) => Protocol::Status,
            Response::Blob(_) => Protocol::Blob,
        }
    }

    /// The response on `protocol` that carries only `error`.
    pub fn error(protocol: Protocol, error: v1::ErrorReply) -> Response {
        match protocol {
            Protocol::Job => Response::Job(ResponseMessage::from_error(error)),
            Protocol::Lease => Response::Lease(ResponseMessage::from_error(error)),
            Protocol::Delta => Response::Delta(ResponseMessage::from_error(error)),
            Protocol::Status => Response::Status(ResponseMessage::from_error(error)),
            Protocol::Blob => Response::Blob(ResponseMessage::from_error(error)),
        }
    }

    /// The `ErrorReply`, when the response is one.
    pub fn error_reply(&self) -> Option<&v1::ErrorReply> {
        match self {
            Response::Job(r) => r.error(),
            Response::Lease(r) => r.error(),
            Response::Delta(r) => r.error(),
            Response::Status(r) => r.error(),
            Response::Blob(r) => r.error(),
        }
    }
}

/// A request type of one protocol, tied to its response type, so that
/// `Client::request` is typed end to end.
pub trait RpcRequest: WireMessage + Into<Request> {
    /// The answer to this request.
    type Response: ResponseMessage + Into<Response> + TryFrom<Response, Error = Response>;
    /// The protocol it travels on.
    const PROTOCOL: Protocol;
    /// Whether the request has a body this build knows (an unknown `oneof` variant from a
    /// newer peer decodes as none).
    fn has_body(&self) -> bool;
}

macro_rules! rpc_pairs {
    ($($variant:ident: $request:ident => $response:ident;)*) => {$(
        impl From<v1::$request> for Request {
            fn from(r: v1::$request) -> Self {
                Request::$variant(r)
            }
        }
        impl From<v1::$response> for Response {
            fn from(r: v1::$response) -> Self {
                Response::$variant(r)
            }
        }
        impl TryFrom<Response> for v1::$response {
            type Error = Response;
            fn try_from(r: Response) -> Result<Self, Response> {
                match r {
                    Response::$variant(r) => Ok(r),
                    other => Err(other),
                }
            }
        }
        impl RpcRequest for v1::$request {
            type Response = v1::$response;
            const PROTOCOL: Protocol = Protocol::$variant;
            fn has_body(&self) -> bool {
                self.body.is_some()
            }
        }
    )*};
}

rpc_pairs! {
    Job: JobRequest => JobResponse;
    Lease: LeaseRequest => LeaseResponse;
    Delta: DeltaRequest => DeltaResponse;
    Status: StatusRequest => StatusResponse;
    Blob: BlobRequest => BlobResponse;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_ids_and_limits_match_the_contract() {
        let table: Vec<_> = Protocol::ALL
            .iter()
            .map(|p| (p.id(), p.max_bytes()))
            .collect();
        assert_eq!(
            table,
            [
                ("/swarmtune/job/1", 65_536),
                ("/swarmtune/lease/1", 65_536),
                ("/swarmtune/delta/1", 1_048_576),
                ("/swarmtune/status/1", 1_048_576),
                ("/swarmtune/blob/2", 1_114_112),
            ]
        );
    }

    #[test]
    fn an_error_response_travels_on_the_protocol_asked() {
        for p in Protocol::ALL {
            let r = Response::error(p, super::super::codec::unsupported_version_error(2));
            assert_eq!(r.protocol(), p);
            assert_eq!(
                r.error_reply().map(|e| e.code),
                Some(v1::ErrorCode::UnsupportedVersion as i32)
            );
        }
    }
}
