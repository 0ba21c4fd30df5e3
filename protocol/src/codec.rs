//! The versioned MessagePack envelope.
//!
//! Every runfleet payload is `{"v": 1, "data": <T>}` encoded as MessagePack
//! with named fields (maps, not arrays), so any language's msgpack decoder
//! reads it. Messages carry [`CONTENT_TYPE`] in the `Content-Type` header.

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

/// The envelope version this crate writes and reads.
pub const PROTOCOL_VERSION: u16 = 1;

/// The `Content-Type` header value of every runfleet payload.
pub const CONTENT_TYPE: &str = "application/vnd.runfleet+msgpack; v=1";

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("payload is not a valid runfleet message: {0}")]
    Decode(String),
    #[error("payload could not be encoded: {0}")]
    Encode(String),
    #[error("payload has envelope version {found}, this build understands version {supported}")]
    UnsupportedVersion { found: u16, supported: u16 },
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u16,
    data: &'a T,
}

#[derive(Deserialize)]
struct Envelope<T> {
    v: u16,
    data: T,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u16,
    #[allow(dead_code)]
    data: IgnoredAny,
}

/// Encodes `value` in the current envelope.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(&EnvelopeRef { v: PROTOCOL_VERSION, data: value })
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes an envelope. A newer peer's message is reported as such rather
/// than as garbage: the version is checked whether or not the data decoded
/// (probed again only when it did not, so a valid message is parsed once).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    decode_as(PROTOCOL_VERSION, bytes)
}

/// Encodes `value` in an envelope of another version than
/// [`PROTOCOL_VERSION`]: a message older readers must refuse rather than
/// misread (see [`crate::event::encode_log_message`]).
pub fn encode_as<T: Serialize>(version: u16, value: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(&EnvelopeRef { v: version, data: value })
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes an envelope of exactly `version`; any other version is
/// [`Error::UnsupportedVersion`].
pub fn decode_as<T: DeserializeOwned>(version: u16, bytes: &[u8]) -> Result<T, Error> {
    match rmp_serde::from_slice::<Envelope<T>>(bytes) {
        Ok(envelope) if envelope.v == version => Ok(envelope.data),
        Ok(envelope) => Err(Error::UnsupportedVersion { found: envelope.v, supported: version }),
        Err(error) => match rmp_serde::from_slice::<VersionProbe>(bytes) {
            Ok(probe) if probe.v != version => {
                Err(Error::UnsupportedVersion { found: probe.v, supported: version })
            }
            _ => Err(Error::Decode(error.to_string())),
        },
    }
}

/// The size of `value` encoded as bare MessagePack (no envelope): what input
/// and output size limits are measured in.
pub fn encoded_len<T: Serialize>(value: &T) -> Result<usize, Error> {
    rmp_serde::to_vec_named(value).map(|v| v.len()).map_err(|e| Error::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_and_future_versions() {
        assert!(matches!(decode::<u32>(b"\xc1\xff garbage"), Err(Error::Decode(_))));
        assert!(matches!(decode::<u32>(b""), Err(Error::Decode(_))));
        let future =
            rmp_serde::to_vec_named(&EnvelopeRef { v: 2, data: &5u32 }).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(decode::<u32>(&future), Err(Error::UnsupportedVersion { found: 2, supported: 1 })));
    }

    #[test]
    fn envelope_is_a_named_map() {
        let bytes = encode(&7u8).unwrap_or_else(|e| panic!("{e}"));
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value, serde_json::json!({"v": 1, "data": 7}));
    }
}
