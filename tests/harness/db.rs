//! Real test databases: a SQLite file in a temp dir, or a fresh PostgreSQL
//! database on the cluster named by `RUNFLEET_TEST_POSTGRES_URL` (started by
//! `scripts/postgres.sh`), dropped again when the `TestDb` is dropped.

pub struct TestDb {
    pub url: String,
    kind: Kind,
}

enum Kind {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

pub const POSTGRES_ENV: &str = "RUNFLEET_TEST_POSTGRES_URL";

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let url = format!("sqlite:{}", dir.path().join("registry.db").display());
        Self { url, kind: Kind::Sqlite(dir) }
    }

    /// A fresh, empty PostgreSQL database. Panics with instructions when no
    /// cluster is configured: a PostgreSQL test must never silently pass.
    pub async fn postgres() -> Self {
        use sqlx::Connection;
        let admin_url = std::env::var(POSTGRES_ENV).unwrap_or_else(|_| {
            panic!(
                "{POSTGRES_ENV} is not set; run the suite with scripts/test.sh, or start a cluster \
                 with `scripts/postgres.sh start` and export the URL it prints"
            )
        });
        let name = format!("rf_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin_url}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("{POSTGRES_ENV} must end in /<database>"),
        };
        Self { url, kind: Kind::Postgres { admin_url, name } }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Kind::Postgres { admin_url, name } = &self.kind {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs outside any runtime guarantee: use a private one.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                rt.block_on(async move {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}
