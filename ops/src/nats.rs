//! Connecting to NATS with the fleet's credentials: user and password, token,
//! NKey seed, credentials (JWT) file, TLS with a custom CA and client
//! certificates, and a per-tenant inbox prefix.
//!
//! Every runfleet process (coordinator, worker, CLI) connects through
//! [`connect`], so every one of them takes the same `[nats]` options.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};
use serde::{Deserialize, Serialize};

/// The shared `[nats]` section: how to authenticate to NATS and secure the
/// connection. Every key is optional; the default is an anonymous plaintext
/// connection. Environment: `RUNFLEET_NATS__<KEY>` (e.g.
/// `RUNFLEET_NATS__PASSWORD`).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// User name, with `password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password of `user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Authentication token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// NKey seed (`SU…`) given inline, e.g. from a Secret in the environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<String>,
    /// File holding the NKey seed, e.g. a mounted Secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// Credentials file (user JWT and NKey seed), as written by `nsc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// PEM file of the CA(s) that signed the server's certificate; implies TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS, with `tls_key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to connect without TLS even when no CA or certificate is set.
    /// Default `false` (a `tls://` URL also requires TLS).
    pub tls_required: bool,
    /// Start the TLS handshake before the NATS protocol (the server's
    /// `handshake_first`). Default `false`.
    pub tls_first: bool,
    /// Prefix of this connection's reply subjects instead of `_INBOX`. Tenant
    /// users in the shipped NATS configuration may only receive replies on
    /// `_INBOX.<tenant>.>`; the CLI uses `_INBOX.<tenant>` when this is unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_prefix: Option<String>,
}

impl std::fmt::Debug for NatsConfig {
    /// Secrets show as `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("NatsConfig")
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey_seed", &hidden(&self.nkey_seed))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .field("tls_first", &self.tls_first)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

/// `url` (a comma-separated server list) with any credentials in it
/// replaced: `nats://user:secret@h:4222` → `nats://user:***@h:4222`,
/// `nats://token@h:4222` → `nats://***@h:4222`. For logs, errors and output.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let (scheme, rest) = server.split_once("://").map_or(("", server), |(s, r)| (s, r));
            let Some((credentials, host)) = rest.rsplit_once('@') else { return server.to_owned() };
            let hidden = match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            if scheme.is_empty() {
                format!("{hidden}@{host}")
            } else {
                format!("{scheme}://{hidden}@{host}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `[nats]` options contradict each other or name unreadable files.
    #[error("nats.{key}: {reason}")]
    Config { key: &'static str, reason: String },
    /// `nats_url` is not a comma-separated list of server URLs.
    #[error("nats_url {url:?} is invalid: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The server refused the credentials: retrying will not help.
    #[error("NATS at {url} refused the credentials ({reason}); check the [nats] user/password, token, nkey or creds_file")]
    Auth { url: String, reason: String },
    /// The TLS handshake failed: retrying will not help.
    #[error(
        "TLS with NATS at {url} failed ({reason}); check nats.tls_ca_file, tls_cert_file and tls_key_file"
    )]
    Tls { url: String, reason: String },
    /// The server could not be reached (yet).
    #[error("NATS at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
}

impl Error {
    /// Whether a later attempt may succeed: only an unreachable server.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

fn config(key: &'static str, reason: impl Into<String>) -> Error {
    Error::Config { key, reason: reason.into() }
}

impl NatsConfig {
    /// Rejects combinations that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some() || self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(config(
                "user",
                "set only one of user/password, token, nkey_seed/nkey_seed_file and creds_file",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(config("password", "user and password go together"));
        }
        if self.nkey_seed.is_some() && self.nkey_seed_file.is_some() {
            return Err(config("nkey_seed_file", "set nkey_seed or nkey_seed_file, not both"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(config("tls_key_file", "tls_cert_file and tls_key_file go together"));
        }
        if let Some(prefix) = &self.inbox_prefix {
            if prefix.is_empty() || prefix.contains([' ', '*', '>']) || prefix.ends_with('.') {
                return Err(config("inbox_prefix", format!("{prefix:?} is not a subject prefix")));
            }
        }
        Ok(())
    }

    /// Whether any option asks for TLS.
    pub fn wants_tls(&self) -> bool {
        self.tls_required || self.tls_first || self.tls_ca_file.is_some() || self.tls_cert_file.is_some()
    }

    /// The async-nats options these settings make, named `name`.
    pub async fn options(&self, name: &str) -> Result<ConnectOptions, Error> {
        self.validate()?;
        let mut options = match (&self.creds_file, &self.nkey_seed_file) {
            (Some(path), _) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| config("creds_file", format!("{}: {e}", path.display())))?,
            (None, Some(path)) => {
                let seed = std::fs::read_to_string(path)
                    .map_err(|e| config("nkey_seed_file", format!("{}: {e}", path.display())))?;
                ConnectOptions::with_nkey(seed.trim().to_owned())
            }
            (None, None) => ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.trim().to_owned());
        }
        for (key, file) in [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = file {
                if !path.is_file() {
                    return Err(config(key, format!("{} is not a readable file", path.display())));
                }
            }
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.wants_tls() {
            options = options.require_tls(true);
        }
        if self.tls_first {
            options = options.tls_first();
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        Ok(options.name(name))
    }
}

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects once. Refused credentials and failed TLS handshakes are
/// [`Error::Auth`] and [`Error::Tls`]; only [`Error::Unreachable`] is worth
/// retrying.
pub async fn connect(url: &str, nats: &NatsConfig, name: &str) -> Result<async_nats::Client, Error> {
    let servers = server_addrs(url)?;
    let options = nats.options(name).await?.connection_timeout(CONNECT_TIMEOUT);
    options.connect(servers.as_slice()).await.map_err(|e| classify(url, &e))
}

/// `nats://a:4222,nats://b:4222` → the servers to try.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, Error> {
    let invalid = |reason: String| Error::InvalidUrl { url: redact_url(url), reason };
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| invalid(format!("{}: {e}", redact_url(s)))))
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(invalid("names no server".to_owned()));
    }
    Ok(servers)
}

