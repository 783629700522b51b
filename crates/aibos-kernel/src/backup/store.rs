//! The SQL of backups and restores: the schema as each engine describes it,
//! a consistent snapshot to read, and a transaction to load into.

use futures_util::TryStreamExt as _;
use sqlx::Row as _;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;

use super::BackupError;
use tokio::sync::mpsc;

use super::format::{AuditHead, FormatError, Value, encode_row};
use crate::db::Db;
use crate::limits;

/// A column as the engine declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Text of any length.
    Text,
    /// Any integer type.
    Integer,
    /// PostgreSQL's `boolean` (SQLite stores 0/1 in an INTEGER column).
    Boolean,
}

/// A table of the kernel's schema.
#[derive(Debug, Clone)]
pub struct Table {
    /// Its name.
    pub name: String,
    /// Its columns, sorted by name (the backup's column order on both engines).
    pub columns: Vec<(String, SourceKind)>,
    /// Its primary key's columns, in key order (empty when it has none).
    pub key: Vec<String>,
    /// The tables it references.
    pub references: Vec<String>,
    /// Columns filled from a sequence (PostgreSQL), set past the restored rows.
    pub serial: Vec<String>,
}

/// A transaction, on either engine. Dropped without [`Conn::commit`] (an
/// error, a cancelled task), it is rolled back before its connection goes back
/// to the pool.
pub enum Conn {
    /// SQLite.
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    /// PostgreSQL.
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// A row's values in the order of `kinds` (text or integer; booleans arrive
/// as integers), written once for both drivers' row types.
macro_rules! values_of {
    ($row:expr, $kinds:expr) => {{
        let mut values = Vec::with_capacity($kinds.len());
        for (i, kind) in $kinds.iter().enumerate() {
            values.push(match kind {
                SourceKind::Text => $row
                    .try_get::<Option<String>, _>(i)?
                    .map_or(Value::Null, Value::Text),
                SourceKind::Integer | SourceKind::Boolean => $row
                    .try_get::<Option<i64>, _>(i)?
                    .map_or(Value::Null, Value::Integer),
            });
        }
        values
    }};
}

/// Names the kernel's tables use; anything else is refused before it is put in SQL.
fn check_identifier(name: &str) -> Result<&str, BackupError> {
    if crate::db::is_plain_identifier(name) {
        Ok(name)
    } else {
        Err(BackupError::Schema(format!(
            "the table or column name {name:?} is not one the kernel uses"
        )))
    }
}

impl Conn {
    /// Opens a read-only snapshot: every read after sees the database as of one
    /// instant, while the kernel keeps writing.
    pub async fn snapshot(db: &Db) -> Result<Conn, BackupError> {
        match db {
            // Deferred: the snapshot is fixed at the first read, in WAL mode
            // without blocking the writer.
            Db::Sqlite(s) => Ok(Conn::Sqlite(s.pool.begin_with("BEGIN").await?)),
            Db::Postgres(pool) => {
                let mut tx = pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await?;
                sqlx::raw_sql("SET LOCAL statement_timeout = 0")
                    .execute(&mut *tx)
                    .await?;
                Ok(Conn::Postgres(tx))
            }
        }
    }

    /// Opens the write transaction a restore loads into.
    pub async fn load(db: &Db) -> Result<Conn, BackupError> {
        match db {
            Db::Sqlite(s) => Ok(Conn::Sqlite(s.pool.begin_with("BEGIN IMMEDIATE").await?)),
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::raw_sql("SET LOCAL statement_timeout = 0")
                    .execute(&mut *tx)
                    .await?;
                Ok(Conn::Postgres(tx))
            }
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), BackupError> {
        match self {
            Conn::Sqlite(tx) => tx.commit().await?,
            Conn::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls back (a failed rollback closes the connection instead).
    pub async fn rollback(self) {
        let _ = match self {
            Conn::Sqlite(tx) => tx.rollback().await,
            Conn::Postgres(tx) => tx.rollback().await,
        };
    }

    async fn run(&mut self, sql: String) -> Result<(), BackupError> {
        match self {
            Conn::Sqlite(c) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut **c)
                .await
                .map(|_| ())?,
            Conn::Postgres(c) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut **c)
                .await
                .map(|_| ())?,
        }
        Ok(())
    }

