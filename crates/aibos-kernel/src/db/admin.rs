//! A PostgreSQL server's administration, for tools that make throwaway
//! databases of their own (`aibos drill`, `aibos chaos`): create and drop.

use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::DbError;
use crate::config::Engine;

/// A connection to a PostgreSQL server's maintenance database.
pub struct Admin {
    pool: PgPool,
}

/// Names this module accepts for databases (see [`super::is_plain_identifier`]).
fn check_name(name: &str) -> Result<&str, DbError> {
    if super::is_plain_identifier(name) {
        Ok(name)
    } else {
        Err(DbError::Query(sqlx::Error::Protocol(format!(
            "{name:?} is not a database name these tools make"
        ))))
    }
}

impl Admin {
    /// Connects with one connection to `url` (a `postgres://` URL).
    pub async fn connect(url: &str) -> Result<Admin, DbError> {
        let options = PgConnectOptions::from_str(url).map_err(|source| DbError::Connect {
            engine: Engine::Postgres,
            source,
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| DbError::Connect {
                engine: Engine::Postgres,
                source,
            })?;
        Ok(Admin { pool })
    }

    /// `CREATE DATABASE name`.
    pub async fn create_database(&self, name: &str) -> Result<(), DbError> {
        let sql = format!("CREATE DATABASE \"{}\"", check_name(name)?);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(DbError::Query)?;
        Ok(())
    }

    /// `DROP DATABASE IF EXISTS name WITH (FORCE)`: its sessions are ended.
    pub async fn drop_database(&self, name: &str) -> Result<(), DbError> {
        let sql = format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            check_name(name)?
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(DbError::Query)?;
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.pool.close().await;
    }
}
