//! Prints a complete example exchange with the exact bytes on the wire.
//!
//! `docs/protocol.md` pastes this program's output, so every id and timestamp is
//! fixed and the output is stable:
//!
//! ```text
//! cargo run -p runfleet-protocol --example wire_example
//! ```
//!
//! Each message is shown with its subject, its headers, a JSON view of the
//! MessagePack payload (keys in wire order, decoded by the small reader at the
//! bottom of this file rather than by serde, so the view is what the bytes say)
//! and, for some, a hex dump of the payload.

use std::error::Error;
use std::fmt::Write as _;

use runfleet_protocol::api::{
    EventsRequest, EventsResponse, GetRequest, ListRequest, ListResponse, Reply, RunView, SubmitRequest,
    SubmitResponse,
};
use runfleet_protocol::event::{AgentEvent, Event, EventBody, RunCompleted, RunCreated, RunStarted};
use runfleet_protocol::ids::IdempotencyKey;
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::limits;
use runfleet_protocol::names::{
    HEADER_CONTENT_TYPE, HEADER_ERROR_CODE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID,
    VERB_EVENTS, VERB_GET, VERB_LIST, VERB_SUBMIT,
};
use runfleet_protocol::{
    decode, encode, AgentName, ApiError, ErrorCode, Names, RunId, RunState, TenantId, WorkerId, CONTENT_TYPE,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// 2025-01-01T12:00:00Z, in ms since the Unix epoch.
const T0_MS: i64 = 1_735_732_800_000;

fn main() -> Result<()> {
    let names = Names::default();
    let tenant = TenantId::new("acme")?;
    let run_id = RunId::from_uuid(
        uuid::Builder::from_unix_timestamp_millis(
            u64::try_from(T0_MS)?,
            &[0x7a, 0x3c, 0x9e, 0x41, 0x52, 0x6b, 0x8d, 0x0f, 0x13, 0x24],
        )
        .into_uuid(),
    )?;
    let worker = WorkerId::new("w-0194220e5c007b3c9a1d2e3f40516273")?;
    let agent = AgentName::new("summarize")?;
    let input = json!({"url": "https://example.com/report.pdf", "max_words": 200});
    let key = "order-42";

    // ---- submit ----
    let submit = SubmitRequest {
        agent: agent.to_string(),
        input: input.clone(),
        queue: None,
        priority: Some(1),
        idempotency_key: Some(key.to_owned()),
        max_attempts: None,
    };
    // The example must be a request the coordinator accepts.
    let valid = submit.clone().validate(limits::DEFAULT_MAX_INPUT_BYTES, limits::DEFAULT_MAX_ATTEMPTS)?;
    let request_subject = names.api(&tenant, VERB_SUBMIT);
    show(
        "submit request (client -> coordinator, core NATS request)",
        &request_subject,
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &submit,
        true,
    )?;

    let reply: Reply<SubmitResponse> =
        Reply::Ok(SubmitResponse { run_id, state: RunState::Queued, created: true });
    show(
        "submit reply (coordinator -> client, on the request's reply inbox)",
        "_INBOX.<client inbox>",
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &reply,
        true,
    )?;

    let idem = IdempotencyKey::new(key)?;
    println!("== idempotency KV key for tenant acme, key {key:?}");
    println!("bucket {}  key {}", names.idempotency_bucket(), names.idempotency_key(&tenant, &idem));
    println!();

    // ---- what the coordinator stored before replying ----
    let created = Event {
        run_id,
        tenant: tenant.clone(),
        seq: 1,
        ts_ms: T0_MS,
        attempt: 0,
        worker_id: None,
        trace_id: None,
        body: EventBody::Created(RunCreated {
            agent: valid.agent.clone(),
            queue: valid.queue.clone(),
            priority: valid.priority,
            input: input.clone(),
            max_attempts: valid.max_attempts,
            idempotency_key: Some(key.to_owned()),
            traceparent: None,
        }),
    };
    let events_subject = names.run_events(&tenant, run_id);
    // Illustrative stream sequences of this run's events in RUNFLEET_EVENTS.
    let stream_seqs: [u64; 4] = [1041, 1042, 1057, 1063];
    show(
        "event seq 1: run.created (coordinator -> JetStream RUNFLEET_EVENTS)",
        &events_subject,
        &event_headers(0),
        &created,
        false,
    )?;

    let job = Job {
        run_id,
        tenant: tenant.clone(),
        agent: valid.agent.clone(),
        queue: valid.queue.clone(),
        priority: valid.priority,
        input: input.clone(),
        max_attempts: valid.max_attempts,
        created_us: T0_MS * 1000 + 250,
        traceparent: None,
        created_seq: Some(1),
    };
    show(
        "job (coordinator -> JetStream RUNFLEET_JOBS)",
        &names.job(&valid.queue, valid.priority, run_id),
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned()), (HEADER_MSG_ID, names.job_msg_id(run_id, 0))],
        &job,
        false,
    )?;

    // ---- a worker runs it ----
    let lease = Lease {
        run_id,
        worker_id: worker.clone(),
        attempt: 1,
        acquired_ms: T0_MS + 11,
        renewed_ms: T0_MS + 11,
    };
    println!(
        "== lease (worker -> KV {}, key {}, KV create; a first attempt's at its first heartbeat)",
        names.leases_bucket(),
        names.lease_key(run_id)
    );
    println!("{}", json_view(&encode(&lease)?)?);
    println!();

    let started = Event {
        run_id,
        tenant: tenant.clone(),
        seq: 2,
        ts_ms: T0_MS + 12,
        attempt: 1,
        worker_id: Some(worker.clone()),
        trace_id: None,
        body: EventBody::Started(RunStarted { delivery: 1 }),
    };
    show(
        "event seq 2: run.started (worker -> JetStream)",
        &events_subject,
        &event_headers(stream_seqs[0]),
        &started,
        false,
    )?;

    let progress = Event {
        run_id,
        tenant: tenant.clone(),
        seq: 3,
        ts_ms: T0_MS + 1500,
        attempt: 1,
        worker_id: Some(worker.clone()),
        trace_id: None,
        body: EventBody::Agent(AgentEvent { name: "progress".to_owned(), data: json!({"pct": 50}) }),
    };
    show(
        "event seq 3: agent.event (worker -> JetStream)",
        &events_subject,
        &event_headers(stream_seqs[1]),
        &progress,
        false,
    )?;

    let output = json!({"summary": "Revenue grew 12%.", "words": 3});
    let completed = Event {
        run_id,
        tenant: tenant.clone(),
        seq: 4,
        ts_ms: T0_MS + 4210,
        attempt: 1,
        worker_id: Some(worker.clone()),
        trace_id: None,
        body: EventBody::Completed(RunCompleted { output: output.clone() }),
    };
    show(
        "event seq 4: run.completed (worker -> JetStream), terminal",
        &events_subject,
        &event_headers(stream_seqs[2]),
        &completed,
        true,
    )?;

    // ---- reads ----
    let get = GetRequest { run_id: run_id.to_string() };
    show(
        "get request",
        &names.api(&tenant, VERB_GET),
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &get,
        false,
    )?;
    let view = RunView {
        run_id,
        tenant: tenant.clone(),
        agent: valid.agent.clone(),
        queue: valid.queue.clone(),
        priority: valid.priority,
        state: RunState::Completed,
        attempt: 1,
        max_attempts: valid.max_attempts,
        input: input.clone(),
        output: Some(output),
        error: None,
        idempotency_key: Some(key.to_owned()),
        worker_id: Some(worker.clone()),
        created_ms: T0_MS,
        updated_ms: T0_MS + 4210,
        last_seq: 4,
    };
    show(
        "get reply",
        "_INBOX.<client inbox>",
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &Reply::Ok(view.clone()),
        false,
    )?;

    let list = ListRequest { state: Some("completed".to_owned()), limit: Some(1), ..ListRequest::default() };
    list.clone().validate()?;
    show(
        "list request",
        &names.api(&tenant, VERB_LIST),
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &list,
        false,
    )?;
    show(
        "list reply (one page of one run; pass next_cursor as cursor for the next page)",
        "_INBOX.<client inbox>",
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &Reply::Ok(ListResponse { runs: vec![view], next_cursor: Some(run_id.to_string()) }),
        false,
    )?;

    let events = EventsRequest { run_id: run_id.to_string(), after_seq: 2, limit: Some(100) };
    events.clone().validate()?;
    show(
        "events request",
        &names.api(&tenant, VERB_EVENTS),
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &events,
        false,
    )?;
    show(
        "events reply",
        "_INBOX.<client inbox>",
        &[(HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned())],
        &Reply::Ok(EventsResponse { events: vec![progress, completed], has_more: false }),
        false,
    )?;

    // ---- an error reply ----
    let conflict: Reply<SubmitResponse> = Reply::Err(ApiError::new(
        ErrorCode::Conflict,
        format!("idempotency key {key:?} is bound to run {run_id} with a different request"),
    ));
    show(
        "error reply: the same idempotency key with a different request",
        "_INBOX.<client inbox>",
        &[
            (HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned()),
            (HEADER_ERROR_CODE, ErrorCode::Conflict.as_str().to_owned()),
        ],
        &conflict,
        true,
    )?;
    let invalid: Reply<SubmitResponse> = Reply::Err(ApiError::invalid(
        "priority",
        format!("priority band 7 does not exist; use 0 (highest) to {}", limits::PRIORITY_BANDS - 1),
    ));
    show(
        "error reply: a field failed validation",
        "_INBOX.<client inbox>",
        &[
            (HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned()),
            (HEADER_ERROR_CODE, ErrorCode::InvalidArgument.as_str().to_owned()),
        ],
        &invalid,
        false,
    )?;
    Ok(())
}