    /// The highest migration applied (0 before any).
    pub async fn schema_version(&mut self) -> Result<i64, BackupError> {
        const SQL: &str = "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success";
        Ok(match self {
            Conn::Sqlite(c) => sqlx::query_scalar(SQL).fetch_one(&mut **c).await?,
            Conn::Postgres(c) => sqlx::query_scalar(SQL).fetch_one(&mut **c).await?,
        })
    }

    /// Every table of the kernel's schema (not the migrations' own), a table
    /// after those it references.
    pub async fn tables(&mut self) -> Result<Vec<Table>, BackupError> {
        let tables = match self {
            Conn::Sqlite(c) => sqlite_tables(c).await?,
            Conn::Postgres(c) => postgres_tables(c).await?,
        };
        in_dependency_order(tables)
    }

    /// Each tenant's audit chain head.
    pub async fn audit_heads(&mut self) -> Result<Vec<AuditHead>, BackupError> {
        const SQL: &str = "SELECT tenant_id, seq, hash FROM audit_heads ORDER BY tenant_id";
        let rows: Vec<(String, i64, String)> =
            match self {
                Conn::Sqlite(c) => sqlx::query_as(SQL).fetch_all(&mut **c).await?,
                Conn::Postgres(c) => sqlx::query_as(
                    "SELECT tenant_id, seq, hash FROM audit_heads ORDER BY tenant_id COLLATE \"C\"",
                )
                .fetch_all(&mut **c)
                .await?,
            };
        Ok(rows
            .into_iter()
            .map(|(tenant_id, seq, hash)| AuditHead {
                tenant_id,
                seq,
                hash,
            })
            .collect())
    }

    /// Rows in `table`.
    pub async fn count(&mut self, table: &str) -> Result<u64, BackupError> {
        self.count_where(table, "").await
    }

    /// Rows of `table` other than those the migrations themselves insert (the
    /// `system` tenant and the kernel's own permissions): what makes a restore
    /// target "not empty".
    pub async fn user_rows(&mut self, table: &str) -> Result<u64, BackupError> {
        let filter = match table {
            "tenants" => format!(" WHERE id <> '{}'", crate::identity::SYSTEM_TENANT_ID),
            "permissions" => " WHERE owner <> 'kernel'".to_owned(),
            _ => String::new(),
        };
        self.count_where(table, &filter).await
    }

    /// `SELECT count(*)` of `table` with `filter` (a `WHERE` clause of the
    /// kernel's own, or nothing).
    async fn count_where(&mut self, table: &str, filter: &str) -> Result<u64, BackupError> {
        let sql = format!(
            "SELECT count(*) FROM \"{}\"{filter}",
            check_identifier(table)?
        );
        let n: i64 = match self {
            Conn::Sqlite(c) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                    .fetch_one(&mut **c)
                    .await?
            }
            Conn::Postgres(c) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                    .fetch_one(&mut **c)
                    .await?
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Streams `table`'s rows ordered by `order_by` (byte-wise for text), each
    /// encoded with its values in `table.columns`' order, to `out` in chunks;
    /// returns how many rows were sent.
    pub async fn read_rows(
        &mut self,
        table: &Table,
        order_by: &[String],
        out: &mpsc::Sender<Chunk>,
    ) -> Result<u64, BackupError> {
        let mut encoder = ChunkEncoder {
            chunk: Chunk::default(),
            rows: 0,
            out,
        };
        let name = check_identifier(&table.name)?;
        let kinds: Vec<SourceKind> = table.columns.iter().map(|(_, k)| *k).collect();
        match self {
            Conn::Sqlite(c) => {
                let select = column_list(table, |c, _| format!("\"{c}\""))?;
                let order = order_list(order_by, |c| format!("\"{c}\""))?;
                let sql = format!("SELECT {select} FROM \"{name}\" ORDER BY {order}");
                let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut **c);
                while let Some(row) = rows.try_next().await? {
                    encoder.push(&values_of!(row, kinds)).await?;
                }
            }
            Conn::Postgres(c) => {
                let select = column_list(table, |c, kind| match kind {
                    SourceKind::Text => format!("\"{c}\""),
                    SourceKind::Integer => format!("\"{c}\"::int8"),
                    SourceKind::Boolean => format!("\"{c}\"::int4::int8"),
                })?;
                let text: Vec<&str> = table
                    .columns
                    .iter()
                    .filter(|(_, k)| *k == SourceKind::Text)
                    .map(|(n, _)| n.as_str())
                    .collect();
                let order = order_list(order_by, |c| {
                    if text.contains(&c) {
                        format!("\"{c}\" COLLATE \"C\"")
                    } else {
                        format!("\"{c}\"")
                    }
                })?;
                let sql = format!("SELECT {select} FROM \"{name}\" ORDER BY {order}");
                let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut **c);
                while let Some(row) = rows.try_next().await? {
                    encoder.push(&values_of!(row, kinds)).await?;
                }
            }
        }
        encoder.flush().await?;
        Ok(encoder.rows)
    }

