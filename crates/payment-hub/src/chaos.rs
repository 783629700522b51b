//! The hub's three simulated parts and their failure switches
//! (`POST /chaos/fail/{cell}`, `/chaos/recover/{cell}`).
//!
//! One [`Chaos`] per [`Hub`](crate::Hub), shared by its handlers, never a
//! global (tests run many hubs). The switches are **per tenant**: the hub is
//! shared by every tenant of the kernel, and a tenant's administrator holds
//! every permission of its own tenant, `finance.chaos.manage` included, so a
//! switch that failed the hub for everyone would let one tenant stop the
//! others' payments.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::limits::CHAOS_TENANTS_MAX;

/// One simulated part of the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// The hub's front door: with it failed, every assertion-protected endpoint
    /// except `/chaos/*` answers 503 `GATEWAY_DOWN`.
    Gateway,
    /// Payment processing: `POST /payments/process` answers 503 `PROCESSOR_DOWN`.
    Processor,
    /// The ledger: payments and `/ledger/*` answer 503 `LEDGER_DOWN`.
    Ledger,
}

impl Cell {
    /// Every cell, in the order `/health` lists them.
    pub const ALL: [Cell; 3] = [Cell::Gateway, Cell::Processor, Cell::Ledger];

    /// Parses a path segment.
    pub fn parse(text: &str) -> Option<Cell> {
        match text {
            "gateway" => Some(Cell::Gateway),
            "processor" => Some(Cell::Processor),
            "ledger" => Some(Cell::Ledger),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cell::Gateway => "gateway",
            Cell::Processor => "processor",
            Cell::Ledger => "ledger",
        }
    }
}

/// The failure switches of each tenant that has one failed (a tenant whose
/// parts are all healthy holds no entry).
#[derive(Debug, Default)]
pub struct Chaos {
    failed: Mutex<HashMap<String, [bool; 3]>>,
}

/// More tenants have a part failed than [`CHAOS_TENANTS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTenants;

impl Chaos {
    fn index(cell: Cell) -> usize {
        match cell {
            Cell::Gateway => 0,
            Cell::Processor => 1,
            Cell::Ledger => 2,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, [bool; 3]>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `cell` is failed for `tenant_id`.
    pub fn is_failed(&self, tenant_id: &str, cell: Cell) -> bool {
        self.lock()
            .get(tenant_id)
            .is_some_and(|cells| cells[Self::index(cell)])
    }

    /// Fails (`true`) or recovers (`false`) `cell` for `tenant_id`.
    pub fn set_failed(
        &self,
        tenant_id: &str,
        cell: Cell,
        failed: bool,
    ) -> Result<(), TooManyTenants> {
        let mut map = self.lock();
        let full = map.len() >= CHAOS_TENANTS_MAX;
        match map.get_mut(tenant_id) {
            Some(cells) => {
                cells[Self::index(cell)] = failed;
                if cells.iter().all(|f| !f) {
                    map.remove(tenant_id);
                }
            }
            None if !failed => {}
            None if full => return Err(TooManyTenants),
            None => {
                let mut cells = [false; 3];
                cells[Self::index(cell)] = true;
                map.insert(tenant_id.to_owned(), cells);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_independent_and_names_round_trip() {
        let chaos = Chaos::default();
        chaos.set_failed("a", Cell::Ledger, true).unwrap();
        assert!(chaos.is_failed("a", Cell::Ledger));
        assert!(!chaos.is_failed("a", Cell::Processor));
        assert!(!chaos.is_failed("a", Cell::Gateway));
        assert!(
            !chaos.is_failed("b", Cell::Ledger),
            "another tenant is not affected"
        );
        chaos.set_failed("a", Cell::Ledger, false).unwrap();
        assert!(!chaos.is_failed("a", Cell::Ledger));
        assert!(
            chaos.lock().is_empty(),
            "a tenant all healthy holds no entry"
        );
        for cell in Cell::ALL {
            assert_eq!(Cell::parse(cell.as_str()), Some(cell));
        }
        assert_eq!(Cell::parse("database"), None);
    }
}
