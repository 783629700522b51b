//! The backup's form on disk, independent of the engine it came from.
//!
//! A backup is a folder `<dir>/<id>/` holding `manifest.json`, its SHA-256 in
//! `manifest.sha256`, and one file per dataset (a table of the kernel's
//! schema): the table's rows as NDJSON, one JSON array per row with the values
//! in the manifest's column order (`null`, an integer, or a string; booleans
//! are 0 and 1 on both engines), compressed with zstd. Rows are ordered by the
//! table's key compared byte for byte, so the same data gives the same bytes,
//! hence the same SHA-256, whichever engine it was read from.
//!
//! Files are written and read on blocking threads ([`DatasetWriter`],
//! [`read_dataset`]): compressing and hashing are CPU work that must not hold
//! an async worker, and each side exchanges bounded chunks with the database
//! side, so memory stays bounded whatever the size of the database.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::chain::{self, Fields, Verifier};
use crate::limits;

/// The manifest's `format` member.
pub const FORMAT_NAME: &str = "aibos-backup";
/// The version of this layout; a reader refuses any other.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a backup's folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The file holding the manifest's SHA-256 (lowercase hex).
pub const MANIFEST_HASH_FILE: &str = "manifest.sha256";
/// zstd's level: 3 is its default, fast enough to stay ahead of the database.
const ZSTD_LEVEL: i32 = 3;

/// What a backup holds and how to check it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The backup's id (its folder's name).
    pub id: String,
    /// The kernel version that took it.
    pub kernel_version: String,
    /// The highest migration applied to the database it was taken from.
    pub schema_version: i64,
    /// `sqlite` or `postgres`.
    pub engine: String,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC.
    pub finished_at: String,
    /// The master key that sealed the signing seeds and secrets inside (its id,
    /// never the key): a restore needs that key in the target's configuration.
    pub master_key_id: Option<String>,
    /// Every dataset, in restore order (a table after the tables it references).
    pub datasets: Vec<DatasetManifest>,
    /// Each tenant's audit chain head in the snapshot.
    pub audit_heads: Vec<AuditHead>,
}

/// One table of the backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetManifest {
    /// The table's name.
    pub name: String,
    /// The file inside the backup's folder.
    pub file: String,
    /// The row arrays' columns, in order.
    pub columns: Vec<ColumnManifest>,
    /// The columns the rows are ordered by.
    pub order_by: Vec<String>,
    /// Rows written.
    pub rows: u64,
    /// SHA-256 (lowercase hex) of the uncompressed NDJSON.
    pub sha256: String,
    /// Uncompressed NDJSON bytes.
    pub bytes: u64,
    /// Bytes on disk.
    pub compressed_bytes: u64,
}

/// A column of a dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ColumnManifest {
    /// The column's name.
    pub name: String,
    /// `text` or `integer` (booleans are integers 0 and 1).
    pub kind: NeutralKind,
}

/// A column's type in the backup, the same for both engines.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NeutralKind {
    /// A string.
    Text,
    /// A 64-bit integer (booleans as 0 and 1).
    Integer,
}

/// A tenant's audit chain head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditHead {
    /// The tenant.
    pub tenant_id: String,
    /// The last entry's `seq`.
    pub seq: i64,
    /// The last entry's hash.
    pub hash: String,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer (or a boolean as 0/1).
    Integer(i64),
    /// A string.
    Text(String),
}

impl Value {
    /// The string, if this is one.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// Why a backup could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not what this version reads.
    #[error("manifest.json: {0}")]
    Manifest(String),
    /// A dataset's content does not match its manifest entry.
    #[error("dataset {dataset}: {problem}")]
    Dataset {
        /// The dataset's name.
        dataset: String,
        /// What is wrong.
        problem: String,
    },
    /// An audit chain inside the backup does not verify.
    #[error(
        "dataset audit_log: the chain of tenant {tenant_id} does not verify at seq {seq}: {reason}"
    )]
    AuditChain {
        /// The tenant.
        tenant_id: String,
        /// The first bad `seq`.
        seq: i64,
        /// Why.
        reason: String,
    },
}