    /// Turns off the triggers that refuse changes (the audit trail's
    /// append-only guards) for this transaction; [`Conn::restore_triggers`]
    /// puts them back before it commits.
    pub async fn suspend_triggers(&mut self) -> Result<Vec<SuspendedTrigger>, BackupError> {
        match self {
            Conn::Sqlite(c) => {
                let triggers: Vec<(String, String)> = sqlx::query_as(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name",
                )
                .fetch_all(&mut **c)
                .await?;
                let mut suspended = Vec::with_capacity(triggers.len());
                for (name, sql) in triggers {
                    let name = check_identifier(&name)?.to_owned();
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TRIGGER \"{name}\"")))
                        .execute(&mut **c)
                        .await?;
                    suspended.push(SuspendedTrigger::Sqlite { sql });
                }
                Ok(suspended)
            }
            Conn::Postgres(c) => {
                let triggers: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT c.relname::text, t.tgname::text, t.tgenabled::text FROM pg_trigger t \
                     JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND NOT t.tgisinternal ORDER BY 1, 2",
                )
                .fetch_all(&mut **c)
                .await?;
                let mut suspended = Vec::with_capacity(triggers.len());
                for (table, name, enabled) in triggers {
                    let (table, name) = (check_identifier(&table)?, check_identifier(&name)?);
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "ALTER TABLE \"{table}\" DISABLE TRIGGER \"{name}\""
                    )))
                    .execute(&mut **c)
                    .await?;
                    suspended.push(SuspendedTrigger::Postgres {
                        table: table.to_owned(),
                        name: name.to_owned(),
                        enabled,
                    });
                }
                Ok(suspended)
            }
        }
    }

    /// Puts back what [`Conn::suspend_triggers`] turned off.
    pub async fn restore_triggers(
        &mut self,
        triggers: Vec<SuspendedTrigger>,
    ) -> Result<(), BackupError> {
        for trigger in triggers {
            match (&mut *self, trigger) {
                (Conn::Sqlite(c), SuspendedTrigger::Sqlite { sql }) => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&mut **c)
                        .await?;
                }
                (
                    Conn::Postgres(c),
                    SuspendedTrigger::Postgres {
                        table,
                        name,
                        enabled,
                    },
                ) => {
                    let how = match enabled.as_str() {
                        "A" => "ENABLE ALWAYS",
                        "R" => "ENABLE REPLICA",
                        "D" => continue,
                        _ => "ENABLE",
                    };
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "ALTER TABLE \"{table}\" {how} TRIGGER \"{name}\""
                    )))
                    .execute(&mut **c)
                    .await?;
                }
                _ => {
                    return Err(BackupError::Schema(
                        "a trigger of the other engine".to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deletes every row of `table`.
    pub async fn clear(&mut self, table: &str) -> Result<(), BackupError> {
        let sql = format!("DELETE FROM \"{}\"", check_identifier(table)?);
        self.run(sql).await
    }

    /// Loads every batch `batches` yields (values in `columns`' order) into
    /// `table`, calling `done` with each batch's row count. On PostgreSQL the
    /// whole dataset is one `COPY`, fed batch by batch as the reader hands them
    /// over; on SQLite each batch is a few multi-row `INSERT`s. A batch that is
    /// an error (the reader found the backup damaged) aborts the load with it.
    pub async fn insert_batches(
        &mut self,
        table: &Table,
        columns: &[String],
        batches: &mut mpsc::Receiver<Batch>,
        mut done: impl FnMut(u64),
    ) -> Result<(), BackupError> {
        let name = check_identifier(&table.name)?;
        let list = columns
            .iter()
            .map(|c| check_identifier(c).map(|c| format!("\"{c}\"")))
            .collect::<Result<Vec<_>, _>>()?
            .join(", ");
        match self {
            Conn::Sqlite(c) => {
                while let Some(batch) = batches.recv().await {
                    let rows = batch?;
                    sqlite_insert(c, name, &list, columns.len(), &rows).await?;
                    done(rows.len() as u64);
                }
            }
            Conn::Postgres(c) => {
                let booleans: Vec<bool> = columns
                    .iter()
                    .map(|name| {
                        table
                            .columns
                            .iter()
                            .any(|(n, k)| n == name && *k == SourceKind::Boolean)
                    })
                    .collect();
                // One COPY for the whole dataset: a COPY per batch cost two
                // round trips and a statement's start and end every 500 rows.
                let mut copy = c
                    .copy_in_raw(&format!("COPY \"{name}\" ({list}) FROM STDIN"))
                    .await?;
                let mut data = Vec::new();
                let sent: Result<(), BackupError> = async {
                    while let Some(batch) = batches.recv().await {
                        let rows = batch?;
                        data.clear();
                        for row in &rows {
                            copy_text_row(&mut data, row, &booleans);
                        }
                        copy.send(data.as_slice()).await?;
                        done(rows.len() as u64);
                    }
                    Ok(())
                }
                .await;
                match sent {
                    Ok(()) => {
                        copy.finish().await?;
                    }
                    Err(e) => {
                        // The server answers the abort with an error of its
                        // own; the cause worth reporting is ours.
                        let _ = copy.abort("the restore failed").await;
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes the secondary indexes, unique and primary keys and foreign keys
    /// off `tables` (PostgreSQL; on SQLite the indexes that are neither a key
    /// nor unique), for a load that builds each index once from all
    /// its rows instead of inserting every row into every B-tree (the way
    /// `pg_restore` loads). Inside the restore's transaction: a failed restore
    /// rolls them back with everything else. [`Conn::rebuild_indexes`] puts
    /// them back, which also checks every key and reference once, over the
    /// whole table.
    pub async fn drop_indexes(&mut self, tables: &[Table]) -> Result<DroppedIndexes, BackupError> {
        let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
        let mut drop = String::new();
        let mut rebuild = Vec::new();
        match self {
            Conn::Sqlite(c) => {
                // Named, not unique: a unique index may be what a foreign
                // key's parent rests on, checked as each row goes in.
                let indexes: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT m.tbl_name, m.name, m.sql FROM sqlite_master m \
                     WHERE m.type = 'index' AND m.sql IS NOT NULL AND NOT EXISTS \
                     (SELECT 1 FROM pragma_index_list(m.tbl_name) l WHERE l.name = m.name AND l.\"unique\") \
                     ORDER BY m.tbl_name, m.name",
                )
                .fetch_all(&mut **c)
                .await?;
                for (table, index, sql) in indexes {
                    if names.contains(&table) {
                        let index = check_identifier(&index)?;
                        drop.push_str(&format!("DROP INDEX \"{index}\";\n"));
                        rebuild.push(sql);
                    }
                }
            }
            Conn::Postgres(c) => {
                // Foreign keys first (a key they lean on cannot go before
                // them), those from or to any of the tables; put back last.
                let foreign: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT t.relname::text, k.conname::text, pg_get_constraintdef(k.oid) \
                     FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid \
                     JOIN pg_class f ON f.oid = k.confrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
                     WHERE n.nspname = current_schema() AND k.contype = 'f' \
                     AND (t.relname = ANY($1) OR f.relname = ANY($1)) ORDER BY 1, 2",
                )
                .bind(&names)
                .fetch_all(&mut **c)
                .await?;
                let keys: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT t.relname::text, k.conname::text, pg_get_constraintdef(k.oid) \
                     FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid \
                     JOIN pg_namespace n ON n.oid = t.relnamespace \
                     WHERE n.nspname = current_schema() AND k.contype IN ('p', 'u') \
                     AND t.relname = ANY($1) ORDER BY 1, 2",
                )
                .bind(&names)
                .fetch_all(&mut **c)
                .await?;
                // Indexes no constraint owns (an exclusion constraint's stays).
                let indexes: Vec<(String, String)> = sqlx::query_as(
                    "SELECT i.relname::text, pg_get_indexdef(i.oid) FROM pg_index x \
                     JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
                     JOIN pg_namespace n ON n.oid = t.relnamespace \
                     WHERE n.nspname = current_schema() AND t.relname = ANY($1) \
                     AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid \
                     AND k.conrelid = x.indrelid AND k.contype IN ('p', 'u', 'x')) ORDER BY 1",
                )
                .bind(&names)
                .fetch_all(&mut **c)
                .await?;
                for (table, constraint, _) in foreign.iter().chain(&keys) {
                    let (table, constraint) =
                        (check_identifier(table)?, check_identifier(constraint)?);
                    drop.push_str(&format!(
                        "ALTER TABLE \"{table}\" DROP CONSTRAINT \"{constraint}\";\n"
                    ));
                }
                for (index, _) in &indexes {
                    let index = check_identifier(index)?;
                    drop.push_str(&format!("DROP INDEX \"{index}\";\n"));
                }
                rebuild.extend(indexes.into_iter().map(|(_, definition)| definition));
                // Foreign keys after the keys they reference.
                for (table, constraint, definition) in keys.iter().chain(&foreign) {
                    rebuild.push(format!(
                        "ALTER TABLE \"{table}\" ADD CONSTRAINT \"{constraint}\" {definition}"
                    ));
                }
            }
        }
        if !drop.is_empty() {
            self.run(drop).await?;
        }
        Ok(DroppedIndexes { rebuild })
    }

    /// Puts back what [`Conn::drop_indexes`] took off, each index built once
    /// from the loaded rows.
    pub async fn rebuild_indexes(&mut self, dropped: DroppedIndexes) -> Result<(), BackupError> {
        if let Conn::Postgres(c) = self {
            // Room to sort each index in memory (the default 64 MB spills a
            // million keys to disk); this transaction's own setting.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET LOCAL maintenance_work_mem = '{}MB'",
                limits::BACKUP_RESTORE_INDEX_MEMORY_MB
            )))
            .execute(&mut **c)
            .await?;
        }
        for statement in dropped.rebuild {
            self.run(statement).await?;
        }
        Ok(())
    }

    /// Moves each sequence past the restored rows (PostgreSQL; SQLite's
    /// AUTOINCREMENT follows inserted keys by itself).
    pub async fn reset_sequences(&mut self, table: &Table) -> Result<(), BackupError> {
        if let Conn::Postgres(c) = self {
            for column in &table.serial {
                let (t, col) = (check_identifier(&table.name)?, check_identifier(column)?);
                let sql = format!(
                    "SELECT setval(pg_get_serial_sequence('\"{t}\"', '{col}'), COALESCE(MAX(\"{col}\"), 1), MAX(\"{col}\") IS NOT NULL) FROM \"{t}\""
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&mut **c)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Rows on their way from a dataset's reader to the target, values in the
/// dataset's column order; an error when the reader found the backup damaged.
pub type Batch = Result<Vec<Vec<Value>>, FormatError>;

/// What [`Conn::drop_indexes`] took off: the statements that put it back, in
/// order (indexes, keys, then the foreign keys that lean on them).
#[derive(Debug)]
pub struct DroppedIndexes {
    rebuild: Vec<String>,
}

/// Inserts `rows` into SQLite's `name` (`list`: its quoted column names) with
/// as few multi-row `INSERT`s as its parameter limit allows.
async fn sqlite_insert(
    c: &mut SqliteConnection,
    name: &str,
    list: &str,
    per_row: usize,
    rows: &[Vec<Value>],
) -> Result<(), BackupError> {
    for chunk in rows.chunks(rows_per_statement(per_row)) {
        let mut sql = format!("INSERT INTO \"{name}\" ({list}) VALUES ");
        for r in 0..chunk.len() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            // Anonymous `?`s: sqlx asks SQLite each parameter's name as it
            // binds, and a numbered one (`?12`) is found by a scan of all
            // names, which made binding a 9,000-parameter statement
            // quadratic (88 % of a restore's time in
            // `sqlite3_bind_parameter_name`).
            for i in 0..per_row {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push('?');
            }
            sql.push(')');
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            for value in row {
                query = match value {
                    Value::Null => query.bind(None::<i64>),
                    Value::Integer(n) => query.bind(*n),
                    Value::Text(s) => query.bind(s.as_str()),
                };
            }
        }
        query.execute(&mut *c).await?;
    }
    Ok(())
}

/// Encoded rows on their way to a dataset's file.
#[derive(Debug, Default)]
pub struct Chunk {
    /// NDJSON lines.
    pub bytes: Vec<u8>,
    /// How many.
    pub rows: u64,
}

struct ChunkEncoder<'a> {
    chunk: Chunk,
    rows: u64,
    out: &'a mpsc::Sender<Chunk>,
}

impl ChunkEncoder<'_> {
    async fn push(&mut self, values: &[Value]) -> Result<(), BackupError> {
        encode_row(&mut self.chunk.bytes, values);
        self.chunk.rows += 1;
        self.rows += 1;
        if self.chunk.bytes.len() >= limits::BACKUP_CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), BackupError> {
        if self.chunk.rows == 0 {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        self.out
            .send(chunk)
            .await
            .map_err(|_| BackupError::TaskFailed("the dataset's writer stopped".to_owned()))
    }
}

/// A trigger turned off for a restore.
pub enum SuspendedTrigger {
    /// Dropped; its `CREATE TRIGGER` statement.
    Sqlite {
        /// The statement that re-creates it.
        sql: String,
    },
    /// Disabled; how it was enabled (`pg_trigger.tgenabled`).
    Postgres {
        /// Its table.
        table: String,
        /// Its name.
        name: String,
        /// `O`, `A`, `R` or `D`.
        enabled: String,
    },
}

/// Rows per multi-row INSERT on SQLite: under its limit of 32,766 parameters.
fn rows_per_statement(columns: usize) -> usize {
    (limits::BACKUP_SQLITE_PARAMETERS_MAX / columns.max(1)).clamp(1, limits::BACKUP_INSERT_ROWS_MAX)
}

/// One row in COPY's text format: tab-separated, `\N` for NULL, backslash escapes.
fn copy_text_row(out: &mut Vec<u8>, row: &[Value], booleans: &[bool]) {
    for (i, value) in row.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match value {
            Value::Null => out.extend_from_slice(b"\\N"),
            Value::Integer(n) if booleans.get(i).copied().unwrap_or(false) => {
                out.extend_from_slice(if *n == 0 { b"f" } else { b"t" });
            }
            Value::Integer(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
            Value::Text(s) => {
                for b in s.bytes() {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        other => out.push(other),
                    }
                }
            }
        }
    }
    out.push(b'\n');
}

fn column_list(
    table: &Table,
    expr: impl Fn(&str, SourceKind) -> String,
) -> Result<String, BackupError> {
    Ok(table
        .columns
        .iter()
        .map(|(name, kind)| check_identifier(name).map(|n| expr(n, *kind)))
        .collect::<Result<Vec<_>, _>>()?
        .join(", "))
}

fn order_list(columns: &[String], expr: impl Fn(&str) -> String) -> Result<String, BackupError> {
    Ok(columns
        .iter()
        .map(|c| check_identifier(c).map(&expr))
        .collect::<Result<Vec<_>, _>>()?
        .join(", "))
}

async fn sqlite_tables(c: &mut SqliteConnection) -> Result<Vec<Table>, BackupError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_sqlx%' ESCAPE '\\'",
    )
    .fetch_all(&mut *c)
    .await?;
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        check_identifier(&name)?;
        let columns: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT name, upper(type), pk FROM pragma_table_info($1)")
                .bind(&name)
                .fetch_all(&mut *c)
                .await?;
        let mut key: Vec<(i64, String)> = Vec::new();
        let mut kinds = Vec::with_capacity(columns.len());
        for (column, declared, pk) in columns {
            check_identifier(&column)?;
            let kind = if declared.contains("INT") {
                SourceKind::Integer
            } else if declared.contains("TEXT") || declared.contains("CHAR") {
                SourceKind::Text
            } else {
                return Err(BackupError::Schema(format!(
                    "{name}.{column} has the type {declared}, which backups do not carry"
                )));
            };
            if pk > 0 {
                key.push((pk, column.clone()));
            }
            kinds.push((column, kind));
        }
        key.sort();
        let references: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT \"table\" FROM pragma_foreign_key_list($1)")
                .bind(&name)
                .fetch_all(&mut *c)
                .await?;
        tables.push(table(
            name,
            kinds,
            key.into_iter().map(|(_, c)| c).collect(),
            references,
            Vec::new(),
        ));
    }
    Ok(tables)
}

