//! The one table from the node's internal errors to gRPC status codes.
//!
//! The match is exhaustive, so a new `EngineError` variant cannot silently
//! become an `INTERNAL`. Clients get a stable code and a short message; file
//! paths, offsets and OS errors are logged here and never sent. Routers rely
//! on `FAILED_PRECONDITION` meaning exactly "the write's condition did not
//! hold" (HTTP 412), with the current version, if any, in the
//! [`CURRENT_VERSION_METADATA`] trailer.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::cluster::ChangeError;
use crate::cluster::map::Refused;
use crate::engine::EngineError;

pub use caskade_proto::metadata::{
    ACKS as ACKS_METADATA, CURRENT_VERSION as CURRENT_VERSION_METADATA,
    PRIMARY as PRIMARY_METADATA, REQUIRED_ACKS as REQUIRED_ACKS_METADATA,
    WRITTEN_VERSION as WRITTEN_VERSION_METADATA,
};

/// The status an operator's `Admin/ChangeCluster` gets for `error`: the
/// router maps ABORTED to 409, NOT_FOUND to 404, INVALID_ARGUMENT to 400
/// and an UNAVAILABLE the node chose to give to 503 `cluster_unavailable`.
pub fn change_status(error: ChangeError) -> Status {
    match error {
        ChangeError::Refused(Refused::Conflict(why)) => Status::aborted(why),
        ChangeError::Refused(refused @ Refused::NotFound(_)) => {
            Status::not_found(refused.to_string())
        }
        ChangeError::Refused(Refused::NoMap) => {
            Status::unavailable("the cluster has not formed yet")
        }
        ChangeError::Unavailable(why) => Status::unavailable(why),
        ChangeError::Invalid(why) => Status::invalid_argument(why),
    }
}

/// The status a client sees for `error`. Server-side details are logged.
pub fn engine_status(error: &EngineError) -> Status {
    match error {
        EngineError::Limit(limit) => Status::invalid_argument(limit.to_string()),
        EngineError::ConditionFailed { current } => {
            let mut status = Status::failed_precondition("condition failed");
            if let Some(version) = current
                && let Ok(value) = MetadataValue::try_from(version.to_string())
            {
                status
                    .metadata_mut()
                    .insert(CURRENT_VERSION_METADATA, value);
            }
            status
        }
        EngineError::CursorTooOld { requested, horizon } => Status::out_of_range(format!(
            "sequence {requested} is older than the tombstone horizon {horizon}; take a snapshot"
        )),
        EngineError::NotMergeable { id } => {
            Status::invalid_argument(format!("file {id} is not an immutable data file"))
        }
        EngineError::MergeUnavailable(reason) => {
            Status::unavailable(format!("merge unavailable: {reason}"))
        }
        EngineError::Corrupt { .. } => {
            tracing::error!(%error, "storage corruption");
            Status::data_loss("stored data failed its checksum")
        }
        EngineError::OutcomeUnknown(_) => {
            tracing::error!(%error, "write failed after its record was handed to the file");
            Status::unknown(
                "the write failed while it was being stored and may or may not have been",
            )
        }
        EngineError::Poisoned(_) => {
            tracing::error!(%error, "write refused by a poisoned engine");
            Status::unavailable("node refuses writes after a storage failure")
        }
        // The engine logs when its disk fills and when space comes back.
        EngineError::StorageFull { .. } => Status::resource_exhausted("node storage is full"),
        EngineError::Io { .. } => {
            tracing::error!(%error, "storage I/O error");
            Status::internal("storage I/O error")
        }
        // Start-up errors; reaching them on a request path is a bug.
        EngineError::Locked { .. } | EngineError::InvalidOptions { .. } => {
            tracing::error!(%error, "start-up error on a request path");
            Status::internal("internal error")
        }
    }
}

/// The stable label of a status code, for metrics (`OK`, `INVALID_ARGUMENT`, …).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, ErrorKind};
    use std::path::PathBuf;

    use caskade_common::{LimitError, Version};

    use super::*;

    fn io_error(kind: ErrorKind) -> EngineError {
        EngineError::Io {
            op: "write",
            path: PathBuf::from("/secret/path/0000000001.data"),
            source: io::Error::from(kind),
        }
    }

    #[test]
    fn every_variant_has_its_code_and_no_detail_leaks() {
        let cases = [
            (
                EngineError::Limit(LimitError::EmptyKey),
                Code::InvalidArgument,
            ),
            (
                EngineError::ConditionFailed { current: None },
                Code::FailedPrecondition,
            ),
            (
                EngineError::CursorTooOld {
                    requested: 1,
                    horizon: 9,
                },
                Code::OutOfRange,
            ),
            (EngineError::NotMergeable { id: 4 }, Code::InvalidArgument),
            (EngineError::MergeUnavailable("running"), Code::Unavailable),
            (
                EngineError::Corrupt {
                    file: PathBuf::from("/secret/path/x"),
                    offset: 7,
                    reason: "crc",
                },
                Code::DataLoss,
            ),
            (
                EngineError::Poisoned("fsync of /secret/path failed".into()),
                Code::Unavailable,
            ),
            (
                EngineError::StorageFull {
                    path: PathBuf::from("/secret/path/0000000001.data"),
                },
                Code::ResourceExhausted,
            ),
            (io_error(ErrorKind::PermissionDenied), Code::Internal),
            (
                EngineError::Locked {
                    dir: PathBuf::from("/secret/path"),
                },
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = engine_status(&error);
            assert_eq!(status.code(), code, "{error}");
            assert!(
                !status.message().contains("/secret"),
                "{error} leaks: {}",
                status.message()
            );
        }
    }

    #[test]
    fn a_failed_condition_carries_the_current_version() {
        let current = Version::new(42 << 16, 3);
        let status = engine_status(&EngineError::ConditionFailed {
            current: Some(current),
        });
        let sent = status
            .metadata()
            .get(CURRENT_VERSION_METADATA)
            .expect("version metadata");
        assert_eq!(sent.to_str().expect("ascii"), current.to_string());
    }
}
