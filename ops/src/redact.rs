//! Redaction of secrets in event payloads: every object key matching one of
//! the configured patterns has its value replaced by `"[REDACTED]"` before
//! the event is published. Checkpoints are not redacted (replay needs the
//! real values); events, and so the registry and every subscriber, never see
//! them.
//!
//! Patterns match whole keys, ASCII case-insensitively; `*` matches any run
//! of characters: `password`, `*_token`, `*secret*`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What replaces a redacted value.
pub const REDACTED: &str = "[REDACTED]";

/// The shared `[redaction]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedactionConfig {
    /// Key patterns whose values are redacted, at any depth. An empty list
    /// turns redaction off. Default: [`DEFAULT_KEYS`].
    pub keys: Vec<String>,
}

/// Keys that commonly hold credentials in tool arguments and outputs.
pub const DEFAULT_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "*_secret",
    "api_key",
    "apikey",
    "*_api_key",
    "access_token",
    "refresh_token",
    "id_token",
    "*_token",
    "token",
    "authorization",
    "private_key",
    "client_secret",
    "credentials",
    "cookie",
    "set-cookie",
];

impl Default for RedactionConfig {
    fn default() -> Self {
        Self { keys: DEFAULT_KEYS.iter().map(|k| (*k).to_owned()).collect() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redaction.keys: {pattern:?} {reason}")]
    Pattern { pattern: String, reason: &'static str },
}

/// Compiled patterns; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    patterns: std::sync::Arc<[Vec<String>]>,
}

impl Redactor {
    /// Compiles the patterns: each is split on `*` into its literal parts.
    pub fn new(config: &RedactionConfig) -> Result<Self, Error> {
        let mut patterns = Vec::with_capacity(config.keys.len());
        for pattern in &config.keys {
            if pattern.is_empty() || pattern.chars().all(|c| c == '*') {
                return Err(Error::Pattern { pattern: pattern.clone(), reason: "would redact every key" });
            }
            patterns.push(pattern.to_ascii_lowercase().split('*').map(str::to_owned).collect());
        }
        Ok(Self { patterns: patterns.into() })
    }

    /// Whether `key` matches a pattern.
    pub fn matches(&self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        self.patterns.iter().any(|parts| glob(parts, &key))
    }

    /// Redacts `value` in place; returns whether anything was redacted.
    pub fn redact(&self, value: &mut Value) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        match value {
            Value::Object(map) => {
                let mut redacted = false;
                for (key, inner) in map.iter_mut() {
                    if self.matches(key) {
                        if inner != &Value::Null && inner.as_str() != Some(REDACTED) {
                            *inner = Value::String(REDACTED.to_owned());
                            redacted = true;
                        }
                    } else {
                        redacted |= self.redact(inner);
                    }
                }
                redacted
            }
            Value::Array(items) => items.iter_mut().fold(false, |acc, item| self.redact(item) | acc),
            _ => false,
        }
    }
}

/// Whether `value` holds a redacted value anywhere (so it is not the real one).
pub fn contains_redacted(value: &Value) -> bool {
    match value {
        Value::String(s) => s == REDACTED,
        Value::Array(items) => items.iter().any(contains_redacted),
        Value::Object(map) => map.values().any(contains_redacted),
        _ => false,
    }
}

/// `parts` is a pattern split on `*`: the first part must start the key, the
/// last must end it, the others appear in order between.
fn glob(parts: &[String], key: &str) -> bool {
    let [first, middle @ .., last] = parts else {
        return parts.first().is_some_and(|p| p == key);
    };
    let Some(mut rest) = key.strip_prefix(first.as_str()) else { return false };
    for part in middle {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn redactor(keys: &[&str]) -> Redactor {
        Redactor::new(&RedactionConfig { keys: keys.iter().map(|k| (*k).to_owned()).collect() })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn globs_match_whole_keys_case_insensitively() {
        let r = redactor(&["password", "*_token", "*secret*", "x*y*z"]);
        for key in ["password", "PASSWORD", "access_token", "my_secret_thing", "secret", "xaybz", "xyz"] {
            assert!(r.matches(key), "{key}");
        }
        for key in ["passwords", "max_tokens", "token", "sec", "xzy", "xy"] {
            assert!(!r.matches(key), "{key}");
        }
    }

    #[test]
    fn redacts_at_any_depth_and_reports_it() {
        let r = Redactor::new(&RedactionConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut v = json!({
            "api_key": "sk-123",
            "query": "weather",
            "nested": [{"password": "hunter2", "user": "bob"}, {"Authorization": "Bearer x"}],
            "max_tokens": 10,
        });
        assert!(r.redact(&mut v));
        assert_eq!(
            v,
            json!({
                "api_key": REDACTED,
                "query": "weather",
                "nested": [{"password": REDACTED, "user": "bob"}, {"Authorization": REDACTED}],
                "max_tokens": 10,
            })
        );
        assert!(!r.redact(&mut v), "already redacted");
        assert!(!r.redact(&mut json!({"safe": [1, 2, {"a": "b"}]})));
    }

    #[test]
    fn empty_list_turns_redaction_off_and_match_all_is_refused() {
        let r = redactor(&[]);
        let mut v = json!({"password": "x"});
        assert!(!r.redact(&mut v));
        assert!(matches!(
            Redactor::new(&RedactionConfig { keys: vec!["*".into()] }),
            Err(Error::Pattern { .. })
        ));
    }
}