async fn postgres_tables(c: &mut PgConnection) -> Result<Vec<Table>, BackupError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut *c)
    .await?;
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        check_identifier(&name)?;
        let columns: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT column_name::text, data_type::text, COALESCE(column_default LIKE 'nextval(%', false) \
             FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(&name)
        .fetch_all(&mut *c)
        .await?;
        let mut kinds = Vec::with_capacity(columns.len());
        let mut serial = Vec::new();
        for (column, declared, is_serial) in columns {
            check_identifier(&column)?;
            let kind = match declared.as_str() {
                "text" | "character varying" | "character" => SourceKind::Text,
                "bigint" | "integer" | "smallint" => SourceKind::Integer,
                "boolean" => SourceKind::Boolean,
                other => {
                    return Err(BackupError::Schema(format!(
                        "{name}.{column} has the type {other}, which backups do not carry"
                    )));
                }
            };
            if is_serial {
                serial.push(column.clone());
            }
            kinds.push((column, kind));
        }
        let key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
        )
        .bind(&name)
        .fetch_all(&mut *c)
        .await?;
        let references: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT f.relname::text FROM pg_constraint k JOIN pg_class f ON f.oid = k.confrelid \
             WHERE k.conrelid = $1::text::regclass AND k.contype = 'f'",
        )
        .bind(&name)
        .fetch_all(&mut *c)
        .await?;
        tables.push(table(name, kinds, key, references, serial));
    }
    Ok(tables)
}