fn event_headers(previous_stream_seq: u64) -> Vec<(&'static str, String)> {
    vec![
        (HEADER_CONTENT_TYPE, CONTENT_TYPE.to_owned()),
        (HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, previous_stream_seq.to_string()),
    ]
}

/// Prints one message, after checking that its bytes decode back to the value.
fn show<T>(title: &str, subject: &str, headers: &[(&str, String)], value: &T, hex: bool) -> Result<()>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value)?;
    let back: T = decode(&bytes)?;
    if &back != value {
        return Err(format!("{title}: decoded {back:?}, expected {value:?}").into());
    }
    println!("== {title}");
    println!("subject: {subject}");
    for (name, value) in headers {
        println!("header:  {name}: {value}");
    }
    println!("payload: {} bytes", bytes.len());
    println!("{}", json_view(&bytes)?);
    if hex {
        println!("{}", hex_dump(&bytes));
    }
    println!();
    Ok(())
}

/// `xxd`-style dump: offset, 16 bytes in hex, printable ASCII.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}: ", i * 16);
        for j in 0..16 {
            match chunk.get(j) {
                Some(b) => {
                    let _ = write!(out, "{b:02x}");
                }
                None => out.push_str("  "),
            }
            if j % 2 == 1 {
                out.push(' ');
            }
        }
        out.push(' ');
        out.extend(chunk.iter().map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' }));
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

/// Renders MessagePack as pretty JSON, keeping map keys in wire order.
fn json_view(bytes: &[u8]) -> Result<String> {
    let mut reader = Reader { bytes, pos: 0 };
    let mut out = String::new();
    reader.value(&mut out, 0)?;
    if reader.pos != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - reader.pos).into());
    }
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or("truncated")?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn value(&mut self, out: &mut String, depth: usize) -> Result<()> {
        let marker = self.take(1)?[0];
        match marker {
            0x00..=0x7f => write!(out, "{marker}")?,
            0x80..=0x8f => self.map(out, depth, usize::from(marker & 0x0f))?,
            0x90..=0x9f => self.array(out, depth, usize::from(marker & 0x0f))?,
            0xa0..=0xbf => self.str(out, usize::from(marker & 0x1f))?,
            0xc0 => out.push_str("null"),
            0xc2 => out.push_str("false"),
            0xc3 => out.push_str("true"),
            0xca => write!(out, "{}", f32::from_bits(u32::try_from(self.uint(4)?)?))?,
            0xcb => write!(out, "{}", f64::from_bits(self.uint(8)?))?,
            0xcc..=0xcf => {
                let v = self.uint(1 << (marker - 0xcc))?;
                write!(out, "{v}")?;
            }
            0xd0..=0xd3 => {
                let n = 1usize << (marker - 0xd0);
                let raw = self.uint(n)?;
                let shift = 64 - 8 * n as u32;
                // Sign-extend the n-byte two's complement value.
                let v = ((raw << shift) as i64) >> shift;
                write!(out, "{v}")?;
            }
            0xd9..=0xdb => {
                let n = usize::try_from(self.uint(1 << (marker - 0xd9))?)?;
                self.str(out, n)?;
            }
            0xdc | 0xdd => {
                let n = usize::try_from(self.uint(if marker == 0xdc { 2 } else { 4 })?)?;
                self.array(out, depth, n)?;
            }
            0xde | 0xdf => {
                let n = usize::try_from(self.uint(if marker == 0xde { 2 } else { 4 })?)?;
                self.map(out, depth, n)?;
            }
            0xe0..=0xff => write!(out, "{}", marker as i8)?,
            other => return Err(format!("marker 0x{other:02x} does not occur in runfleet payloads").into()),
        }
        Ok(())
    }

    fn str(&mut self, out: &mut String, n: usize) -> Result<()> {
        let s = std::str::from_utf8(self.take(n)?)?;
        out.push_str(&serde_json::to_string(s)?);
        Ok(())
    }

    fn array(&mut self, out: &mut String, depth: usize, n: usize) -> Result<()> {
        if n == 0 {
            out.push_str("[]");
            return Ok(());
        }
        out.push('[');
        for i in 0..n {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            indent(out, depth + 1);
            self.value(out, depth + 1)?;
        }
        out.push('\n');
        indent(out, depth);
        out.push(']');
        Ok(())
    }

    fn map(&mut self, out: &mut String, depth: usize, n: usize) -> Result<()> {
        if n == 0 {
            out.push_str("{}");
            return Ok(());
        }
        out.push('{');
        for i in 0..n {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            indent(out, depth + 1);
            self.value(out, depth + 1)?;
            out.push_str(": ");
            self.value(out, depth + 1)?;
        }
        out.push('\n');
        indent(out, depth);
        out.push('}');
        Ok(())
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}
