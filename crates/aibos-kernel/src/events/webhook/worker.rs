//! The delivery worker (placeholder of stage 1: the event store is not in yet).

use tokio::sync::Notify;

use crate::db::Tx;

use super::store::SubscriptionRow;

/// The handle the API uses to wake the worker after a change.
#[derive(Debug, Default)]
pub struct Webhooks {
    wake: Notify,
}

impl Webhooks {
    /// Wakes the worker: a subscription changed, a retry or a replay is due.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }
}

/// The tenant's last event `seq`: a new subscription's stream starts after it.
pub async fn stream_head(_tx: &mut Tx, _tenant_id: &str) -> Result<i64, sqlx::Error> {
    Ok(0)
}

/// Publishes `kernel.subscription.*` in the change's transaction.
pub async fn announce(
    _tx: &mut Tx,
    _row: &SubscriptionRow,
    _event_type: &str,
) -> Result<(), sqlx::Error> {
    Ok(())
}
