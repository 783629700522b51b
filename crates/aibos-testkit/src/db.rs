//! Fresh databases for tests, on either engine.

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

/// The engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A new SQLite file in a temporary folder.
    Sqlite,
    /// A new database on the server named by `AIBOS_TEST_DATABASE_URL`.
    Postgres,
}

impl Engine {
    /// The URL of the PostgreSQL server for tests, if configured. With
    /// `AIBOS_REQUIRE_POSTGRES=1` a missing URL panics: CI must not skip silently.
    pub fn postgres_admin_url() -> Option<String> {
        match std::env::var("AIBOS_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    std::env::var("AIBOS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                    "AIBOS_REQUIRE_POSTGRES=1 but AIBOS_TEST_DATABASE_URL is not set: the PostgreSQL tests cannot run"
                );
                None
            }
        }
    }
}

/// A database that exists for one test.
pub struct TestDb {
    url: String,
    engine: Engine,
    /// Holds the SQLite file's folder.
    _dir: Option<tempfile::TempDir>,
    /// `(admin URL, database name)` to drop a PostgreSQL database afterwards.
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// Creates an empty database; `None` when `engine` is not available here.
    pub async fn create(engine: Engine) -> Option<TestDb> {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("create a temporary folder");
                let url = format!("sqlite://{}", dir.path().join("data/aibos.db").display());
                Some(TestDb {
                    url,
                    engine,
                    _dir: Some(dir),
                    postgres: None,
                })
            }
            Engine::Postgres => {
                let admin = Engine::postgres_admin_url()?;
                let name = format!("aibos_test_{}", Uuid::new_v4().simple());
                let mut conn = PgConnection::connect(&admin)
                    .await
                    .expect("connect to AIBOS_TEST_DATABASE_URL");
                // `name` is our own prefix and a hex UUID: nothing to inject.
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut conn)
                    .await
                    .expect("create a test database");
                let _ = conn.close().await;
                let url = with_database(&admin, &name);
                Some(TestDb {
                    url,
                    engine,
                    _dir: None,
                    postgres: Some((admin, name)),
                })
            }
        }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs inside a runtime that may be shutting down: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("warning: a test database could not be dropped");
        }
    }
}

/// Replaces the database name in a PostgreSQL URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/test?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