/// Connects, retrying while the server is unreachable (with backoff up to
/// 5 s, logging each failure) until `stop` is cancelled; fails at once on
/// refused credentials or a failed TLS handshake. For long-running
/// processes, which in Kubernetes often start before NATS does.
pub async fn connect_waiting(
    url: &str,
    nats: &NatsConfig,
    name: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<async_nats::Client, Error> {
    let mut delay = Duration::from_millis(100);
    loop {
        match connect(url, nats, name).await {
            Ok(client) => return Ok(client),
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, retry_in = ?delay, "waiting for NATS");
                tokio::select! {
                    () = stop.cancelled() => return Err(error),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

fn classify(url: &str, error: &async_nats::ConnectError) -> Error {
    let url = redact_url(url);
    let reason = error.to_string();
    if is_tls_failure(error) {
        return Error::Tls { url, reason };
    }
    match error.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            Error::Auth { url, reason }
        }
        ConnectErrorKind::Tls => Error::Tls { url, reason },
        ConnectErrorKind::ServerParse => Error::InvalidUrl { url, reason },
        ConnectErrorKind::Dns
        | ConnectErrorKind::TimedOut
        | ConnectErrorKind::Io
        | ConnectErrorKind::MaxReconnects => Error::Unreachable { url, reason },
    }
}

/// Whether TLS refused the connection, whatever kind async-nats gave the
/// error: a handshake either side refuses surfaces as an IO error wrapping
/// the TLS error (with TLS 1.3, the server's refusal of a missing or unknown
/// client certificate arrives with the first read after the handshake).
/// Such a refusal is a configuration problem, never worth retrying.
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<async_nats::rustls::Error>()) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// nats-server did not answer a [`round_trip`] in time, or the connection
/// failed while it was sent.
#[derive(Debug, thiserror::Error)]
#[error("no round trip to nats-server: {0}")]
pub struct RoundTripError(String);

/// Completes once nats-server has processed everything `client` sent before
/// the call, and `client` has read everything the server sent it before
/// that. `Client::flush` only writes the socket: a subscription it flushed
/// may not be at the server yet, and a message already routed to an old
/// subscription may still be on its way. This asks the server itself
/// ([`ROUND_TRIP_SUBJECT`]) and waits for the answer: the server handles a
/// connection's commands in order and sends it messages in order.
pub async fn round_trip(client: &async_nats::Client, timeout: Duration) -> Result<(), RoundTripError> {
    let request = client.request(ROUND_TRIP_SUBJECT, "".into());
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(_)) => Ok(()),
        // The server's own answer too.
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Ok(Err(e)) => Err(RoundTripError(e.to_string())),
        Err(_) => Err(RoundTripError(format!("no answer within {} ms", timeout.as_millis()))),
    }
}

/// What [`round_trip`] asks: JetStream's account info, which nats-server
/// answers itself and which the coordinator's and the workers' users may
/// publish (`deploy/nats/tenants.conf`); they may not publish to their own
/// inboxes.
pub const ROUND_TRIP_SUBJECT: &str = "$JS.API.INFO";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_contradictions_naming_the_key() {
        let cases = [
            (
                "user",
                NatsConfig { token: Some("t".into()), creds_file: Some("c".into()), ..Default::default() },
            ),
            ("password", NatsConfig { user: Some("u".into()), ..Default::default() }),
            ("tls_key_file", NatsConfig { tls_cert_file: Some("c".into()), ..Default::default() }),
            ("inbox_prefix", NatsConfig { inbox_prefix: Some("_INBOX.>".into()), ..Default::default() }),
        ];
        for (key, cfg) in cases {
            match cfg.validate() {
                Err(Error::Config { key: got, .. }) => assert_eq!(got, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(NatsConfig::default().validate().is_ok());
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact_url("nats://u:hunter2@a:4222,nats://tok@b:4222,nats://c:4222"),
            "nats://u:***@a:4222,nats://***@b:4222,nats://c:4222"
        );
        let config =
            NatsConfig { password: Some("hunter2".into()), user: Some("u".into()), ..Default::default() };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn server_lists_are_split_on_commas() {
        let servers = server_addrs("nats://a:4222, nats://b:4223,").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(servers.len(), 2);
        assert!(matches!(server_addrs("nats://a:notaport"), Err(Error::InvalidUrl { .. })));
        assert!(matches!(server_addrs(" , "), Err(Error::InvalidUrl { .. })));
    }
}
