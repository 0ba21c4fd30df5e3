//! Idempotency records, the values in the `<prefix>-idempotency` KV bucket
//! (key from [`crate::names::Names::idempotency_key`]).
//!
//! The first submit with a key creates the record (KV `create`); a retried
//! submit finds it and, if its request fingerprint matches, answers with the
//! same run. The record carries everything needed to re-publish the run's
//! `run.created` event and job byte for byte, so a submitter that crashed
//! between creating the record and publishing is repaired by the retry.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::ValidSubmit;
use crate::codec;
use crate::ids::RunId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub run_id: RunId,
    /// [`fingerprint`] of the request that created the run.
    pub fingerprint: String,
    /// The run's creation time, ms since the Unix epoch (`run.created` `ts_ms`).
    pub created_ms: i64,
    /// The run's creation time, µs since the Unix epoch (the job's `created_us`).
    pub created_us: i64,
}

/// The lowercase hex SHA-256 of the canonical encoding of what defines a
/// run: agent, input, queue, priority and max_attempts. JSON object keys are
/// sorted, so two equal requests always have the same fingerprint.
pub fn fingerprint(submit: &ValidSubmit) -> Result<String, codec::Error> {
    let canonical =
        codec::encode(&(&submit.agent, &submit.input, &submit.queue, submit.priority, submit.max_attempts))?;
    Ok(hex::encode(Sha256::digest(&canonical)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SubmitRequest;

    fn submit(input: serde_json::Value, priority: Option<u8>) -> ValidSubmit {
        SubmitRequest {
            agent: "echo".into(),
            input,
            queue: None,
            priority,
            idempotency_key: Some("k".into()),
            max_attempts: None,
        }
        .validate(1024, 3)
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn fingerprint_is_canonical_and_sensitive() {
        let a = fingerprint(&submit(serde_json::json!({"a": 1, "b": 2}), None));
        let b = fingerprint(&submit(serde_json::json!({"b": 2, "a": 1}), None));
        let c = fingerprint(&submit(serde_json::json!({"a": 1, "b": 3}), None));
        let d = fingerprint(&submit(serde_json::json!({"a": 1, "b": 2}), Some(0)));
        assert_eq!(a.as_ref().ok(), b.as_ref().ok());
        assert_ne!(a.as_ref().ok(), c.as_ref().ok());
        assert_ne!(a.as_ref().ok(), d.as_ref().ok());
    }
}