impl FormatError {
    fn io(path: &Path, source: std::io::Error) -> FormatError {
        FormatError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn dataset(dataset: &str, problem: impl Into<String>) -> FormatError {
        FormatError::Dataset {
            dataset: dataset.to_owned(),
            problem: problem.into(),
        }
    }

    /// The dataset this error names, if any.
    pub fn dataset_name(&self) -> Option<&str> {
        match self {
            FormatError::Dataset { dataset, .. } => Some(dataset),
            FormatError::AuditChain { .. } => Some("audit_log"),
            _ => None,
        }
    }
}

/// Appends `values` to `line` as one NDJSON row (with its newline).
pub fn encode_row(line: &mut Vec<u8>, values: &[Value]) {
    line.push(b'[');
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        match value {
            Value::Null => line.extend_from_slice(b"null"),
            Value::Integer(n) => line.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
            // Writing a &str into a Vec cannot fail.
            Value::Text(s) => {
                let _ = serde_json::to_writer(&mut *line, s.as_str());
            }
        }
    }
    line.extend_from_slice(b"]\n");
}

/// Parses one NDJSON row of `columns` values.
pub fn decode_row(line: &[u8], columns: usize) -> Result<Vec<Value>, String> {
    let raw: Vec<serde_json::Value> =
        serde_json::from_slice(line).map_err(|e| format!("a row is not a JSON array: {e}"))?;
    if raw.len() != columns {
        return Err(format!(
            "a row has {} values for {columns} columns",
            raw.len()
        ));
    }
    raw.into_iter()
        .map(|v| match v {
            serde_json::Value::Null => Ok(Value::Null),
            serde_json::Value::String(s) => Ok(Value::Text(s)),
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(Value::Integer)
                .ok_or_else(|| format!("{n} is not a 64-bit integer")),
            other => Err(format!("unexpected value {other}")),
        })
        .collect()
}

/// Writes one dataset's file on a blocking thread: hashes the NDJSON, compresses it.
pub struct DatasetWriter {
    path: PathBuf,
    hasher: Sha256,
    bytes: u64,
    encoder: zstd::stream::write::Encoder<'static, BufWriter<File>>,
}

/// What [`DatasetWriter::finish`] measured.
#[derive(Debug, Clone)]
pub struct Written {
    /// SHA-256 of the NDJSON (lowercase hex).
    pub sha256: String,
    /// NDJSON bytes.
    pub bytes: u64,
    /// Bytes on disk.
    pub compressed_bytes: u64,
}

impl DatasetWriter {
    /// Creates `path` (which must not exist).
    pub fn create(path: &Path) -> Result<DatasetWriter, FormatError> {
        let file = private_file(path)?;
        let mut encoder = zstd::stream::write::Encoder::new(BufWriter::new(file), ZSTD_LEVEL)
            .map_err(|e| FormatError::io(path, e))?;
        // zstd's own checksum: damage is caught while decompressing, before
        // the rows reach a restore's transaction.
        encoder
            .include_checksum(true)
            .map_err(|e| FormatError::io(path, e))?;
        Ok(DatasetWriter {
            path: path.to_owned(),
            hasher: Sha256::new(),
            bytes: 0,
            encoder,
        })
    }

    /// Appends encoded rows.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), FormatError> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        self.encoder
            .write_all(chunk)
            .map_err(|e| FormatError::io(&self.path, e))
    }

    /// Ends the stream and makes the file durable.
    pub fn finish(self) -> Result<Written, FormatError> {
        let path = self.path;
        let buffered = self
            .encoder
            .finish()
            .map_err(|e| FormatError::io(&path, e))?;
        let file = buffered
            .into_inner()
            .map_err(|e| FormatError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| FormatError::io(&path, e))?;
        let compressed_bytes = file
            .metadata()
            .map_err(|e| FormatError::io(&path, e))?
            .len();
        Ok(Written {
            sha256: hex(&self.hasher.finalize()),
            bytes: self.bytes,
            compressed_bytes,
        })
    }
}

