//! The list envelope every collection endpoint answers with.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One page of a list: `{"items": [...], "next_cursor": "…" | null}`.
///
/// `next_cursor` is opaque to clients; `null` means the list is exhausted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items of this page, in the list's stable order.
    pub items: Vec<T>,
    /// Pass as `?cursor=` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}