fn table(
    name: String,
    mut columns: Vec<(String, SourceKind)>,
    key: Vec<String>,
    references: Vec<String>,
    serial: Vec<String>,
) -> Table {
    columns.sort_by(|a, b| a.0.cmp(&b.0));
    Table {
        name,
        columns,
        key,
        references,
        serial,
    }
}

/// Sorts `tables` so that each comes after every table it references (by
/// name among those whose turn it is, so both engines give the same order).
fn in_dependency_order(mut tables: Vec<Table>) -> Result<Vec<Table>, BackupError> {
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ordered: Vec<Table> = Vec::with_capacity(tables.len());
    while !tables.is_empty() {
        let ready = tables.iter().position(|t| {
            t.references
                .iter()
                .all(|r| r == &t.name || ordered.iter().any(|o| &o.name == r))
        });
        match ready {
            Some(i) => ordered.push(tables.remove(i)),
            None => {
                return Err(BackupError::Schema(format!(
                    "the tables {} reference each other in a cycle",
                    tables
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, references: &[&str]) -> Table {
        table(
            name.to_owned(),
            Vec::new(),
            Vec::new(),
            references.iter().map(|r| (*r).to_owned()).collect(),
            Vec::new(),
        )
    }

    #[test]
    fn tables_come_after_what_they_reference() {
        let order = in_dependency_order(vec![
            t("routes", &["canons", "tenants"]),
            t("canons", &["tenants"]),
            t("tenants", &[]),
            t("nodes", &["nodes"]),
        ])
        .unwrap();
        let names: Vec<_> = order.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["nodes", "tenants", "canons", "routes"]);
        assert!(in_dependency_order(vec![t("a", &["b"]), t("b", &["a"])]).is_err());
    }

    #[test]
    fn copy_rows_escape_what_copy_reads_as_syntax() {
        let mut out = Vec::new();
        copy_text_row(
            &mut out,
            &[
                Value::Text("a\tb\\c\nd\re".to_owned()),
                Value::Null,
                Value::Integer(1),
                Value::Integer(-7),
            ],
            &[false, false, true, false],
        );
        assert_eq!(out, b"a\\tb\\\\c\\nd\\re\t\\N\tt\t-7\n");
    }

    #[test]
    fn only_plain_identifiers_reach_sql() {
        assert!(check_identifier("audit_log").is_ok());
        for bad in ["", "Audit", "a\"b", "a b", "1a", "a;drop"] {
            assert!(check_identifier(bad).is_err(), "{bad}");
        }
    }
}
