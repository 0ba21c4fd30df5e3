//! Validated identifiers.
//!
//! Every identifier that becomes a subject token or a KV key (tenant, queue,
//! agent, worker id) is a newtype whose constructor validates it, so a bad id
//! is a clear error at the edge and can never become a subject. The accepted
//! alphabet is `[A-Za-z0-9_-]`, which is a strict subset of what NATS subjects
//! and KV keys allow: no `.`, `*`, `>`, whitespace or control characters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The longest tenant, queue, agent or worker name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long, the limit is {max}")]
    TooLong { kind: &'static str, len: usize, max: usize },
    #[error("{kind} {value:?} contains {found:?}; only letters, digits, '-' and '_' are allowed")]
    InvalidChar { kind: &'static str, value: String, found: char },
    #[error("run id {value:?} is not a UUID: {reason}")]
    InvalidRunId { value: String, reason: String },
    #[error("run id {value} is not a version 7 UUID")]
    NotV7 { value: String },
}

fn validate_token(kind: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::Empty { kind });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::TooLong { kind, len: value.len(), max: MAX_NAME_LEN });
    }
    if let Some(found) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(Error::InvalidChar { kind, value: value.to_owned(), found });
    }
    Ok(())
}

macro_rules! token_newtype {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                validate_token($kind, &value)?;
                Ok(Self(value))
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_newtype!(
    /// A tenant: the second token of every API and event subject.
    TenantId,
    "tenant"
);
token_newtype!(
    /// A job queue: workers serve one or more queues.
    QueueName,
    "queue"
);
token_newtype!(
    /// The name an agent is registered under in a worker.
    AgentName,
    "agent name"
);
token_newtype!(
    /// A worker's identity in the worker registry and in leases.
    WorkerId,
    "worker id"
);
token_newtype!(
    /// The key a run awaits a signal under (and the last token of the
    /// signal's KV key `<run_id>.<key>`).
    SignalKey,
    "signal key"
);

impl WorkerId {
    /// A fresh worker id: `w-` followed by a UUIDv7 in simple form.
    pub fn generate() -> Self {
        Self(format!("w-{}", Uuid::now_v7().simple()))
    }
}

impl TenantId {
    /// The tenant used when none is given.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }
}

impl QueueName {
    /// The queue used when none is given.
    pub fn default_queue() -> Self {
        Self("default".to_owned())
    }
}

/// A run's identity: a UUIDv7, so ids sort by creation time.
///
/// On the wire and in subjects it is the hyphenated lowercase form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(Uuid);

impl RunId {
    /// A fresh run id.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps a UUID, which must be version 7.
    pub fn from_uuid(uuid: Uuid) -> Result<Self, Error> {
        if uuid.get_version_num() != 7 {
            return Err(Error::NotV7 { value: uuid.to_string() });
        }
        Ok(Self(uuid))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0.hyphenated())
    }
}

impl FromStr for RunId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let uuid = Uuid::try_parse(s)
            .map_err(|e| Error::InvalidRunId { value: s.to_owned(), reason: e.to_string() })?;
        // Only the canonical hyphenated lowercase form is accepted, so that a run
        // id maps to exactly one subject.
        if uuid.hyphenated().to_string() != s {
            return Err(Error::InvalidRunId {
                value: s.to_owned(),
                reason: "expected the lowercase hyphenated form".to_owned(),
            });
        }
        Self::from_uuid(uuid)
    }
}

impl Serialize for RunId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        value.parse().map_err(serde::de::Error::custom)
    }
}

/// A client-chosen idempotency key. Any non-empty UTF-8 string up to
/// [`MAX_IDEMPOTENCY_KEY_LEN`] bytes without control characters; it never
/// becomes a subject token directly (its KV key is a hash, see
/// [`crate::names::Names::idempotency_key`]).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates `value` and wraps it.
    pub fn new(value: impl Into<String>) -> Result<Self, Error> {
        const KIND: &str = "idempotency key";
        let value = value.into();
        if value.is_empty() {
            return Err(Error::Empty { kind: KIND });
        }
        if value.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(Error::TooLong { kind: KIND, len: value.len(), max: MAX_IDEMPOTENCY_KEY_LEN });
        }
        if let Some(found) = value.chars().find(|c| c.is_control()) {
            return Err(Error::InvalidChar { kind: KIND, value, found });
        }
        Ok(Self(value))
    }

    /// The validated string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Self::new(value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_subject_breaking_names() {
        for bad in ["", "a.b", "a*", "a>", "a b", "a\tb", "a\u{0}b", "é"] {
            assert!(TenantId::new(bad).is_err(), "{bad:?} should be rejected");
            assert!(QueueName::new(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(TenantId::new("x".repeat(65)), Err(Error::TooLong { .. })));
        assert!(TenantId::new("x".repeat(64)).is_ok());
        assert!(AgentName::new("my_agent-2").is_ok());
    }

    #[test]
    fn run_id_only_accepts_canonical_v7() {
        let id = RunId::generate();
        assert_eq!(id.to_string().parse::<RunId>(), Ok(id));
        assert!(id.to_string().to_uppercase().parse::<RunId>().is_err());
        assert!(matches!("not-a-uuid".parse::<RunId>(), Err(Error::InvalidRunId { .. })));
        let v4 = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert!(matches!(v4.parse::<RunId>(), Err(Error::NotV7 { .. })));
    }

    #[test]
    fn idempotency_key_rejects_control_chars() {
        assert!(IdempotencyKey::new("order 42 / retry").is_ok());
        assert!(IdempotencyKey::new("a\nb").is_err());
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new("k".repeat(257)).is_err());
    }

    proptest! {
        #[test]
        fn valid_tokens_never_contain_subject_syntax(s in "\\PC{0,80}") {
            if let Ok(t) = TenantId::new(s.clone()) {
                prop_assert!(!t.as_str().contains(['.', '*', '>', ' ']));
                prop_assert!(!t.as_str().is_empty() && t.as_str().len() <= MAX_NAME_LEN);
            }
        }
    }
}