/// Reads `dataset`'s file in `folder`, checks its row count and hash against
/// the manifest (and, for `audit_log`, every tenant's chain against `heads`),
/// and hands each row to `sink`. Runs on a blocking thread. An error from
/// `sink` stops the read and is returned as it is.
pub fn read_dataset(
    folder: &Path,
    dataset: &DatasetManifest,
    heads: &[AuditHead],
    mut sink: impl FnMut(Vec<Value>) -> Result<(), FormatError>,
) -> Result<(), FormatError> {
    let path = folder.join(&dataset.file);
    if !is_plain_file_name(&dataset.file) {
        return Err(FormatError::dataset(
            &dataset.name,
            format!("file name {:?} is not a plain file name", dataset.file),
        ));
    }
    let file = File::open(&path).map_err(|e| FormatError::io(&path, e))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .map_err(|e| FormatError::dataset(&dataset.name, format!("cannot decompress: {e}")))?;
    let mut reader = BufReader::with_capacity(1 << 16, decoder);
    let mut chains = (dataset.name == "audit_log")
        .then(|| ChainCheck::new(&dataset.columns, heads))
        .transpose()
        .map_err(|e| FormatError::dataset(&dataset.name, e))?;
    let mut hasher = Sha256::new();
    let mut rows = 0u64;
    let mut bytes = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = std::io::Read::take(&mut reader, limits::BACKUP_ROW_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| FormatError::dataset(&dataset.name, format!("cannot decompress: {e}")))?;
        if read == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            return Err(FormatError::dataset(
                &dataset.name,
                if line.len() > limits::BACKUP_ROW_BYTES_MAX {
                    format!(
                        "a row is longer than {} bytes",
                        limits::BACKUP_ROW_BYTES_MAX
                    )
                } else {
                    "the last row is cut short".to_owned()
                },
            ));
        }
        hasher.update(&line);
        bytes += line.len() as u64;
        rows += 1;
        let values = decode_row(&line[..line.len() - 1], dataset.columns.len())
            .map_err(|e| FormatError::dataset(&dataset.name, format!("row {rows}: {e}")))?;
        if let Some(chains) = chains.as_mut() {
            chains.push(&values)?;
        }
        sink(values)?;
    }
    if rows != dataset.rows {
        return Err(FormatError::dataset(
            &dataset.name,
            format!("{rows} rows, the manifest says {}", dataset.rows),
        ));
    }
    let sha256 = hex(&hasher.finalize());
    if sha256 != dataset.sha256 || bytes != dataset.bytes {
        return Err(FormatError::dataset(
            &dataset.name,
            "its SHA-256 does not match the manifest: the file was changed or damaged",
        ));
    }
    if let Some(chains) = chains {
        chains.finish()?;
    }
    Ok(())
}

/// Verifies every tenant's audit chain as the `audit_log` rows stream by
/// (ordered by tenant, then `seq`), against the heads in the manifest.
struct ChainCheck<'h> {
    heads: &'h [AuditHead],
    index: AuditColumns,
    current: Option<Verifier>,
    seen: std::collections::HashSet<String>,
    buffer: Vec<u8>,
}

/// Where each member of an entry is in a row.
struct AuditColumns {
    id: usize,
    tenant_id: usize,
    seq: usize,
    occurred_at: usize,
    actor_type: usize,
    actor_id: usize,
    action: usize,
    resource_type: usize,
    resource_id: usize,
    outcome: usize,
    severity: usize,
    client_ip: usize,
    user_agent: usize,
    correlation_id: usize,
    details: usize,
    prev_hash: usize,
    hash: usize,
}

impl<'h> ChainCheck<'h> {
    fn new(columns: &[ColumnManifest], heads: &'h [AuditHead]) -> Result<ChainCheck<'h>, String> {
        let at = |name: &str| {
            columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| format!("has no column {name}"))
        };
        Ok(ChainCheck {
            heads,
            index: AuditColumns {
                id: at("id")?,
                tenant_id: at("tenant_id")?,
                seq: at("seq")?,
                occurred_at: at("occurred_at")?,
                actor_type: at("actor_type")?,
                actor_id: at("actor_id")?,
                action: at("action")?,
                resource_type: at("resource_type")?,
                resource_id: at("resource_id")?,
                outcome: at("outcome")?,
                severity: at("severity")?,
                client_ip: at("client_ip")?,
                user_agent: at("user_agent")?,
                correlation_id: at("correlation_id")?,
                details: at("details")?,
                prev_hash: at("prev_hash")?,
                hash: at("hash")?,
            },
            current: None,
            seen: std::collections::HashSet::new(),
            buffer: Vec::new(),
        })
    }

