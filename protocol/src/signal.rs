//! Signals: values delivered to a run under a key, stored in the
//! `<prefix>-signals` KV bucket under `<run_id>.<key>`.
//!
//! A signal is written with KV `create`, so the first one for a key wins and
//! never changes: a run that awaits the key reads the same payload on every
//! attempt. Approvals are signals whose payload is an [`ApprovalDecision`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A stored signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub payload: Value,
    /// When the coordinator stored it, ms since the Unix epoch.
    pub received_ms: i64,
}

/// A person's decision on an `approval.requested`, the payload of the
/// approval's signal: `{"decision": "approve"}`,
/// `{"decision": "reject", "reason": "…"}` or
/// `{"decision": "edit", "input": …}` (run the action with this input
/// instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ApprovalDecision {
    Approve,
    Reject {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Edit {
        input: Value,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decisions_on_the_wire() {
        let cases = [
            (ApprovalDecision::Approve, json!({"decision": "approve"})),
            (
                ApprovalDecision::Reject { reason: Some("no".into()) },
                json!({"decision": "reject", "reason": "no"}),
            ),
            (
                ApprovalDecision::Edit { input: json!({"action": "x"}) },
                json!({"decision": "edit", "input": {"action": "x"}}),
            ),
        ];
        for (decision, wire) in cases {
            assert_eq!(serde_json::to_value(&decision).unwrap_or_default(), wire);
            let back: ApprovalDecision = serde_json::from_value(wire).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, decision);
        }
        assert!(serde_json::from_value::<ApprovalDecision>(json!({"decision": "maybe"})).is_err());
    }
}