    fn push(&mut self, row: &[Value]) -> Result<(), FormatError> {
        let bad = |problem: &str| FormatError::dataset("audit_log", problem);
        let text = |i: usize| row[i].as_text();
        let required = |i: usize| text(i).ok_or_else(|| bad("an entry lacks a required member"));
        let tenant_id = required(self.index.tenant_id)?;
        let Value::Integer(seq) = row[self.index.seq] else {
            return Err(bad("an entry's seq is not an integer"));
        };
        if self.current.as_ref().map(|v| v.tenant()) != Some(tenant_id) {
            if let Some(done) = self.current.take() {
                self.end(done)?;
            }
            if !self.seen.insert(tenant_id.to_owned()) {
                return Err(bad("the rows are not ordered by tenant"));
            }
            self.current = Some(Verifier::new(tenant_id));
        }
        let details: serde_json::Value = serde_json::from_str(required(self.index.details)?)
            .map_err(|_| bad("an entry's details are not JSON"))?;
        let fields = Fields {
            id: required(self.index.id)?,
            tenant_id,
            seq,
            occurred_at: required(self.index.occurred_at)?,
            actor_type: required(self.index.actor_type)?,
            actor_id: text(self.index.actor_id),
            action: required(self.index.action)?,
            resource_type: text(self.index.resource_type),
            resource_id: text(self.index.resource_id),
            outcome: required(self.index.outcome)?,
            severity: required(self.index.severity)?,
            client_ip: text(self.index.client_ip),
            user_agent: text(self.index.user_agent),
            correlation_id: text(self.index.correlation_id),
            details: &details,
            prev_hash: required(self.index.prev_hash)?,
        };
        let hash = required(self.index.hash)?;
        let hash_ok = chain::hash_matches(&fields, hash, &mut self.buffer);
        let prev_hash = fields.prev_hash;
        if let Some(verifier) = self.current.as_mut() {
            verifier.push_checked(seq, tenant_id, prev_hash, hash, hash_ok);
        }
        Ok(())
    }

    /// Ends one tenant's walk: it must verify and end at the manifest's head.
    fn end(&self, verifier: Verifier) -> Result<(), FormatError> {
        let head = self.heads.iter().find(|h| h.tenant_id == verifier.tenant());
        let verification = verifier.finish(head.map(|h| h.seq));
        if let (Some(seq), Some(reason)) = (verification.first_bad_seq, verification.reason) {
            return Err(FormatError::AuditChain {
                tenant_id: verification.tenant_id,
                seq,
                reason,
            });
        }
        match head {
            Some(head) if head.hash == verification.head_hash => Ok(()),
            Some(_) => Err(FormatError::AuditChain {
                tenant_id: verification.tenant_id,
                seq: i64::try_from(verification.entries).unwrap_or(i64::MAX),
                reason: "the last entry's hash is not the head the manifest records".to_owned(),
            }),
            None => Err(FormatError::AuditChain {
                tenant_id: verification.tenant_id,
                seq: 1,
                reason: "the manifest records no head for this chain".to_owned(),
            }),
        }
    }

    fn finish(mut self) -> Result<(), FormatError> {
        if let Some(done) = self.current.take() {
            self.end(done)?;
        }
        if let Some(head) = self
            .heads
            .iter()
            .find(|h| h.seq > 0 && !self.seen.contains(&h.tenant_id))
        {
            return Err(FormatError::AuditChain {
                tenant_id: head.tenant_id.clone(),
                seq: 1,
                reason: format!(
                    "the manifest records a head at seq {} but the backup holds none of its entries",
                    head.seq
                ),
            });
        }
        Ok(())
    }
}

/// Writes `manifest` into `folder` with its hash file, both durable.
pub fn write_manifest(folder: &Path, manifest: &Manifest) -> Result<(), FormatError> {
    let text = serde_json::to_vec_pretty(manifest)
        .map_err(|e| FormatError::Manifest(format!("cannot encode: {e}")))?;
    let hash = format!("{}  {MANIFEST_FILE}\n", hex(&Sha256::digest(&text)));
    for (name, bytes) in [
        (MANIFEST_FILE, text.as_slice()),
        (MANIFEST_HASH_FILE, hash.as_bytes()),
    ] {
        let path = folder.join(name);
        let mut file = private_file(&path)?;
        file.write_all(bytes)
            .map_err(|e| FormatError::io(&path, e))?;
        file.sync_all().map_err(|e| FormatError::io(&path, e))?;
    }
    Ok(())
}

/// Creates `path` (which must not exist) readable by its owner only: a backup
/// holds password hashes and sealed secrets.
fn private_file(path: &Path) -> Result<File, FormatError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| FormatError::io(path, e))
}

/// Reads and checks the manifest of the backup in `folder`.
pub fn read_manifest(folder: &Path) -> Result<Manifest, FormatError> {
    let path = folder.join(MANIFEST_FILE);
    let text = read_bounded(&path, limits::BACKUP_MANIFEST_BYTES_MAX)?;
    let hash_path = folder.join(MANIFEST_HASH_FILE);
    let recorded = read_bounded(&hash_path, 1024)?;
    let recorded = String::from_utf8_lossy(&recorded);
    let recorded = recorded.split_whitespace().next().unwrap_or_default();
    if recorded != hex(&Sha256::digest(&text)) {
        return Err(FormatError::Manifest(
            "its SHA-256 does not match manifest.sha256: the manifest was changed or damaged"
                .to_owned(),
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| FormatError::Manifest(format!("not a backup manifest: {e}")))?;
    if manifest.format != FORMAT_NAME || manifest.format_version != FORMAT_VERSION {
        return Err(FormatError::Manifest(format!(
            "format {} version {}; this kernel reads {FORMAT_NAME} version {FORMAT_VERSION}",
            manifest.format, manifest.format_version
        )));
    }
    Ok(manifest)
}

fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, FormatError> {
    use std::io::Read;
    let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FormatError::io(path, e))?;
    if bytes.len() > max {
        return Err(FormatError::Manifest(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// A file name with no folder part (a manifest must not point outside its backup).
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_round_trips_through_its_line() {
        let row = vec![
            Value::Text("a \"quoted\"\nline é".to_owned()),
            Value::Integer(-42),
            Value::Null,
            Value::Integer(i64::MAX),
        ];
        let mut line = Vec::new();
        encode_row(&mut line, &row);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(decode_row(&line[..line.len() - 1], 4).unwrap(), row);
        assert!(decode_row(&line[..line.len() - 1], 3).is_err());
        assert!(decode_row(b"[1.5]", 1).is_err());
        assert!(decode_row(b"[true]", 1).is_err());
        assert!(decode_row(b"{}", 1).is_err());
    }

    /// A chain of `n` entries of one tenant, as `audit_log` rows in column order.
    fn chain_rows(n: i64) -> (Vec<ColumnManifest>, Vec<Vec<Value>>, AuditHead) {
        let names = [
            "action",
            "actor_id",
            "actor_type",
            "client_ip",
            "correlation_id",
            "details",
            "hash",
            "id",
            "occurred_at",
            "outcome",
            "prev_hash",
            "resource_id",
            "resource_type",
            "seq",
            "severity",
            "tenant_id",
            "user_agent",
        ];
        let columns = names
            .iter()
            .map(|n| ColumnManifest {
                name: (*n).to_owned(),
                kind: if *n == "seq" {
                    NeutralKind::Integer
                } else {
                    NeutralKind::Text
                },
            })
            .collect();
        let mut prev = chain::GENESIS_HASH.to_owned();
        let mut rows = Vec::new();
        for seq in 1..=n {
            let mut entry = crate::audit::AuditEntry {
                id: format!("id-{seq}"),
                tenant_id: "t1".to_owned(),
                seq,
                occurred_at: "2026-12-06T18:00:00.000Z".to_owned(),
                actor_type: "system".to_owned(),
                actor_id: None,
                action: "role.created".to_owned(),
                resource_type: Some("role".to_owned()),
                resource_id: Some(format!("r{seq}")),
                outcome: "success".to_owned(),
                severity: "info".to_owned(),
                client_ip: None,
                user_agent: None,
                correlation_id: Some("c".to_owned()),
                details: serde_json::json!({ "n": seq }),
                prev_hash: prev.clone(),
                hash: String::new(),
            };
            entry.hash = chain::compute_hash(&entry);
            prev = entry.hash.clone();
            let text = |s: &str| Value::Text(s.to_owned());
            let opt = |s: &Option<String>| s.as_deref().map_or(Value::Null, text);
            rows.push(vec![
                text(&entry.action),
                opt(&entry.actor_id),
                text(&entry.actor_type),
                opt(&entry.client_ip),
                opt(&entry.correlation_id),
                text(&entry.details.to_string()),
                text(&entry.hash),
                text(&entry.id),
                text(&entry.occurred_at),
                text(&entry.outcome),
                text(&entry.prev_hash),
                opt(&entry.resource_id),
                opt(&entry.resource_type),
                Value::Integer(seq),
                text(&entry.severity),
                text(&entry.tenant_id),
                opt(&entry.user_agent),
            ]);
        }
        let head = AuditHead {
            tenant_id: "t1".to_owned(),
            seq: n,
            hash: prev,
        };
        (columns, rows, head)
    }

    /// Writes `rows` as the dataset `audit_log` with a matching manifest entry.
    fn write_audit(
        folder: &Path,
        columns: Vec<ColumnManifest>,
        rows: &[Vec<Value>],
    ) -> DatasetManifest {
        let file = format!("audit-{}.ndjson.zst", rand_suffix());
        let mut writer = DatasetWriter::create(&folder.join(&file)).unwrap();
        let mut bytes = Vec::new();
        for row in rows {
            encode_row(&mut bytes, row);
        }
        writer.write(&bytes).unwrap();
        let written = writer.finish().unwrap();
        DatasetManifest {
            name: "audit_log".to_owned(),
            file,
            columns,
            order_by: vec!["tenant_id".to_owned(), "seq".to_owned()],
            rows: rows.len() as u64,
            sha256: written.sha256,
            bytes: written.bytes,
            compressed_bytes: written.compressed_bytes,
        }
    }

    fn rand_suffix() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    #[test]
    fn audit_chains_inside_a_backup_are_verified_even_when_the_hashes_were_redone() {
        let folder = tempfile::tempdir().unwrap();
        let (columns, rows, head) = chain_rows(4);
        let intact = write_audit(folder.path(), columns.clone(), &rows);
        let mut seen = 0;
        read_dataset(folder.path(), &intact, std::slice::from_ref(&head), |_| {
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, 4);

        // An entry edited, and the file's hash and row count redone to match:
        // only the chain shows it.
        let mut edited = rows.clone();
        edited[2][0] = Value::Text("role.deleted".to_owned());
        let forged = write_audit(folder.path(), columns.clone(), &edited);
        let err = read_dataset(folder.path(), &forged, std::slice::from_ref(&head), |_| {
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(err, FormatError::AuditChain { seq: 3, .. }),
            "{err}"
        );
        assert_eq!(err.dataset_name(), Some("audit_log"));

        // The last entry removed: the manifest's head says there was one more.
        let cut = write_audit(folder.path(), columns.clone(), &rows[..3]);
        let err =
            read_dataset(folder.path(), &cut, std::slice::from_ref(&head), |_| Ok(())).unwrap_err();
        assert!(matches!(err, FormatError::AuditChain { .. }), "{err}");

        // A head the manifest does not record, or records for a chain that is absent.
        let err = read_dataset(folder.path(), &intact, &[], |_| Ok(())).unwrap_err();
        assert!(matches!(err, FormatError::AuditChain { .. }), "{err}");
        let (_, _, other) = chain_rows(1);
        let stray = AuditHead {
            tenant_id: "t2".to_owned(),
            ..other
        };
        let err = read_dataset(folder.path(), &intact, &[head, stray], |_| Ok(())).unwrap_err();
        assert!(
            matches!(err, FormatError::AuditChain { ref tenant_id, .. } if tenant_id == "t2"),
            "{err}"
        );
    }

    #[test]
    fn only_plain_file_names_are_read() {
        assert!(is_plain_file_name("01-tenants.ndjson.zst"));
        for bad in ["", ".", "..", "../x", "a/b", "a\\b"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
